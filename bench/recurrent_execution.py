"""Which execution path of a projected LSTM / GRU is faster on this CPU: the measurement behind
the ``execution="auto"`` rule of `rankwise.layers.recurrent`.

For LSTM and GRU layers of several hidden sizes ``H`` (16 input features), hidden-state ranks
``r`` and batch sizes ``N``, both paths of the same projected layer run the same padded batch of
``T`` steps (inference, `torch.no_grad`, one torch thread: on this shared 2-core machine two
threads make single timings jump by 10x and more); medians of interleaved repeats. The rule

    factored  iff  N S > STEP + GATE N G H

(``S`` multiply-adds saved per step and sequence, ``G`` gates, one cell) is calibrated for each
kind of layer (torch's fused GRU kernel is slower than its LSTM kernel) by a grid search of its
two constants for the least total time lost by wrong picks over the measured cases
(the dense kernel's cost is not linear in its multiply-adds: at small batches it is bound by
reading ``W_hh``, so a least-squares fit of a cost model does not do better).

Run from the repository root: ``python bench/recurrent_execution.py``.
Writes ``bench/results/recurrent_execution.md``.
"""

import os
import statistics
import time

import numpy as np
import torch
from torch import nn

from environment import write_result
from rankwise.layers import ProjectedGRU, ProjectedLSTM
from rankwise.layers.recurrent import (FACTORED_GATE_OVERHEAD, FACTORED_STEP_OVERHEAD,
                                       factored_is_faster)
from rankwise.rnn import GATES

HIDDEN_SIZES = (64, 128, 256, 512)
RANK_FRACTIONS = (1 / 16, 1 / 4)
BATCH_SIZES = (1, 8, 64, 256)
INPUT_SIZE, STEPS, REPEATS = 16, 24, 7
RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "recurrent_execution.md")


def median_times(layer, x, repeats=REPEATS):
    """Median seconds of the dense and the factored path on ``x``, repeats interleaved."""
    times = {"dense": [], "factored": []}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up
            for path in times:
                layer.execution = path
                start = time.perf_counter()
                layer(x)
                times[path].append(time.perf_counter() - start)
    return {path: statistics.median(t[1:]) for path, t in times.items()}


def measure(kind, hidden, fraction, batch, generator):
    dense_type, wrapper = (nn.LSTM, ProjectedLSTM) if kind == "lstm" else (nn.GRU, ProjectedGRU)
    rank = max(1, round(fraction * hidden))
    basis, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=generator, dtype=torch.float64))
    layer = wrapper.from_dense(dense_type(INPUT_SIZE, hidden), output_basis=basis[:, :rank]).eval()
    times = median_times(layer, torch.randn(STEPS, batch, INPUT_SIZE, generator=generator))
    return {"kind": kind, "hidden": hidden, "rank": rank, "batch": batch, "savings": layer._savings(),
            "gate_rows": GATES[kind] * hidden, **times}


def time_lost(rows, step, gate):
    """Seconds lost over ``rows`` by the rule with these constants."""
    return sum(abs(r["factored"] - r["dense"]) for r in rows
               if (r["batch"] * r["savings"] > step + gate * r["batch"] * r["gate_rows"])
               != (r["factored"] < r["dense"]))


def calibrate(rows):
    """``(STEP, GATE)`` losing the least time over ``rows`` (the first of equals, smallest)."""
    grid = [(step, gate) for step in np.geomspace(1e3, 1e8, 51) for gate in np.linspace(0, 400, 41)]
    return min(grid, key=lambda constants: time_lost(rows, *constants))


def markdown(rows, calibrated):
    lines = ["| layer | H | r | N | dense (ms) | factored (ms) | factored / dense | faster | rule picks |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        faster = "factored" if r["factored"] < r["dense"] else "dense"
        picks_factored = factored_is_faster(r["kind"], r["batch"], r["hidden"], r["savings"], 1)
        picked = "factored" if picks_factored else "dense"
        lines.append(f"| {r['kind'].upper()} | {r['hidden']} | {r['rank']} | {r['batch']} "
                     f"| {1e3 * r['dense']:.2f} | {1e3 * r['factored']:.2f} "
                     f"| {r['factored'] / r['dense']:.2f} | {faster} | {picked} |")
    right = sum((r["factored"] < r["dense"]) == factored_is_faster(r["kind"], r["batch"], r["hidden"],
                                                                    r["savings"], 1) for r in rows)
    lines.append("")
    lines.append("")
    for kind, (step, gate) in calibrated.items():
        mine = [r for r in rows if r["kind"] == kind]
        committed = (FACTORED_STEP_OVERHEAD[kind], FACTORED_GATE_OVERHEAD[kind])
        lines.append(f"- {kind.upper()}: calibrated on this run STEP = {step:.3g}, GATE = {gate:.0f} "
                     f"multiply-adds (wrong picks lose {1e3 * time_lost(mine, step, gate):.2f} ms in "
                     f"all); as committed STEP = {committed[0]:.3g}, GATE = {committed[1]:.0f} "
                     f"(lose {1e3 * time_lost(mine, *committed):.2f} ms); always the slower path "
                     f"would lose {1e3 * sum(abs(r['factored'] - r['dense']) for r in mine):.2f} ms.")
    lines.append(f"- The rule as committed picks the faster path in {right} of {len(rows)} cases.")
    return "\n".join(lines)


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    rows = [measure(kind, hidden, fraction, batch, generator)
            for kind in ("lstm", "gru") for hidden in HIDDEN_SIZES
            for fraction in RANK_FRACTIONS for batch in BATCH_SIZES]
    calibrated = {kind: calibrate([r for r in rows if r["kind"] == kind]) for kind in ("lstm", "gru")}
    notes = (f"One projected layer, {INPUT_SIZE} input features (input side dense), hidden state "
             f"projected at rank r, a padded batch of N sequences of {STEPS} steps; median of "
             f"{REPEATS} interleaved repeats after a warm-up, inference under `torch.no_grad()`, one torch "
             "thread. "
             "The rule (`rankwise.layers.recurrent.factored_is_faster`) uses the constants "
             "committed in the code; the fit below is what this run measured.")
    write_result(RESULT, "Execution paths of projected recurrent layers (CPU)",
                 notes + "\n\n" + markdown(rows, calibrated))


if __name__ == "__main__":
    main()

"""Cost of NeuronPCA's calibration pass against a plain forward pass, before and after a change.

Four workloads, one thread (``torch.set_num_threads(1)``), eval mode, under ``torch.no_grad()``:

- ``mnist_cnn``, ``mnist_mlp``: the pretrained MNIST networks, 16 batches of 256 training images;
- ``minilm_batch32``: all-MiniLM-L6-v2 (loaded as ``bench/pretrained_data.py`` does), 64
  calibration sentences in padded batches of 32 (``model(**batch)``);
- ``minilm_single``: the same model, 32 sentences one at a time.

For each: *forward* is the plain ``model(batch)`` over every batch; *calibration* the whole
``rw.NeuronPCA(model, batches, verbosity="off")`` call; their repeats are interleaved (median
of 3 after a warm-up each), timed in CPU seconds of the process (``time.process_time``, which
a machine shared with other jobs disturbs far less than the wall clock; one thread, so it is
the work done) and in wall-clock seconds. *spectra* is, on a fresh NeuronPCA, ``npca.spectrum(name, side)``
for every analysed layer and side: the eigen-decompositions, and for the layers whose output
moments are derived from their input's, that derivation, which runs on first use.

Two checkouts are timed, each in its own process: the code to test (the repository this
script is in) and a baseline (``--base``, e.g. ``git worktree add /tmp/cost-base 75f5d4a``).
The processes alternate, baseline then tested, workload by workload, for ``--rounds`` rounds,
so that a busy spell of a shared machine falls on both alike; a table gives the medians over
rounds.

Run from the repository root: ``python bench/calibration_cost.py --base /tmp/cost-base``.
Writes ``bench/results/calibration_cost.md``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
RESULT = os.path.join(BENCH, "results", "calibration_cost.md")
WORKLOADS = ("mnist_cnn", "mnist_mlp", "minilm_batch32", "minilm_single")
MNIST_BATCHES, MNIST_BATCH_SIZE = 16, 256
MINILM_SENTENCES, MINILM_SINGLE_SENTENCES = 64, 32
REPEATS = 3


def seconds(function):
    """``(CPU seconds, wall-clock seconds)`` of one call of ``function()``."""
    cpu, wall = time.process_time(), time.perf_counter()
    function()
    return time.process_time() - cpu, time.perf_counter() - wall


def workload(name):
    """``(model, batches, forward)`` of workload `name`; ``forward(model, batch)`` runs one batch."""
    if name.startswith("mnist"):
        from rankwise.datasets import load_mnist
        from rankwise.examples import pretrained_mnist
        images, _ = load_mnist("train")
        batches = list(images[:MNIST_BATCHES * MNIST_BATCH_SIZE].split(MNIST_BATCH_SIZE))
        return pretrained_mnist(name.split("_")[1], verbose=False).eval(), batches, lambda m, b: m(b)
    sys.path.insert(0, BENCH)
    from pretrained_data import minilm, sentence_split, tokenize
    model, tokenizer = minilm()
    single = name == "minilm_single"
    sentences = sentence_split("calibration", MINILM_SINGLE_SENTENCES if single else MINILM_SENTENCES)
    return model, tokenize(tokenizer, sentences, 1 if single else 32), lambda m, b: m(**b)


def forward_over(model, batches, forward_one):
    """The plain forward pass: ``forward_one(model, batch)`` on every batch, no gradients."""
    with torch.no_grad():
        for batch in batches:
            forward_one(model, batch)


def measure(name):
    """Forward, calibration and spectra seconds of workload `name` with the importable rankwise."""
    import rankwise as rw

    torch.set_num_threads(1)
    model, batches, forward_one = workload(name)

    def forward():
        forward_over(model, batches, forward_one)

    def calibrate():
        return rw.NeuronPCA(model, batches, verbosity="off")

    def all_spectra(npca):
        for layer in npca.layer_names:
            for side in ("input", "output"):
                try:
                    npca.spectrum(layer, side)
                except ValueError:  # a Linear layer's input side is not analysed
                    pass

    forward(), calibrate()
    times = {"forward": [], "calibration": []}
    for _ in range(REPEATS):
        times["forward"].append(seconds(forward))
        times["calibration"].append(seconds(calibrate))
    npca = calibrate()
    spectra = seconds(lambda: all_spectra(npca))
    return {**{f"{key}_{clock}": statistics.median(t[i] for t in runs)
               for key, runs in times.items() for i, clock in enumerate(("cpu", "wall"))},
            "spectra_cpu": spectra[0], "spectra_wall": spectra[1]}


def measured_in(checkout, name):
    """:func:`measure` of `name` in a fresh process importing rankwise from `checkout`."""
    environment = {**os.environ, "PYTHONPATH": checkout}
    done = subprocess.run([sys.executable, __file__, "--measure", name], env=environment,
                          capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def versions():
    import transformers
    return f"torch {torch.__version__}, transformers {transformers.__version__}, Python {sys.version.split()[0]}"


def markdown(results, base):
    """The tables of medians over rounds, baseline and tested side by side, per clock."""
    rounds = len(results[WORKLOADS[0]]["base"])
    text = [f"Baseline: `{base}` ({_commit(base)}); tested: `{ROOT}` ({_commit(ROOT)}). "
            f"{rounds} rounds; {versions()}; one thread."]
    for clock, title in (("cpu", "CPU seconds (time.process_time)"), ("wall", "wall-clock seconds")):
        text += ["", f"{title}:", "",
                 "| workload | forward | calibration before | ratio before | calibration after "
                 "| ratio after | spectra before | spectra after |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name in WORKLOADS:
            before, after = results[name]["base"], results[name]["tested"]

            def median(runs, key):
                return statistics.median(run[f"{key}_{clock}"] for run in runs)

            def ratio(runs):
                return statistics.median(run[f"calibration_{clock}"] / run[f"forward_{clock}"]
                                         for run in runs)

            forward = statistics.median([run[f"forward_{clock}"] for run in before + after])
            text.append(f"| {name} | {forward:.3f} s | {median(before, 'calibration'):.3f} s "
                        f"| {ratio(before):.2f}x | {median(after, 'calibration'):.3f} s "
                        f"| {ratio(after):.2f}x | {median(before, 'spectra'):.3f} s "
                        f"| {median(after, 'spectra'):.3f} s |")
    return "\n".join(text)


def _commit(checkout):
    done = subprocess.run(["git", "-C", checkout, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "?"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--measure", choices=WORKLOADS, help="(internal) measure one workload here")
    parser.add_argument("--base", default="/tmp/cost-base", help="checkout of the baseline code")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    if not os.path.isdir(os.path.join(args.base, "rankwise")):
        raise SystemExit(f"--base: {args.base} holds no rankwise checkout; create one with "
                         "`git worktree add /tmp/cost-base 75f5d4a`.")
    results = {name: {"base": [], "tested": []} for name in WORKLOADS}
    for _ in range(args.rounds):
        for name in WORKLOADS:
            for label, checkout in (("base", args.base), ("tested", ROOT)):
                results[name][label].append(measured_in(checkout, name))
                print(name, label, results[name][label][-1], flush=True)
    sys.path.insert(0, BENCH)
    from environment import write_result
    write_result(RESULT, "Calibration cost", markdown(results, args.base))


if __name__ == "__main__":
    main()

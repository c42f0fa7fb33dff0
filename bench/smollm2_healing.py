"""Healing SmolLM2-135M after compression (issue 22's healing, issue 23's recovery): perplexity on
held-apart text before and after ``rw.recover`` with token-level distillation and with LoRA.

Model, text and layers are :mod:`smollm2`'s: SmolLM2-135M-Instruct dequantised to float32; the
standard library's docstrings dealt whole to calibration (chunks of 256 tokens), validation
and test (16 chunks) from disjoint modules; the 42 Linears of decoder layers 0, 5, 10, 15, 20, 25
compressed at 20% and 40% of their learnables. The compression is rankwise's old defaults
(``NeuronPCA(..., loss_fn=None, validation=None)``, ``criterion="variance", allocation="global"``:
the cheapest to compute here, and the one that leaves the most to heal; ``bench/smollm2.py``
measures the others).

Healing, on the calibration chunks only (``--calibration``, 16 by default, the first 16 of
:mod:`smollm2`'s 32 for time: ``rw.recover`` holds out every 4th, 4 of 16, scores token-level KL
to the original there and keeps a result only if it is lower):

- ``logits``: every learnable trained toward the original's next-token distributions
  (token-level KL, temperature 1), ``--epochs`` passes, at relative lr 1e-3: the library's
  default 1e-2 raised the held-out KL 5x in the ``--quick`` run (0.256 -> 1.381 at 40%, so
  ``rw.recover`` did not keep it): too much for every weight of a pretrained LM;
- ``lora``: rank-8 corrections of the compressed layers' factors only, trained the same way
  and merged back (sequential: output-side factors, then the others; ``--epochs`` passes
  each), at the default rule. Test perplexity (16 chunks never used by compression or healing) is reported. 1 torch
thread; peak resident memory per row.

    python bench/smollm2_healing.py            # -> bench/results/smollm2_healing.md
    python bench/smollm2_healing.py --quick    # 8 calibration / 4 test chunks, decoder layers 0, 15
"""

import argparse
import copy
import time
import warnings

import torch

import rankwise as rw
import smollm2 as sm
from environment import write_result

FRACTIONS = (0.2, 0.4)
"""The budgets healed here (the issue's targets are set at 20% and 40%)."""


def compress(model, names, batches, fraction, total, npca):
    goal = fraction * sm.learnables_of(model, names) / total
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=goal,
                                                         layer_names=names, criterion="variance",
                                                         allocation="global", verbosity="off")
    return net, info


def report(rows, reference, names, profile, calibration, test, epochs, calibration_seconds):
    """The markdown table and targets of ``rows`` ``(fraction, method, perplexity, record or None,
    seconds, peak RSS)``."""
    lines = [f"Original test perplexity **{reference:.2f}**; {len(names)} Linears of decoder layers "
             f"{', '.join(map(str, sm.DECODER_LAYERS[profile]))} compressed (old defaults, {calibration_seconds:.0f} s "
             f"of calibration); {calibration} calibration chunks of {sm.CONTEXT} tokens (every 4th held out by "
             f"`rw.recover`), {test} test chunks; {epochs} epoch(s) per healing (per phase for lora); "
             "`method:lr` rows use that relative lr, the others the default rule (1e-2); 1 torch thread.", "",
             "| removed | healing | test perplexity | x original | validation KL before -> after (kept) | s | peak RSS GiB |",
             "|---:|---|---:|---:|---|---:|---:|"]
    for fraction, method, ppl, record, seconds, peak in rows:
        kl = "" if record is None else (f"{record.validation_before:.4f} -> {record.validation_after:.4f} "
                                        f"({'kept' if record.kept else 'not kept'})")
        lines.append(f"| {fraction:.0%} | {method} | {ppl:.2f} | {ppl / reference:.2f}x | {kl} | {seconds:.0f} | {peak:.1f} |")
    lines += ["", "Targets (issue 22, with healing): within 1.5x of the original at 20%, 2.5x at 40%:"]
    for fraction, limit in zip(FRACTIONS, (1.5, 2.5)):
        healed = min((p for g, m, p, *_ in rows if g == fraction and m != "none"), default=float("nan"))
        lines.append(f"- {fraction:.0%}: best healed {healed:.2f} = {healed / reference:.2f}x: "
                     f"**{'reached' if healed / reference <= limit else 'NOT reached'}**")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--methods", default="logits:0.001,lora",
                        help="comma-separated method[:relative lr]; no lr: the library's default rule")
    parser.add_argument("--calibration", type=int, default=16, help="calibration chunks (full profile)")
    parser.add_argument("--output", default=None, help="results file (default bench/results/smollm2_healing.md)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    profile = "quick" if args.quick else "full"
    model, tokenizer = sm.smollm2()
    chunks = {k: sm.PROFILES[profile][k] for k in ("calibration", "test")}
    if not args.quick:
        chunks["calibration"] = args.calibration
    texts, _ = sm.splits(tokenizer, chunks)
    calibration, test = texts["calibration"], texts["test"]
    names = sm.decoder_linear_names(model, sm.DECODER_LAYERS[profile])
    total = rw.count_learnables(model)
    reference = sm.perplexity(model, test)
    print(f"original test perplexity {reference:.2f}", flush=True)
    start = time.perf_counter()
    npca = rw.NeuronPCA(model, calibration, layer_names=names, loss_fn=None, validation=None, verbosity="off")
    calibration_seconds = time.perf_counter() - start
    rows = []
    for fraction in FRACTIONS:
        compressed, info = compress(model, names, calibration, fraction, total, npca)
        before = sm.perplexity(compressed, test)
        rows.append((fraction, "none", before, None, 0.0, sm.rss_gib()[1]))
        print(rows[-1], flush=True)
        for entry in args.methods.split(","):
            method, _, lr = entry.partition(":")
            healed = copy.deepcopy(compressed)
            start = time.perf_counter()
            record = rw.recover(healed, model, calibration, method=method, epochs=args.epochs,
                                lr=float(lr) if lr else None)
            seconds = time.perf_counter() - start
            print(record, flush=True)
            rows.append((fraction, entry, sm.perplexity(healed, test), record, seconds, sm.rss_gib()[1]))
            print(rows[-1][:3], flush=True)
            del healed
    text = report(rows, reference, names, profile, len(calibration), len(test), args.epochs, calibration_seconds)
    write_result(args.output or f"bench/results/smollm2_healing{'_quick' if args.quick else ''}.md",
                 "SmolLM2-135M: healing after compression", text)


if __name__ == "__main__":
    main()

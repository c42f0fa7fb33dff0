"""Healing SmolLM2-135M compressed on all 30 decoder layers (issue 22's healing targets):
the models that ``bench/smollm2.py --decoder-layers all --save`` wrote, each healed with the
same budget, test perplexity before and after.

Model, text and splits are :mod:`smollm2`'s (SmolLM2-135M-Instruct dequantised to float32;
standard-library docstrings dealt whole to calibration, validation and test from disjoint
modules; chunks of 256 tokens). Each compressed model is read back with
``rw.load(path, model=original)`` from :data:`smollm2.SAVED` (the baselines' files with their
architecture: ``rw.load(path, trust_pickle=True)``, files this benchmark wrote; nothing is recomputed) and
healed with ``rw.recover(compressed, original, calibration, method="lora", epochs=E)``, every
other option at its default (rank-8 corrections of the factors, sequential: output-side factors
then the others, ``E`` passes each; relative lr 1e-2; every 4th batch held out and the result
kept only if its token-level KL to the original there is lower). The healing text is the first
``--calibration`` chunks (16 by default) of the 32 calibration chunks every method was
compressed with, the same for every model; the test split (16 chunks) is never seen by
compression or healing. Nothing is tuned on the reported text.

Seconds: the ``rw.recover`` call. Peak RSS: the process's VmHWM when the row was written
(cumulative over the rows of one invocation).

    python bench/smollm2_healing_all.py --models rw-defaults-0.2,svd-llm-0.2,rw-defaults-0.4,svd-llm-0.4
"""

import argparse
import json
import os
import time

import torch

import rankwise as rw
import smollm2 as sm
from smollm2_report import LABELS
from environment import load_rows, write_result


def heal(model, calibration, test, key, suffix, epochs):
    """``(row, healed model)``: load ``key`` (``method-fraction``), perplexity before, heal, after."""
    path = sm.SAVED / f"{key}{suffix}.safetensors"
    method, _, fraction = key.rpartition("-")
    trusted = method in sm.BASELINES  # their files keep the architecture (smollm2.Bench.row)
    compressed = (rw.load(path, trust_pickle=True) if trusted else rw.load(path, model=model)).eval()
    before = sm.perplexity(compressed, test)
    print(f"{key}: test perplexity before {before:.2f}", flush=True)
    start = time.perf_counter()
    record = rw.recover(compressed, model, calibration, method="lora", epochs=epochs)
    seconds = time.perf_counter() - start
    print(record, flush=True)
    row = {"method": method, "fraction": float(fraction), "key": key, "test_before": before,
           "test_after": sm.perplexity(compressed, test), "seconds": seconds,
           "validation_kl_before": record.validation_before, "validation_kl_after": record.validation_after,
           "kept": record.kept, "epochs": epochs, "calibration_chunks": len(calibration),
           "learnables": rw.count_learnables(compressed), "peak_rss_gib": sm.rss_gib()[1]}
    print(json.dumps(row), flush=True)
    return row, compressed


def report(rows, reference):
    lines = [f"Original test perplexity **{reference:.2f}**.", "",
             "| model | removed | test ppl before | x original | after LoRA healing | x original | "
             "held-out KL before -> after (kept) | healing s | peak RSS GiB |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["fraction"], r["method"])):
        lines.append(f"| {LABELS.get(r['method'], r['method'])} | {r['fraction']:.0%} | {r['test_before']:.2f} | "
                     f"{r['test_before'] / reference:.2f}x | {r['test_after']:.2f} | {r['test_after'] / reference:.2f}x | "
                     f"{r['validation_kl_before']:.4f} -> {r['validation_kl_after']:.4f} "
                     f"({'kept' if r['kept'] else 'not kept'}) | {r['seconds']:.0f} | {r['peak_rss_gib']:.1f} |")
    lines += ["", "Targets (issue 22, with healing): within 1.5x of the original at 20%, 2.5x at 40% "
              "(rankwise defaults):", ""]
    for fraction, limit in ((0.2, 1.5), (0.4, 2.5)):
        row = next((r for r in rows if r["method"] == "rw-defaults" and r["fraction"] == fraction), None)
        if row is not None:
            ratio = row["test_after"] / reference
            lines.append(f"- {fraction:.0%}: healed {row['test_after']:.2f} = {ratio:.2f}x original (limit {limit}x): "
                         f"**{'reached' if ratio <= limit else 'NOT reached'}**")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="rw-defaults-0.2,svd-llm-0.2,rw-defaults-0.4,svd-llm-0.4",
                        help="comma-separated method-fraction keys of models saved by smollm2.py --save")
    parser.add_argument("--epochs", type=int, default=1, help="passes per LoRA phase")
    parser.add_argument("--calibration", type=int, default=16, help="the first this many calibration chunks")
    parser.add_argument("--quick", action="store_true", help="the models of smollm2.py --quick --save")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    profile = "quick" if args.quick else "full"
    suffix = "_quick" if args.quick else "_all"
    model, tokenizer = sm.smollm2()
    texts, _ = sm.splits(tokenizer, sm.PROFILES[profile])
    calibration, test = texts["calibration"][:args.calibration], texts["test"]
    reference = sm.perplexity(model, test)
    print(f"original test perplexity {reference:.2f}", flush=True)
    path = os.path.join(sm.RESULTS, f"smollm2_healing_all{'_quick' if args.quick else ''}.json")
    rows = load_rows(path)
    for key in filter(None, args.models.split(",")):
        row, healed = heal(model, calibration, test, key, suffix, args.epochs)
        row["continuation_after"] = sm.continuation(healed, tokenizer)
        del healed
        rows = [r for r in rows if r["key"] != key] + [row]
        with open(path, "w") as stream:
            json.dump(rows, stream, indent=1)
        write_result(path.removesuffix(".json") + ".md", "SmolLM2-135M: healing on all 30 decoder layers",
                     report(rows, reference))


if __name__ == "__main__":
    main()

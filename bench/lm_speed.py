"""Prefill and decode tokens per second of SmolLM2-135M on the CPU, original against compressed.

**Model and compression.** SmolLM2-135M-Instruct as :mod:`smollm2` caches it (float32). Every
Linear of the 30 decoder layers (210 layers, 106 168 320 learnables) is a candidate; one
``rw.NeuronPCA(model, calibration[:4], layer_names="model.layers.*", loss_fn=None,
validation=None)`` (4 chunks of 256 docstring tokens: the ranks are what matters for speed, and
this is the cheapest calibration that runs on this shared machine), then for each fraction ``f``
of the decoder Linears' learnables ``rw.compress_network_using_projection(model, npca,
learnables_reduction_goal=f x 106 168 320 / 134 515 008, layer_names="model.layers.*",
criterion="variance", allocation="global")``. The tied table and head stay dense (they are not
candidates here), so every speed difference comes from the decoder Linears.

**Latency-aware.** At 40% also ``latency_input={"input_ids": prompt of batch 1}``: every layer to be
projected is timed dense and projected on the inputs it receives at batch 1 prefill, and a
layer whose projected form is not faster is kept dense (:mod:`rankwise.latency_aware`); the goal
is then met by the layers that do gain, where possible.

**Speed.** :func:`rankwise.compare_generation_speed` on a prompt of ``PROMPT_TOKENS`` = 64 tokens
from the test split, at batch 1 and batch 8 (the same prompt repeated), ``NEW_TOKENS`` = 16
greedy decode steps with the cache, ``REPEATS`` = 3 timed measurements per model (medians),
after one warm-up. Threads: ``--threads`` (default 2, as the issue asks; the machine's 2 cores are
shared with other jobs, so the second thread is often busy: the timings are under load).

    python bench/lm_speed.py                # -> bench/results/lm_speed.{json,md}
    python bench/lm_speed.py --fractions 0.4 --threads 1
"""

import argparse
import json
import os
import time
import warnings

import torch

import rankwise as rw
from environment import write_result
from smollm2 import learnables_of, decoder_linear_names, rss_gib, smollm2, splits

PROMPT_TOKENS, NEW_TOKENS, REPEATS = 64, 16, 3
BATCHES = (1, 8)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def compressed_models(model, calibration, fractions, latency_prompt):
    """``{label: (model, info)}`` for each fraction, and the latency-aware 40%."""
    names = decoder_linear_names(model)
    decoder, total = learnables_of(model, names), rw.count_learnables(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # thin data: 1 024 tokens for widths up to 1 536
        npca = rw.NeuronPCA(model, calibration, layer_names="model.layers.*", loss_fn=None, validation=None,
                            verbosity="off")
        for fraction in fractions:
            options = dict(learnables_reduction_goal=fraction * decoder / total, layer_names="model.layers.*",
                           criterion="variance", allocation="global", verbosity="off")
            start = time.perf_counter()
            yield f"{fraction:.0%}", *rw.compress_network_using_projection(model, npca, **options), \
                time.perf_counter() - start
            if abs(fraction - 0.4) < 1e-9:
                start = time.perf_counter()
                yield "40% latency-aware", *rw.compress_network_using_projection(
                    model, npca, latency_input={"input_ids": latency_prompt}, **options), time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = smollm2()
    batches, _ = splits(tokenizer, {"calibration": 4, "test": 1})
    prompt = batches["test"][0]["input_ids"][:, :PROMPT_TOKENS]
    decoder = learnables_of(model, decoder_linear_names(model))
    rows = []
    for label, net, info, seconds in compressed_models(model, batches["calibration"], args.fractions, prompt):
        torch.set_num_threads(args.threads)
        removed = (info.learnables_before - info.learnables_after) / decoder
        kept_dense = len(info.kept_dense_for_latency)
        for batch in BATCHES:
            speed = rw.compare_generation_speed(model, net, prompt.repeat(batch, 1), new_tokens=NEW_TOKENS,
                                                repeats=REPEATS)
            rows.append({"compressed": label, "decoder_removed": removed, "kept_dense_for_latency": kept_dense,
                         "batch": batch, "threads": args.threads, "decision_seconds": seconds,
                         **{k: getattr(speed, k) for k in ("prefill_before", "prefill_after", "decode_before",
                                                           "decode_after", "prefill_speedup", "decode_speedup")},
                         "peak_rss_gib": rss_gib()[1]})
            print(label, speed, flush=True)
        torch.set_num_threads(1)
        del net
    with open(os.path.join(RESULTS, "lm_speed.json"), "w") as stream:
        json.dump(rows, stream, indent=1)
    lines = ["| compressed | decoder Linears removed | kept dense for latency | batch | prefill tokens/s "
             "original -> compressed | prefill speedup | decode tokens/s original -> compressed | decode speedup |",
             "|---|---:|---:|---:|---|---:|---|---:|"]
    lines += [f"| {r['compressed']} | {r['decoder_removed']:.1%} | {r['kept_dense_for_latency']} | {r['batch']} | "
              f"{r['prefill_before']:,.0f} -> {r['prefill_after']:,.0f} | {r['prefill_speedup']:.2f}x | "
              f"{r['decode_before']:.1f} -> {r['decode_after']:.1f} | {r['decode_speedup']:.2f}x |" for r in rows]
    write_result(os.path.join(RESULTS, "lm_speed.md"), "SmolLM2-135M: prefill and decode tokens/s",
                 "\n".join(lines) + f"\n\n{args.threads} torch thread(s) for the timings; prompt {PROMPT_TOKENS} "
                 f"tokens, {NEW_TOKENS} decode steps, median of {REPEATS}.\n")


if __name__ == "__main__":
    main()

"""Prefill and decode tokens per second of SmolLM2-135M on the CPU, original against compressed.

**What is compressed.** Every Linear of the 30 decoder layers (210 layers, 106 168 320
learnables) of SmolLM2-135M-Instruct as :mod:`smollm2` caches it (float32); the tied table and
head stay dense. A run's speed depends only on the shapes of the factored layers, so the
compressed models are built cheaply: each Linear ``W`` (``out x in``) at the fraction ``f`` of its
learnables removed becomes ``rw.ProjectedLinear.from_dense(layer, output_basis=U[:, :r])`` (the
library's output projection, ``Linear(in, r)`` then ``Linear(r, out)`` with a bias), ``U`` the
left singular vectors of ``W`` (data-free: the statistics would change the basis, not the
shapes), at the largest rank keeping at most ``(1 - f)`` of its learnables,
``r = floor(((1 - f) in out - out) / (in + out))``: what ``allocation="uniform"`` gives every
layer. (The library's own decisions over all 210 layers need more memory and time than this
shared machine had for this run: a first attempt through ``compress_network_using_projection``
on all of them had reached 7.7 GiB resident after 16 minutes without finishing the first goal.)

**Latency-aware.** The library's latency-aware path (``latency_input=``,
:mod:`rankwise.latency_aware`) on the 7 Linears of decoder layer 0 (one of each shape:
``q, o: 576 -> 576``, ``k, v: 576 -> 192``, ``gate, up: 576 -> 1536``, ``down: 1536 -> 576``):
``rw.NeuronPCA(model, calibration[:2], layer_names="model.layers.0.*", loss_fn=None,
validation=None)``, then ``rw.compress_network_using_projection(..., learnables_reduction_goal=f x
3 538 944 / 134 515 008, criterion="variance", allocation="uniform", latency_input={"input_ids":
prompt})`` at ``f = 0.4``, batch 1; the layer kinds it keeps dense (``info.kept_dense_for_latency``)
are then kept dense in all 30 decoder layers of the "40% latency-aware" model.

**Speed.** :func:`rankwise.compare_generation_speed` on a prompt of ``PROMPT_TOKENS`` = 64 tokens
of the test split, at batch 1 and batch 8 (the prompt repeated), ``NEW_TOKENS`` = 16 greedy decode
steps on the KV cache, ``REPEATS`` = 3 timed measurements per model (medians), one warm-up.
``--threads`` torch threads (default 2, as the issue asks; the machine's 2 cores are shared with
other jobs, so the timings are under load).

    python bench/lm_speed.py                # -> bench/results/lm_speed.{json,md}
"""

import argparse
import json
import os
import warnings

import torch

import rankwise as rw
from environment import write_result
from smollm2 import decoder_linear_names, learnables_of, smollm2, splits

PROMPT_TOKENS, NEW_TOKENS, REPEATS = 64, 16, 3
BATCHES = (1, 8)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def factored(model, fraction, keep_dense=()):
    """A copy of ``model`` with every decoder Linear (but the kinds ``keep_dense``) at ``fraction`` removed."""
    import copy
    net = copy.deepcopy(model)
    for name in decoder_linear_names(net):
        if name.rsplit(".", 1)[-1] in keep_dense:
            continue
        layer = net.get_submodule(name)
        out, width = layer.weight.shape
        rank = int(((1 - fraction) * out * width - out) // (out + width))
        basis = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)[0][:, :rank]
        net.set_submodule(name, rw.ProjectedLinear.from_dense(layer, output_basis=basis))
    return net


def latency_aware_kinds(model, calibration, prompt, fraction=0.4):
    """The kinds (``q_proj``, ...) the library's latency-aware path keeps dense on decoder layer 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        npca = rw.NeuronPCA(model, calibration, layer_names="model.layers.0.*", loss_fn=None, validation=None,
                            verbosity="off")
        goal = fraction * learnables_of(model, decoder_linear_names(model, (0,))) / rw.count_learnables(model)
        _, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=goal,
                                                       layer_names="model.layers.0.*", criterion="variance",
                                                       allocation="uniform", latency_input={"input_ids": prompt},
                                                       verbosity="off")
    timings = {name.rsplit(".", 1)[-1]: (p.dense_seconds, p.projected_seconds) for name, p in info.layers.items()}
    return tuple(name.rsplit(".", 1)[-1] for name in info.kept_dense_for_latency), timings


def model_and_prompt(threads, calibration_chunks):
    """SmolLM2, its split's batches (``calibration_chunks`` calibration chunks, one test chunk) and
    the prompt (the first :data:`PROMPT_TOKENS` test tokens), with ``threads`` torch threads."""
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model, tokenizer = smollm2()
    batches, _ = splits(tokenizer, {"calibration": calibration_chunks, "test": 1})
    return model, batches, batches["test"][0]["input_ids"][:, :PROMPT_TOKENS]


def speed_rows(model, net, prompt, label, threads, **extra):
    """One row per batch of :data:`BATCHES`: ``rw.compare_generation_speed`` of ``net`` against ``model``."""
    rows = []
    for batch in BATCHES:
        speed = rw.compare_generation_speed(model, net, prompt.repeat(batch, 1), new_tokens=NEW_TOKENS,
                                            repeats=REPEATS)
        rows.append({**extra, "batch": batch, "threads": threads,
                     **{k: getattr(speed, k) for k in ("prefill_before", "prefill_after", "decode_before",
                                                       "decode_after", "prefill_speedup", "decode_speedup")}})
        print(label, speed, flush=True)
    return rows


def speed_table(rows, key, header, removed_header="decoder Linears removed"):
    """The markdown table of :func:`speed_rows`' rows, ``rows[i][key]`` in the first column."""
    lines = [f"| {header} | {removed_header} | batch | prefill tokens/s original -> compressed | "
             "prefill speedup | decode tokens/s original -> compressed | decode speedup |",
             "|---|---:|---:|---|---:|---|---:|"]
    return lines + [f"| {r[key]} | {r['decoder_removed']:.1%} | {r['batch']} | "
                    f"{r['prefill_before']:,.0f} -> {r['prefill_after']:,.0f} | {r['prefill_speedup']:.2f}x | "
                    f"{r['decode_before']:.1f} -> {r['decode_after']:.1f} | {r['decode_speedup']:.2f}x |" for r in rows]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model, batches, prompt = model_and_prompt(args.threads, 2)
    kept, timings = latency_aware_kinds(model, batches["calibration"], prompt)
    print("latency-aware keeps dense:", kept, timings, flush=True)
    variants = [(f"{f:.0%}", f, ()) for f in args.fractions] + [("40% latency-aware", 0.4, kept)]
    rows, decoder = [], learnables_of(model, decoder_linear_names(model))
    for label, fraction, keep_dense in variants:
        net = factored(model, fraction, keep_dense)
        removed = (rw.count_learnables(model) - rw.count_learnables(net)) / decoder
        rows += speed_rows(model, net, prompt, label, args.threads, compressed=label, decoder_removed=removed,
                           kept_dense=list(keep_dense))
        del net
    with open(os.path.join(RESULTS, "lm_speed.json"), "w") as stream:
        json.dump({"latency_aware_kept_dense": kept, "layer0_timings": timings, "rows": rows}, stream, indent=1)
    lines = speed_table(rows, "compressed", "compressed")
    lines += ["", f"Latency-aware on decoder layer 0 at 40%, batch 1: kept dense {', '.join(kept) or 'none'}; "
              "dense -> projected seconds per layer: " + ", ".join(
                  f"{k} {d * 1e3:.2f} -> {p * 1e3:.2f} ms" for k, (d, p) in timings.items() if d is not None)]
    write_result(os.path.join(RESULTS, "lm_speed.md"), "SmolLM2-135M: prefill and decode tokens/s",
                 "\n".join(lines) + f"\n\n{args.threads} torch thread(s); prompt {PROMPT_TOKENS} tokens, "
                 f"{NEW_TOKENS} decode steps, median of {REPEATS}.\n")


if __name__ == "__main__":
    main()

"""Prefill and decode tokens per second of the library's own SmolLM2 compressions, against the original.

:mod:`lm_speed` times uniform-rank SVD factorizations (the shapes ``allocation="uniform"`` gives);
this script times the models the library actually decided: the files ``bench/smollm2.py --save``
writes with :func:`rankwise.save` (``~/.cache/rankwise-bench/smollm2-compressed/<method>-<fraction>
.safetensors``; ``--pattern`` picks them), each read back with ``rw.load(path, model=original)``
(nothing unpickled). Speed by :func:`rankwise.compare_generation_speed`: a prompt of
:data:`lm_speed.PROMPT_TOKENS` tokens of the test split at batch 1 and 8, :data:`lm_speed.NEW_TOKENS`
greedy decode steps on the KV cache, median of :data:`lm_speed.REPEATS`, ``--threads`` torch
threads (default 2).

    python bench/lm_speed_saved.py [--pattern 'rw-defaults-*.safetensors']   # -> bench/results/lm_speed_saved.{json,md}
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rankwise as rw  # noqa: E402
from environment import write_result  # noqa: E402
from lm_speed import NEW_TOKENS, PROMPT_TOKENS, REPEATS, model_and_prompt, speed_rows, speed_table  # noqa: E402
from smollm2 import SAVED, decoder_linear_names, learnables_of  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="rw-defaults-*.safetensors")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model, _, prompt = model_and_prompt(args.threads, 1)
    decoder = learnables_of(model, decoder_linear_names(model))
    rows = []
    for path in sorted(SAVED.glob(args.pattern)):
        net = rw.load(path, model=model).eval()
        removed = (rw.count_learnables(model) - rw.count_learnables(net)) / decoder
        rows += speed_rows(model, net, prompt, path.name, args.threads, file=path.name, decoder_removed=removed)
        del net
    if not rows:
        raise SystemExit(f"no file matches {args.pattern!r} in {SAVED}: run bench/smollm2.py --save first")
    with open(os.path.join(RESULTS, "lm_speed_saved.json"), "w") as stream:
        json.dump(rows, stream, indent=1)
    lines = speed_table(rows, "file", "file", "learnables removed / decoder Linears'")
    write_result(os.path.join(RESULTS, "lm_speed_saved.md"), "SmolLM2-135M: the library's compressions, tokens/s",
                 "\n".join(lines) + f"\n\n{args.threads} torch thread(s); prompt {PROMPT_TOKENS} tokens, "
                 f"{NEW_TOKENS} decode steps, median of {REPEATS}.\n")


if __name__ == "__main__":
    main()

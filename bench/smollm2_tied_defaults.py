"""SmolLM2-135M at 20% of ALL learnables with every option at its default, the tied table a candidate.

The same candidates as :mod:`smollm2_tied` (``model.embed_tokens``, tied to ``lm_head``, and the
Linears of decoder layers ``0, 3, ..., 27``), the same text and splits as :mod:`smollm2`; but
``rw.NeuronPCA(model, calibration, layer_names=names)`` and
``rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.2,
layer_names=names)`` with nothing else set: ``loss_fn="auto"``, ``validation="auto"`` (every
fourth calibration chunk held out), ``criterion="auto"``, ``allocation="auto"``. The measured
choice scores its candidates on the held-out calibration chunks; the reported perplexity is on
the test chunks, which no decision saw.

    OMP_NUM_THREADS=2 python bench/smollm2_tied_defaults.py   # -> bench/results/smollm2_tied_defaults.json
"""

import json
import os
import time
import warnings

import torch

import rankwise as rw
from smollm2 import continuation, decoder_linear_names, perplexity, rss_gib, smollm2, splits

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TABLE = "model.embed_tokens"


def main():
    torch.manual_seed(0)
    model, tokenizer = smollm2()
    batches, _ = splits(tokenizer, {"calibration": 32, "validation": 8, "test": 16})
    names = [TABLE] + decoder_linear_names(model, tuple(range(0, 30, 3)))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # thin-data warnings: 8 192 tokens for 49 152 rows
        npca = rw.NeuronPCA(model, batches["calibration"], layer_names=names, verbosity="off")
    calibration = time.perf_counter() - start
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.2,
                                                         layer_names=names, verbosity="off")
    row = {"threads": torch.get_num_threads(), "choice": str(info.choice),
           "candidates": [{"candidate": str(c.candidate), "score": c.score} for c in info.candidates],
           "learnables_reduction": info.learnables_reduction, "table_rank": info.layers[TABLE].rank_out,
           "tie_kept": net.get_input_embeddings().table is net.get_output_embeddings().table,
           "perplexity": perplexity(net, batches["test"]), "calibration_seconds": calibration,
           "decision_seconds": time.perf_counter() - start, "peak_rss_gib": rss_gib()[1],
           "continuation": continuation(net, tokenizer)}
    print(json.dumps(row, indent=1), flush=True)
    with open(os.path.join(RESULTS, "smollm2_tied_defaults.json"), "w") as handle:
        json.dump(row, handle, indent=1)


if __name__ == "__main__":
    main()

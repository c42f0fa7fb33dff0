"""all-MiniLM-L6-v2 against the papers' low-rank baselines, no fine-tuning (issue 13).

The network, sentences and splits are those of bench/pretrained.py (bench/pretrained_data.py):
calibration 256 docstring sentences of six standard-library modules (one sentence per batch,
so no padding enters a statistic), validation 128 and test 256 sentences of other modules,
evaluated in padded batches of 32 with attention masks. Budgets are fractions of ALL of
MiniLM's learnables (22.7M, the token table's 11.7M included). Scores, against the original
network on the same sentences:

- **cosine**: the mean cosine of the mean-pooled sentence embeddings to the original's;
- **nearest-neighbour agreement**: for each sentence of the split, whether its nearest
  neighbour (by cosine) among the split's other sentences is the same for the compressed
  network as for the original.

Methods (bench/lowrank_baselines.py for the mathematics; one rank ratio for every layer):
``svd``, ``asvd``, ``svd-llm`` on the encoder's Linear layers (the unused pooler stays), and the
same with ``+emb``, which factors the token table too (a trivial extension: the table is the
weight of a Linear on one-hot tokens). rankwise: ``rw-variance+emb`` is
``rw.compress_network_using_projection(model, npca, learnables_reduction_goal=g)`` with the
library's defaults (variance criterion, global allocation) on the encoder Linears and the token
table; ``rw-loss+emb`` the same with ``criterion="loss"`` and ``NeuronPCA(..., loss_fn="mse")``.
Nothing is tuned: ASVD's ``alpha = 0.5`` is the paper's, the rest are defaults.

    python bench/minilm_baselines.py --threads 2
    python bench/minilm_baselines.py --methods svd,asvd --budgets 0.1
"""

import argparse
import json
import os
import time
import warnings

import torch
import torch.nn.functional as F

import lowrank_baselines as lb
import pretrained as bench
import rankwise as rw
from environment import write_result

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROWS = os.path.join(RESULTS, "minilm_baselines.json")
BUDGETS = (0.1, 0.2, 0.3, 0.4)
BASELINES = ("svd", "asvd", "svd-llm")
METHODS = BASELINES + tuple(f"{m}+emb" for m in BASELINES) + ("rw-variance+emb", "rw-loss+emb")


def nearest_neighbours(embeddings):
    """Index of each row's nearest other row by cosine."""
    unit = F.normalize(embeddings.double(), dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-2.0)
    return similarity.argmax(1)


def scores(output, reference):
    """``(cosine, nearest-neighbour agreement)`` of embeddings `output` against `reference`."""
    cosine = float(F.cosine_similarity(output, reference, dim=1).mean())
    agreement = float((nearest_neighbours(output) == nearest_neighbours(reference)).double().mean())
    return cosine, agreement


class Baselines:
    """The decompositions of each baseline for the network (input statistics gathered once)."""

    def __init__(self, network):
        self.network = network
        self.linears = list(network.layers)
        names = self.linears + [bench.EMBEDDING[network.name]]
        self.statistics = lb.input_statistics(network.model, names, network.calibration, network.run)
        self._svds = {}

    def compress(self, method, budget):
        base, _, option = method.partition("+")
        names = self.linears + ([bench.EMBEDDING[self.network.name]] if option == "emb" else [])
        if base not in self._svds:
            all_names = self.linears + [bench.EMBEDDING[self.network.name]]
            self._svds[base] = lb.decompositions(self.network.model, all_names, base, self.statistics)
        return lb.compress(self.network.model, budget, {n: self._svds[base][n] for n in names})


def evaluate(network, model):
    """``{split: {"cosine": c, "neighbours": a}}`` on validation and test."""
    result = {}
    with torch.no_grad():
        for split, batches in network.splits.items():
            output = torch.cat([network.run(model, b) for b in batches])
            cosine, agreement = scores(output, torch.cat(network.reference[split]))
            result[split] = {"cosine": cosine, "neighbours": agreement}
    return result


def cell(row, split):
    return f"{row[split]['cosine']:.3f} / {row[split]['neighbours']:.3f} ({100 * row['removed']:.1f}%)"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    network = bench.minilm_network(quick=False)
    baselines, statistics = None, bench.Statistics(network)
    rows = bench.load_rows(ROWS)
    for method in args.methods.split(","):
        if not method.startswith("rw-") and baselines is None:
            baselines = Baselines(network)
        for budget in map(float, args.budgets.split(",")):
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compressed = (bench.library_compress(network, statistics, method, budget) if method.startswith("rw-")
                              else baselines.compress(method, budget))
            row = {"network": network.name, "method": method, "budget": budget,
                   "seconds": time.perf_counter() - start,
                   "removed": 1 - rw.count_learnables(compressed) / network.learnables, **evaluate(network, compressed)}
            print(json.dumps(row), flush=True)
            rows = bench.save_rows(ROWS, rows, [row])
    body = ("Cells: mean cosine to the original's sentence embeddings / nearest-neighbour agreement "
            "(fraction of all learnables actually removed). No fine-tuning; nothing tuned. "
            "The original scores 1.000 / 1.000 by definition.\n\n"
            f"## Test split (256 sentences)\n\n{bench.table(rows, network.name, 'test', cell)}\n\n"
            f"## Validation split (128 sentences)\n\n{bench.table(rows, network.name, 'validation', cell)}")
    write_result(os.path.join(RESULTS, "minilm_baselines.md"), "MiniLM against the papers' low-rank baselines", body)


if __name__ == "__main__":
    main()

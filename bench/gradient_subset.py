"""Gradient statistics from a subset of batches: what it costs and what it changes in the decisions.

all-MiniLM-L6-v2 (as ``bench/calibration_cost.py`` loads it), 64 calibration sentences in
padded batches of 8 and, with ``--sentences 128``, more. One thread. For ``every`` in
``--every`` (default 1, 2, 4): ``NeuronPCA(model, batches, loss_fn="auto", validation=None)``
with the backward pass on every ``every``-th batch only
(``rankwise.statistics.calibration.AUTO_GRADIENT_EVERY``, the default's 4, set for the run), its CPU seconds against the variance pass
(``loss_fn=None``), then ``compress_network_using_projection(..., criterion="loss",
allocation="global", learnables_reduction_goal=0.5)`` and: the ranks chosen, how many layers'
ranks differ from ``every=1``'s, and the mean-pooled embedding's cosine similarity to the
original on 64 held-out test sentences (never used for calibration or choices).

    python bench/gradient_subset.py          # writes bench/results/gradient_subset.md
"""

import argparse
import os
import sys
import time

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

from environment import write_result  # noqa: E402
from pretrained_data import mean_pooled, minilm, sentence_split, tokenize  # noqa: E402

RESULT = os.path.join(BENCH, "results", "gradient_subset.md")


def cpu(call):
    start = time.process_time()
    result = call()
    return result, time.process_time() - start


def cosine(model, original, batches) -> float:
    with torch.no_grad():
        a = torch.cat([mean_pooled(model, b) for b in batches])
        b = torch.cat([mean_pooled(original, b) for b in batches])
    return float(torch.nn.functional.cosine_similarity(a, b).mean())


def main():
    import rankwise as rw
    import rankwise.statistics.calibration as calibration

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--sentences", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = minilm()
    batches = tokenize(tokenizer, sentence_split("calibration", args.sentences), 8)
    test = tokenize(tokenizer, sentence_split("test", 64), 32)
    _, variance = cpu(lambda: rw.NeuronPCA(model, batches, verbosity="off", loss_fn=None, validation=None))
    rows, reference = [], None
    for every in args.every:
        calibration.AUTO_GRADIENT_EVERY = every  # read by the calibration pass when loss_fn="auto"
        npca, seconds = cpu(lambda: rw.NeuronPCA(model, batches, verbosity="off", loss_fn="auto", validation=None))
        net, info = rw.compress_network_using_projection(model, npca, criterion="loss", allocation="global",
                                                         learnables_reduction_goal=0.5, verbosity="off")
        ranks = {name: layer.rank_out for name, layer in info.layers.items()}
        reference = reference or ranks
        changed = sum(ranks[name] != reference[name] for name in ranks)
        rows.append(f"| {every} | {npca.gradient_samples} | {seconds:.2f} | {seconds / variance:.2f}x "
                    f"| {info.learnables_reduction:.3f} | {changed} / {len(ranks)} "
                    f"| {cosine(net, model, test):.4f} |")
        print(rows[-1], flush=True)
    body = (f"all-MiniLM-L6-v2, {args.sentences} calibration sentences (batches of 8), one thread; variance pass "
            f"(`loss_fn=None`) {variance:.2f} CPU s. *every*: the backward pass on every k-th batch.\n\n"
            "| every | gradient samples | NeuronPCA CPU s | x variance pass | learnables removed "
            "| layers whose rank differs from every=1 | test cosine to the original |\n"
            "|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
            + f"\n\nCommand: `python bench/gradient_subset.py {' '.join(sys.argv[1:])}`\n")
    write_result(RESULT, "Gradient statistics from a subset of batches", body)


if __name__ == "__main__":
    main()

"""Accuracy after compression without fine-tuning: rankwise projection vs truncated SVD.

For the pretrained MNIST CNN and MLP (`rankwise.examples.pretrained_mnist`), at each
learnables reduction goal: rankwise (NeuronPCA calibrated on the first 4096 training images)
and the data-free uniform truncated-SVD baseline of `svd_baseline` at the learnables closest
to what rankwise achieved. Test accuracy on the 10 000 MNIST test images.

rankwise three ways (issue 21): its defaults (``NeuronPCA(model, batches)``, then no option
set: the measured decisions, every fourth batch held out; the batches are bare image tensors,
so the automatic score is the relative error of the logits), the same with ``score_fn="kl"``,
and the defaults before issue 21 (``NeuronPCA(..., loss_fn=None, validation=None)``,
``criterion="variance", allocation="global"``).

Run from the repository root: ``python bench/projection_quality.py``.
Writes ``bench/results/projection_quality.md``.
"""

import argparse
import os

import torch

import rankwise as rw
from environment import write_result
from rankwise.datasets import load_mnist
from rankwise.examples import accuracy, pretrained_mnist
from svd_baseline import match_learnables, svd_compress

GOALS = (0.5, 0.8, 0.9, 0.95)
CALIBRATION_IMAGES = 4096
BATCH_SIZE = 256
RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "projection_quality.md")


def compare(model, npca, old_npca, goal, test_images, test_labels):
    """One row: rankwise (defaults, defaults with the KL score, old defaults) and SVD at `goal`."""
    net, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=goal,
                                                     verbosity="off")
    kl_net, kl_info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=goal,
                                                           verbosity="off", score_fn="kl")
    old_net, old_info = rw.compress_network_using_projection(model, old_npca, learnables_reduction_goal=goal,
                                                             verbosity="off", criterion="variance",
                                                             allocation="global")
    fraction, svd_learnables = match_learnables(model, info.learnables_after)
    return {
        "goal": goal,
        "rankwise_learnables": info.learnables_after,
        "rankwise_reduction": info.learnables_reduction,
        "rankwise_accuracy": accuracy(net, test_images, test_labels),
        "rankwise_choice": info.measured.chosen.label if info.measured else "",
        "kl_reduction": kl_info.learnables_reduction,
        "kl_accuracy": accuracy(kl_net, test_images, test_labels),
        "kl_choice": kl_info.measured.chosen.label if kl_info.measured else "",
        "old_reduction": old_info.learnables_reduction,
        "old_accuracy": accuracy(old_net, test_images, test_labels),
        "svd_learnables": svd_learnables,
        "svd_reduction": 1 - svd_learnables / info.learnables_before,
        "svd_fraction": fraction,
        "svd_accuracy": accuracy(svd_compress(model, fraction), test_images, test_labels),
    }


def markdown_table(name, original_learnables, original_accuracy, rows):
    """The markdown table of one network, accuracies in percent and changes in points."""
    lines = [
        f"## MNIST {name}: {original_learnables:,} learnables, test accuracy {original_accuracy:.2%}",
        "",
        "| goal | rankwise learnables (removed) | rankwise defaults: accuracy (change) "
        "| defaults + score_fn='kl' (removed) | old defaults (removed) "
        "| SVD learnables (removed) | SVD rank kept | SVD accuracy (change) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['goal']:.0%} "
            f"| {row['rankwise_learnables']:,} ({row['rankwise_reduction']:.2%}) "
            f"| {row['rankwise_accuracy']:.2%} ({100 * (row['rankwise_accuracy'] - original_accuracy):+.2f}) "
            f"| {row['kl_accuracy']:.2%} ({100 * (row['kl_accuracy'] - original_accuracy):+.2f}; "
            f"{row['kl_reduction']:.2%}) "
            f"| {row['old_accuracy']:.2%} ({100 * (row['old_accuracy'] - original_accuracy):+.2f}; "
            f"{row['old_reduction']:.2%}) "
            f"| {row['svd_learnables']:,} ({row['svd_reduction']:.2%}) "
            f"| {row['svd_fraction']:.1%} "
            f"| {row['svd_accuracy']:.2%} ({100 * (row['svd_accuracy'] - original_accuracy):+.2f}) |")
    lines += ["", "Chosen by the defaults (relative error / KL score):", ""]
    lines += [f"- {row['goal']:.0%}: {row['rankwise_choice']} / {row['kl_choice']}" for row in rows]
    return "\n".join(lines)


def benchmark(name, batches, test_images, test_labels):
    """Calibrate network `name` once and compare both methods at every goal."""
    model = pretrained_mnist(name)
    npca = rw.NeuronPCA(model, batches, verbosity="off")
    old_npca = rw.NeuronPCA(model, batches, verbosity="off", loss_fn=None, validation=None)
    original = accuracy(model, test_images, test_labels)
    rows = [compare(model, npca, old_npca, goal, test_images, test_labels) for goal in GOALS]
    return markdown_table(name, rw.count_learnables(model), original, rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--quick", action="store_true", help="the 50%% and 90%% goals only, the CNN only; "
                        "writes projection_quality_quick.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global GOALS
    if args.quick:
        GOALS = (0.5, 0.9)
    train_images, _ = load_mnist("train")
    test_images, test_labels = load_mnist("test")
    batches = list(train_images[:CALIBRATION_IMAGES].split(BATCH_SIZE))
    tables = [benchmark(name, batches, test_images, test_labels) for name in (("cnn",) if args.quick else ("cnn", "mlp"))]
    notes = (
        "Test accuracy on the 10 000 MNIST test images, no fine-tuning; changes in accuracy "
        "points against the original network. rankwise: `NeuronPCA` calibrated on the first "
        f"{CALIBRATION_IMAGES} training images ({len(batches)} batches of {BATCH_SIZE}), then "
        "`compress_network_using_projection(model, npca, learnables_reduction_goal=goal)` with no option set "
        "(the measured decisions: every fourth batch held out, candidates scored by the relative error of "
        "the logits, the batches being bare images), the same with `score_fn='kl'` (accuracy and change; "
        "learnables removed), and the old defaults (`NeuronPCA(..., loss_fn=None, validation=None)`, "
        "`criterion='variance', allocation='global'`). "
        "SVD: data-free truncated SVD of every Linear/Conv2d weight keeping the same fraction of "
        "each layer's rank (a layer stays dense where the factored form is not smaller), the "
        "fraction bisected so the network's learnables are as close as possible to rankwise's "
        "(`bench/svd_baseline.py`)."
    )
    write_result(RESULT.replace(".md", "_quick.md") if args.quick else RESULT, "Projection quality on MNIST", notes + "\n\n" + "\n\n".join(tables))


if __name__ == "__main__":
    main()

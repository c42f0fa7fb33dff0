"""Accuracy after compression without fine-tuning: rankwise projection vs truncated SVD.

For the pretrained MNIST CNN and MLP (`rankwise.examples.pretrained_mnist`), at each
learnables reduction goal: rankwise (NeuronPCA calibrated on the first 4096 training images)
and the data-free uniform truncated-SVD baseline of `svd_baseline` at the learnables closest
to what rankwise achieved. Test accuracy on the 10 000 MNIST test images.

Run from the repository root: ``python bench/projection_quality.py``.
Writes ``bench/results/projection_quality.md``.
"""

import os

import rankwise as rw
from environment import write_result
from rankwise.datasets import load_mnist
from rankwise.examples import accuracy, pretrained_mnist
from svd_baseline import match_learnables, svd_compress

GOALS = (0.5, 0.8, 0.9, 0.95)
CALIBRATION_IMAGES = 4096
BATCH_SIZE = 256
RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "projection_quality.md")


def compare(model, npca, goal, test_images, test_labels):
    """One row: rankwise and SVD at `goal`, as a dict of numbers."""
    net, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=goal,
                                                     verbosity="off")
    fraction, svd_learnables = match_learnables(model, info.learnables_after)
    return {
        "goal": goal,
        "rankwise_learnables": info.learnables_after,
        "rankwise_reduction": info.learnables_reduction,
        "rankwise_accuracy": accuracy(net, test_images, test_labels),
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
        "| goal | rankwise learnables (removed) | rankwise accuracy (change) "
        "| SVD learnables (removed) | SVD rank kept | SVD accuracy (change) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['goal']:.0%} "
            f"| {row['rankwise_learnables']:,} ({row['rankwise_reduction']:.2%}) "
            f"| {row['rankwise_accuracy']:.2%} ({100 * (row['rankwise_accuracy'] - original_accuracy):+.2f}) "
            f"| {row['svd_learnables']:,} ({row['svd_reduction']:.2%}) "
            f"| {row['svd_fraction']:.1%} "
            f"| {row['svd_accuracy']:.2%} ({100 * (row['svd_accuracy'] - original_accuracy):+.2f}) |")
    return "\n".join(lines)


def benchmark(name, batches, test_images, test_labels):
    """Calibrate network `name` once and compare both methods at every goal."""
    model = pretrained_mnist(name)
    npca = rw.NeuronPCA(model, batches, verbosity="off")
    original = accuracy(model, test_images, test_labels)
    rows = [compare(model, npca, goal, test_images, test_labels) for goal in GOALS]
    return markdown_table(name, rw.count_learnables(model), original, rows)


def main():
    train_images, _ = load_mnist("train")
    test_images, test_labels = load_mnist("test")
    batches = list(train_images[:CALIBRATION_IMAGES].split(BATCH_SIZE))
    tables = [benchmark(name, batches, test_images, test_labels) for name in ("cnn", "mlp")]
    notes = (
        "Test accuracy on the 10 000 MNIST test images, no fine-tuning; changes in accuracy "
        "points against the original network. rankwise: `NeuronPCA` calibrated on the first "
        f"{CALIBRATION_IMAGES} training images ({len(batches)} batches of {BATCH_SIZE}), then "
        "`compress_network_using_projection(model, npca, learnables_reduction_goal=goal)`. "
        "SVD: data-free truncated SVD of every Linear/Conv2d weight keeping the same fraction of "
        "each layer's rank (a layer stays dense where the factored form is not smaller), the "
        "fraction bisected so the network's learnables are as close as possible to rankwise's "
        "(`bench/svd_baseline.py`)."
    )
    write_result(RESULT, "Projection quality on MNIST", notes + "\n\n" + "\n\n".join(tables))


if __name__ == "__main__":
    main()

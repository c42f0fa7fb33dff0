"""One-shot projection, one-shot plus fine-tuning, and incremental compression on MNIST.

The question (issue 5): after projection and fine-tuning a CNN lost far more than a fully
connected network trained on the same task, and its losses diverged during fine-tuning. For
the pretrained MNIST CNN and MLP (`rankwise.examples.pretrained_mnist`) and learnables
reduction goals from 0.5 to 0.95, this measures

- one-shot: `compress_network_using_projection`, no training;
- one-shot + fine-tuning: the same, then `rw.fine_tune` for 3 epochs (validation set given:
  best weights restored, early stop on divergence);
- incremental: `rw.compress_incrementally` (largest layer first, 1 epoch of fine-tuning per
  step with the validation set given, tolerance 0.3 accuracy points on the validation set).

Data: calibration on 2048 training images; fine-tuning on 10 000 training images. The
pretrained networks were trained on all 60 000 training images, so held-out data comes from
the test split: its first 5000 images are the validation set (fine-tuning's best weights and
early stop, incremental's `eval_fn`), and the accuracy reported is on its last 5000 images,
never used for any decision.

Run from the repository root: ``python bench/incremental_compression.py``.
Writes ``bench/results/incremental_compression.md`` and ``incremental_compression_losses.png``.
"""

import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import rankwise as rw  # noqa: E402
from environment import write_result  # noqa: E402
from rankwise.datasets import load_mnist  # noqa: E402
from rankwise.examples import accuracy, pretrained_mnist  # noqa: E402

GOALS = (0.5, 0.8, 0.9, 0.95)
FINE_TUNE_EPOCHS = 3
TOLERANCE = 0.003
BATCH = 128
HERE = os.path.dirname(os.path.abspath(__file__))
RESULT = os.path.join(HERE, "results", "incremental_compression.md")
PLOT = os.path.join(HERE, "results", "incremental_compression_losses.png")


def batches(images, labels):
    return list(zip(images.split(BATCH), labels.split(BATCH)))


def splits():
    images, labels = load_mnist("train")
    test_images, test_labels = load_mnist("test")
    calibration = list(images[:2048].split(256))
    train = batches(images[:10_000], labels[:10_000])
    val_set = test_images[:5000], test_labels[:5000]
    report_set = test_images[5000:], test_labels[5000:]
    return calibration, train, batches(*val_set), val_set, report_set


def run_network(name, calibration, train, val, val_set, test):
    torch.manual_seed(0)
    model = pretrained_mnist(name, verbose=False)
    original = accuracy(model, *test)
    npca = rw.NeuronPCA(model, calibration, verbosity="off")
    rows, curves = [], {}
    for goal in GOALS:
        start = time.perf_counter()
        one_shot, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=goal,
                                                              verbosity="off")
        one_shot_accuracy = accuracy(one_shot, *test)
        tuned = rw.fine_tune(one_shot, train, epochs=FINE_TUNE_EPOCHS, val_data=val, progress=False)
        tuned_accuracy, one_shot_seconds = accuracy(one_shot, *test), time.perf_counter() - start
        curves[goal] = tuned
        start = time.perf_counter()
        incremental, history = rw.compress_incrementally(
            model, calibration, train_data=train, eval_fn=lambda m: accuracy(m, *val_set),
            learnables_reduction_goal=goal, tolerance=TOLERANCE, val_data=val, verbosity="off")
        rows.append({
            "goal": goal, "learnables": info.learnables_after, "reduction": info.learnables_reduction,
            "one_shot": one_shot_accuracy, "tuned": tuned_accuracy, "one_shot_seconds": one_shot_seconds,
            "stopped_early": tuned.stopped_early, "best_epoch": tuned.best_epoch,
            "incremental": accuracy(incremental, *test), "incremental_learnables": history.final_learnables,
            "incremental_reduction": history.learnables_reduction, "goal_reached": history.goal_reached,
            "skipped": history.skipped_layers, "incremental_seconds": time.perf_counter() - start,
            "steps": len(history.steps),
        })
    return original, rw.count_learnables(model), rows, curves


def table(name, original, learnables, rows):
    points = lambda a: f"{a:.2%} ({100 * (a - original):+.2f})"  # noqa: E731
    lines = [f"### MNIST {name}: {learnables:,} learnables, accuracy {original:.2%} on the last 5000 "
             "test images", "",
             "| goal | one-shot learnables (removed) | one-shot | one-shot + FT (best epoch, 0 = none) "
             "| incremental learnables (removed) | incremental | skipped layers | time one-shot+FT / incremental |",
             "|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(
            f"| {r['goal']:.0%} | {r['learnables']:,} ({r['reduction']:.1%}) | {points(r['one_shot'])} "
            f"| {points(r['tuned'])} ({r['best_epoch']}{', stopped early' if r['stopped_early'] else ''}) "
            f"| {r['incremental_learnables']:,} ({r['incremental_reduction']:.1%}"
            f"{'' if r['goal_reached'] else ', goal not reached'}) | {points(r['incremental'])} "
            f"| {', '.join(r['skipped']) or '-'} | {r['one_shot_seconds']:.0f} s / {r['incremental_seconds']:.0f} s |")
    return "\n".join(lines)


def plot(all_curves):
    figure, axes = plt.subplots(1, len(all_curves), figsize=(5 * len(all_curves), 3.5), squeeze=False)
    for ax, (name, curves) in zip(axes[0], all_curves.items()):
        for goal, history in curves.items():
            epochs = range(1, len(history.train_loss) + 1)
            line, = ax.plot(epochs, history.train_loss, "o-", label=f"{goal:.0%} train")
            ax.plot(epochs, history.val_loss, "s--", color=line.get_color(), label=f"{goal:.0%} val")
        ax.set(title=f"{name}: fine-tuning after one-shot projection", xlabel="epoch",
               ylabel="cross-entropy", yscale="log")
        ax.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(PLOT, dpi=100)


def main():
    calibration, train, val, val_set, test = splits()
    sections, all_curves = [], {}
    for name in ("cnn", "mlp"):
        original, learnables, rows, curves = run_network(name, calibration, train, val, val_set, test)
        sections.append(table(name.upper(), original, learnables, rows))
        all_curves[name.upper()] = curves
    plot(all_curves)
    write_result(RESULT, "Incremental compression against one-shot projection (MNIST)",
                 "\n\n".join(sections) + f"\n\nLoss curves: `{os.path.relpath(PLOT, HERE)}`.")


if __name__ == "__main__":
    main()

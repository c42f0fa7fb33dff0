"""Recovery after compression on a CNN with BatchNorm (issue 23): each option against none.

The network: rankwise's small ResNet for MNIST (`rankwise.examples.pretrained_mnist("small_resnet")`,
three convolutions with BatchNorm in two residual blocks, 73 082 learnables, trained here on the
60 000 training images). It is compressed with the defaults (`rw.compress_network_using_projection`,
the measured choice) at 90% and 95% of its learnables removed, calibrated on the first N training
images (N = 1,000 and 5,000), and recovered on those same N images:

- none; ``rw.recalibrate_batchnorm`` alone;
- the old behaviour: ``rw.fine_tune`` with the labels, BatchNorm in train mode (``batchnorm="train"``),
  and the same with ``batchnorm="frozen"``: training and validation losses per epoch, to see
  the divergence and what removes it;
- ``rw.recover`` with ``method="logits"``, ``"features"`` and ``"lora"`` (BatchNorm ``"auto"``:
  measured on the held-out batches, ``"train"`` when re-estimated statistics score better than
  the stored ones, else ``"frozen"``), and ``"logits"`` with ``batchnorm="frozen"`` / ``"reestimate"``.

Held-out data: ``rw.recover`` holds out every 4th of the N images' batches by itself; the
fine-tuning rows get the same batches as ``val_data``. Nothing is chosen on the test set: the
10,000 test images are only used for the accuracy reported.

Run from the repository root: ``OMP_NUM_THREADS=1 python bench/recovery_mnist.py`` (about 10 min
at 1 thread); ``--quick`` runs N = 1,000 at 95% with 2 epochs; ``--images``, ``--goals``, ``--epochs``,
``--only "recover logits"`` and ``--output`` select a part. Writes ``bench/results/recovery_mnist.md``.
"""

import argparse
import copy
import time
import warnings

import torch

import rankwise as rw
from environment import write_result
from rankwise.datasets import load_mnist
from rankwise.examples import accuracy, pretrained_mnist
from rankwise.holdout import HeldOutSplit

BATCH = 64


def options(epochs):
    """(label, function(compressed, original, batches, fitted, held_out) -> note)."""
    def fine_tune(batchnorm):
        def run(net, original, batches, fitted, held_out):
            h = rw.fine_tune(net, fitted, epochs=epochs, val_data=held_out, batchnorm=batchnorm, progress=False)
            losses = " ".join(f"{t:.3f}/{v:.3f}" for t, v in zip(h.train_loss, h.val_loss))
            return f"train/val loss per epoch {losses}; best epoch {h.best_epoch}"
        return run

    def recover(method, batchnorm="auto"):
        def run(net, original, batches, fitted, held_out):
            r = rw.recover(net, original, batches, method=method, epochs=epochs, batchnorm=batchnorm, progress=False)
            return (f"val KL {r.validation_before:.3f} -> {r.validation_after:.3f} "
                    f"({'kept' if r.kept else 'not kept'}), batchnorm={r.batchnorm}"
                    + (" (measured)" if batchnorm == "auto" else ""))
        return run

    def recalibrate(net, original, batches, fitted, held_out):
        rw.recalibrate_batchnorm(net, fitted)
        return "running statistics re-estimated on the fitted batches"

    return [("none", lambda *a: ""), ("recalibrate_batchnorm", recalibrate),
            ("fine_tune labels, batchnorm=train (old)", fine_tune("train")),
            ("fine_tune labels, batchnorm=frozen", fine_tune("frozen")),
            ("recover logits", recover("logits")), ("recover features", recover("features")),
            ("recover lora", recover("lora")),
            ("recover logits, batchnorm=frozen", recover("logits", "frozen")),
            ("recover logits, batchnorm=reestimate", recover("logits", "reestimate"))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--images", default="1000,5000")
    parser.add_argument("--goals", default="0.90,0.95")
    parser.add_argument("--only", default=None, help="comma-separated option labels to run (default: all)")
    parser.add_argument("--output", default="bench/results/recovery_mnist.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    counts, goals = [int(c) for c in args.images.split(",")], [float(g) for g in args.goals.split(",")]
    counts, goals, epochs = ((1000,), (0.95,), 2) if args.quick else (counts, goals, args.epochs)
    chosen = None if args.only is None else set(args.only.split(","))
    original = pretrained_mnist("small_resnet", verbose=False)
    images, labels = load_mnist("train")
    test_images, test_labels = load_mnist("test")
    reference = accuracy(original, test_images, test_labels)
    rows = []
    for count in counts:
        batches = [(images[i:i + BATCH], labels[i:i + BATCH]) for i in range(0, count, BATCH)]
        split = HeldOutSplit(batches, "auto")
        fitted = list(split)
        held_out = list(split.held_out)
        for goal in goals:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compressed, info = rw.compress_network_using_projection(
                    original, batches, learnables_reduction_goal=goal, verbosity="off")
            for label, run in options(epochs):
                if chosen is not None and label not in chosen:
                    continue
                net = copy.deepcopy(compressed)
                torch.manual_seed(0)
                start = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    note = run(net, original, batches, fitted, held_out)
                small = any(issubclass(w.category, rw.SmallBatchNormDataWarning) for w in caught)
                acc = accuracy(net, test_images, test_labels)
                rows.append((count, f"{info.learnables_reduction:.1%}", label, acc, acc - reference,
                             time.perf_counter() - start, note + ("; warned: few samples" if small else "")))
                print(rows[-1], flush=True)
    lines = [f"original test accuracy {reference:.2%} ({rw.count_learnables(original):,} learnables); "
             f"{epochs} epochs per training option; 1 torch thread", "",
             "| images | removed | recovery | test accuracy | vs original | s | notes |",
             "|---:|---:|---|---:|---:|---:|---|"]
    lines += [f"| {c:,} | {r} | {label} | {a:.2%} | {d * 100:+.2f} pt | {s:.1f} | {n} |"
              for c, r, label, a, d, s, n in rows]
    write_result(args.output, "Recovery after compression: small ResNet (BatchNorm) on MNIST",
                 "\n".join(lines))


if __name__ == "__main__":
    main()

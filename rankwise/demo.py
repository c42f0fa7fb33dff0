"""Compress two trained MNIST networks by projection and show what it costs and gains.

Run with ``python -m rankwise.demo`` (or ``make demo``). The first run trains the example
networks once and caches their weights (see :func:`rankwise.examples.pretrained_mnist` and
:func:`rankwise.examples.cache_dir`); later runs load them. On an idle 2-core machine the whole
first run took 62 s, 34 s of it training; on one kept busy by other jobs (load average 8-9) the
CNN's training alone took 484 s, and the demo says so before it starts.

For each network: one calibration pass over 2048 training images
(:class:`rankwise.NeuronPCA`), then :func:`rankwise.compress_network_using_projection` at
several learnables reduction goals, each compressed network evaluated on the 10 000 test
images without any fine-tuning. The demo ends by writing the analysis of both networks
(:func:`rankwise.analyze`) as one HTML page, ``REPORT_FILE`` in the current folder.
"""

import pathlib
import time

import torch

import rankwise as rw
from rankwise.datasets import load_mnist
from rankwise.examples import accuracy, cache_dir, pretrained_mnist, pretrained_path
from rankwise.report import write_html

NETWORKS = ("cnn", "mlp")
GOALS = (0.5, 0.8, 0.9, 0.95)
CALIBRATION_IMAGES = 2048
BATCH_SIZE = 256
INFERENCE_REPEATS = 3
REPORT_FILE = pathlib.Path("rankwise_demo_report.html")


def timed(function, *args, **kwargs):
    """Call ``function(*args, **kwargs)``; return its result and the seconds it took."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def evaluate(model, images, labels):
    """Test accuracy of `model` and its best inference time over the images (seconds)."""
    runs = [timed(accuracy, model, images, labels) for _ in range(INFERENCE_REPEATS)]
    return runs[0][0], min(seconds for _, seconds in runs)


def table_row(goal, learnables, reduction, test_accuracy, compression, inference):
    """One markdown row; numbers formatted, ``None`` shown as a dash."""
    cells = [goal, f"{learnables:,}", "-" if reduction is None else f"{reduction:.1%}",
             f"{test_accuracy:.2%}", "-" if compression is None else f"{compression:.2f} s",
             f"{inference:.2f} s"]
    return "| " + " | ".join(cells) + " |"


def compress_and_report(name, model, batches, test_images, test_labels):
    """Calibrate `model`, compress it at every goal in `GOALS`, print a before/after table.

    Returns the `rw.NeuronPCA` of the calibration, for the analysis report.
    """
    npca, calibration = timed(rw.NeuronPCA, model, batches, verbosity="off")
    print(f"\nMNIST {name}: calibration on {CALIBRATION_IMAGES} training images "
          f"({len(batches)} batches) took {calibration:.2f} s")
    print("| goal | learnables | reduction | test accuracy | compression | inference (10k) |")
    print("|---|---:|---:|---:|---:|---:|")
    test_accuracy, inference = evaluate(model, test_images, test_labels)
    print(table_row("original", rw.count_learnables(model), None, test_accuracy, None, inference))
    for goal in GOALS:
        (net, info), seconds = timed(rw.compress_network_using_projection, model, npca,
                                     learnables_reduction_goal=goal, verbosity="off")
        test_accuracy, inference = evaluate(net, test_images, test_labels)
        print(table_row(f"{goal:.0%}", info.learnables_after, info.learnables_reduction,
                        test_accuracy, seconds, inference))
    return npca


def main():
    """Run the demo on the example CNN and MLP and print the tables and total time."""
    start = time.perf_counter()
    untrained = [name for name in NETWORKS if not pretrained_path(name).is_file()]
    if untrained:
        print(f"First run: the example networks ({', '.join(untrained)}) are trained once, about 35 s "
              f"on 2 idle CPU cores, and cached in {cache_dir()} (set RANKWISE_CACHE to choose the "
              f"folder); later runs load them.")
    (train_images, _), loading = timed(load_mnist, "train")
    test_images, test_labels = load_mnist("test")
    print(f"MNIST loaded in {loading:.1f} s; {torch.get_num_threads()} torch threads")
    batches = list(train_images[:CALIBRATION_IMAGES].split(BATCH_SIZE))
    reports = {}
    for name in NETWORKS:
        model = pretrained_mnist(name)
        npca = compress_and_report(name, model, batches, test_images, test_labels)
        reports[f"MNIST {name}"] = rw.analyze(model, npca, learnables_reduction_goals=GOALS,
                                              verbosity="off")
    print(f"\nThe first compression of a network includes the eigen-decompositions; "
          f"no fine-tuning anywhere. Total time: {time.perf_counter() - start:.1f} s")
    write_html(reports, REPORT_FILE)
    print(f"Analysis of both networks (tables, spectra, trade-off curves): {REPORT_FILE.resolve()}")


if __name__ == "__main__":
    main()

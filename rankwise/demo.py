"""Compress two trained MNIST networks by projection and show what it costs and gains.

Run with ``python -m rankwise.demo`` (or ``make demo``). The first run trains the example
networks once and caches their weights (see :func:`rankwise.examples.pretrained_mnist` and
:func:`rankwise.examples.cache_dir`); later runs load them. On an idle 2-core machine the whole
first run took 62 s, 34 s of it training; on one kept busy by other jobs (load average 8-9) the
CNN's training alone took 484 s, and the demo says so before it starts. With the speed
comparisons and the FLOPs goals, a run with both networks cached took 100 s on a busy machine
(load average 5).

For each network: one calibration pass over 2048 training images
(:class:`rankwise.NeuronPCA`), then :func:`rankwise.compress_network_using_projection` at
several learnables reduction goals and FLOPs reduction goals, each compressed network evaluated
on the 10 000 test images without any fine-tuning. Speed is measured as everywhere in rankwise,
by :func:`rankwise.compare_speed` (original and compressed timed in alternating rounds until
their medians settle; a timing that does not settle is marked unstable), at the batch size
``SPEED_BATCH``, with the compressed convolutional network in channels-last memory format beside
the original in the same format (``channels_last``): the format in which torch's CPU
convolutions are fastest, for both. The demo ends by writing the analysis of both networks
(:func:`rankwise.analyze`) as one HTML page, ``REPORT_FILE`` in the current folder.
"""

import copy
import pathlib
import time
import warnings

import torch

import rankwise as rw
from rankwise.datasets import load_mnist
from rankwise.examples import accuracy, cache_dir, pretrained_mnist, pretrained_path
from rankwise.report import write_html

NETWORKS = ("cnn", "mlp")
GOALS = (0.5, 0.8, 0.9, 0.95)
FLOPS_GOALS = (0.25, 0.5)
CALIBRATION_IMAGES = 2048
BATCH_SIZE = 256
SPEED_BATCH = 256
SPEED_TIMING = dict(repeats=10, max_rounds=6)
REPORT_FILE = pathlib.Path("rankwise_demo_report.html")


def timed(function, *args, **kwargs):
    """Call ``function(*args, **kwargs)``; return its result and the seconds it took."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def channels_last(model):
    """A copy of ``model`` in channels-last memory format when it has convolutions, else itself."""
    if not any(p.dim() == 4 for p in model.parameters()):
        return model
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def speed(model, net, images):
    """``rw.compare_speed`` of ``model`` and ``net`` on ``SPEED_BATCH`` test images (channels-last
    for a convolutional network), as a short cell: ``"1.52x (FLOPs 2.03x)"``."""
    x = images[:SPEED_BATCH].contiguous()
    before, after = channels_last(model), channels_last(net)
    if after is not net:
        x = x.contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unstable timing is marked in the cell instead
        comparison = rw.compare_speed(before, after, x, **SPEED_TIMING)
    return (f"{comparison.realised_speedup:.2f}x (FLOPs {comparison.flop_reduction:.2f}x)"
            + ("" if comparison.stable else ", unstable"))


def table_row(goal, learnables, reduction, flops_removed, test_accuracy, compression, faster):
    """One markdown row; numbers formatted, ``None`` shown as a dash."""
    cells = [goal, f"{learnables:,}", "-" if reduction is None else f"{reduction:.1%}",
             "-" if flops_removed is None else f"{flops_removed:.1%}", f"{test_accuracy:.2%}",
             "-" if compression is None else f"{compression:.2f} s", faster]
    return "| " + " | ".join(cells) + " |"


def compress_and_report(name, model, batches, test_images, test_labels):
    """Calibrate `model`, compress it at every goal of `GOALS` and `FLOPS_GOALS`, print a table.

    Returns the `rw.NeuronPCA` of the calibration, for the analysis report.
    """
    npca, calibration = timed(rw.NeuronPCA, model, batches, verbosity="off")
    print(f"\nMNIST {name}: calibration on {CALIBRATION_IMAGES} training images "
          f"({len(batches)} batches) took {calibration:.2f} s")
    print(f"| goal | learnables | learnables removed | FLOPs removed | test accuracy | compression | "
          f"speed at batch {SPEED_BATCH} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    example = test_images[:SPEED_BATCH]
    flops = rw.count_flops(model, example)
    print(table_row("original", rw.count_learnables(model), None, None, accuracy(model, test_images, test_labels),
                    None, "1.00x"))
    goals = [("learnables_reduction_goal", g) for g in GOALS] + [("flops_reduction_goal", g) for g in FLOPS_GOALS]
    for argument, goal in goals:
        (net, info), seconds = timed(rw.compress_network_using_projection, model, npca,
                                     verbosity="off", **{argument: goal})
        label = f"{goal:.0%} of the " + ("learnables" if argument.startswith("learnables") else "FLOPs")
        print(table_row(label, info.learnables_after, info.learnables_reduction,
                        1 - rw.count_flops(net, example) / flops, accuracy(net, test_images, test_labels),
                        seconds, speed(model, net, test_images)))
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
    print(f"MNIST loaded in {loading:.1f} s; {torch.get_num_threads()} torch threads. Speed: "
          f"rw.compare_speed, original against compressed on {SPEED_BATCH} test images (channels-last "
          "for the CNN), as 'x times faster (x times fewer FLOPs)'; timings on a busy machine are noisy.")
    batches = list(train_images[:CALIBRATION_IMAGES].split(BATCH_SIZE))
    reports = {}
    for name in NETWORKS:
        model = pretrained_mnist(name)
        npca = compress_and_report(name, model, batches, test_images, test_labels)
        reports[f"MNIST {name}"] = rw.analyze(model, npca, learnables_reduction_goals=GOALS,
                                              verbosity="off")
    print(f"\nThe first compression of a network includes the eigen-decompositions; "
          f"no fine-tuning anywhere. A learnables goal removes what is stored (the CNN's fully "
          f"connected layer); a FLOPs goal removes what is computed (its convolutions), which is "
          f"what buys speed. Total time: {time.perf_counter() - start:.1f} s")
    write_html(reports, REPORT_FILE)
    print(f"Analysis of both networks (tables, spectra, trade-off curves): {REPORT_FILE.resolve()}")


if __name__ == "__main__":
    main()

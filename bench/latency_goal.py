"""Latency goals: the MNIST CNN and MLP compressed to 25 / 50% of their measured latency removed.

For each network (the cached example networks of :func:`rankwise.examples.pretrained_mnist`),
one calibration on 2048 training images (8 batches of 256; every fourth held out, the default),
then for each batch size (1 and 256) and goal: ``rw.compress_network_using_projection(model,
npca, latency_reduction_goal=g, latency_input=test_images[:batch])``, every other option at its
default. The decision's own measurement (``info.latency_reduction``) is reported next to an
independent one taken afterwards by :func:`rankwise.compare_speed` on the same batch (the round
kept by the decision was chosen by its own measurement, so it is biased upward; the second one
is not). Accuracy on test images 5000-9999; nothing is tuned (the goals are fixed in advance).

Timings at the torch thread count of the run (1: ``OMP_NUM_THREADS=1``), PyTorch eager, NCHW.

Usage::

    OMP_NUM_THREADS=1 python bench/latency_goal.py [--networks cnn,mlp]

Writes ``bench/results/latency_goal.md`` and ``bench/results/latency_goal.json``.
"""

import argparse
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rankwise as rw  # noqa: E402
from environment import write_result  # noqa: E402
from rankwise.datasets import load_mnist  # noqa: E402
from rankwise.examples import accuracy, pretrained_mnist  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CALIBRATION_IMAGES, CALIBRATION_BATCH = 2048, 256
LATENCY_GOALS = (0.25, 0.5)
BATCHES = (1, 256)


def rows_for(name):
    model = pretrained_mnist(name, verbose=False)
    train_images, _ = load_mnist("train")
    test_images, test_labels = load_mnist("test")
    test = test_images[5000:], test_labels[5000:]
    npca = rw.NeuronPCA(model, list(train_images[:CALIBRATION_IMAGES].split(CALIBRATION_BATCH)), verbosity="off")
    rows = [dict(network=name, goal="original", batch="-", accuracy=accuracy(model, *test))]
    for batch in BATCHES:
        x = test_images[:batch].contiguous()
        for goal in LATENCY_GOALS:
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                net, info = rw.compress_network_using_projection(model, npca, latency_reduction_goal=goal,
                                                                 latency_input=x, verbosity="off")
            seconds = time.perf_counter() - start
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                again = rw.compare_speed(model, net, x)
            row = dict(network=name, goal=f"latency -{goal:.0%}", batch=batch, accuracy=accuracy(net, *test),
                       goal_reached=info.goal_reached, decision_reduction=info.latency_reduction,
                       measured_again=1 - again.seconds_after / again.seconds_before,
                       speedup_again=again.realised_speedup, stable_again=again.stable,
                       flops_reduction=1 - again.flops_after / again.flops_before,
                       learnables_reduction=info.learnables_reduction, choice=str(info.choice),
                       seconds=seconds, kept_dense=info.kept_dense_for_latency,
                       warnings=[str(w.message) for w in caught if "latency" in str(w.message)],
                       ranks={n: [p.side, p.rank_in, p.rank_out] for n, p in info.layers.items()})
            print(row, flush=True)
            rows.append(row)
    return rows


def table(rows):
    header = ["network", "goal", "batch", "test acc. (5000-9999)", "reached", "latency removed (decision)",
              "latency removed (measured again)", "speedup again", "FLOPs removed", "learnables removed",
              "decision s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if r["goal"] == "original":
            lines.append(f"| {r['network']} | original | - | {r['accuracy']:.2%} |" + " |" * 7)
            continue
        lines.append("| " + " | ".join([
            r["network"], r["goal"], str(r["batch"]), f"{r['accuracy']:.2%}", "yes" if r["goal_reached"] else "no",
            f"{r['decision_reduction']:.1%}", f"{r['measured_again']:.1%}" + ("" if r["stable_again"] else " (unstable)"),
            f"{r['speedup_again']:.2f}x", f"{r['flops_reduction']:.1%}", f"{r['learnables_reduction']:.1%}",
            f"{r['seconds']:.0f}"]) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default="cnn,mlp")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [row for name in args.networks.split(",") for row in rows_for(name)]
    with open(os.path.join(RESULTS, "latency_goal.json"), "w") as stream:
        json.dump(rows, stream, indent=1, default=str)
    write_result(os.path.join(RESULTS, "latency_goal.md"), "Latency goals (MNIST CNN and MLP)",
                 table(rows) + "\n\nlatency removed = 1 - compressed seconds / original seconds on the batch "
                 "(rankwise.compare_speed medians); 'decision': the measurement of the round the decision "
                 "kept; 'measured again': a fresh compare_speed afterwards.")


if __name__ == "__main__":
    main()

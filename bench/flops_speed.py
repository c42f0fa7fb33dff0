"""FLOPs goals and speed: the MNIST CNN and MLP at 25 / 50% of their FLOPs removed.

For each network (the cached example networks of :func:`rankwise.examples.pretrained_mnist`),
one calibration on 2048 training images (8 batches of 256; every fourth held out, the default),
then ``flops_reduction_goal`` = 0.25 and 0.5 (and for the CNN with ``round_to=8``), each next to
the ``learnables_reduction_goal`` of the same accuracy: the largest learnables goal (bisection,
``BISECTION_STEPS`` steps) whose accuracy on the *validation* images (test images 0-4999) is at
least that of the FLOPs-goal network there. Then, per ``round_to``, the largest goal of
``LARGER_GOALS`` losing at most ``MOST_LOST`` of the original's accuracy on the validation images
("chosen on validation" rows). Accuracies are reported on test images 5000-9999, which chose
nothing.

Speed is measured by :func:`rankwise.compare_speed` (the library's one timing method: alternating
rounds of timed calls until the medians settle), original against compressed on the same input,
at batch 1 and batch 256, at the torch thread count of the run (1: ``OMP_NUM_THREADS=1``):
PyTorch eager on a contiguous (NCHW) input, eager with model and input channels-last (CNN only),
ONNX Runtime (1 intra-op thread, the file of :func:`rankwise.export_onnx`), and with ``--compile``
``torch.compile`` of both networks (50% rows only; its compilation is not timed).

Usage::

    OMP_NUM_THREADS=1 python bench/flops_speed.py [--compile] [--networks cnn,mlp]

Writes ``bench/results/flops_speed.md`` and ``bench/results/flops_speed.json``.
"""

import argparse
import copy
import json
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rankwise as rw  # noqa: E402
from environment import write_result  # noqa: E402
from rankwise.datasets import load_mnist  # noqa: E402
from rankwise.examples import accuracy, pretrained_mnist  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CALIBRATION_IMAGES, BATCH = 2048, 256
FLOPS_GOALS = (0.25, 0.5)
LARGER_GOALS = (0.6, 0.7, 0.75, 0.8)   # searched for the largest within MOST_LOST on validation
MOST_LOST = 0.003                      # the target: at most 0.3 points of accuracy lost
BISECTION_STEPS = 7
SPEED = {1: dict(repeats=50, max_rounds=8), 256: dict(repeats=10, max_rounds=8)}


def compress(model, npca, **goal):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rw.compress_network_using_projection(model, npca, verbosity="off", **goal)


def matching_learnables_goal(model, npca, target, images, labels):
    """The largest learnables goal whose validation accuracy is at least ``target``."""
    low, high, best = 0.0, 0.99, None
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        net, info = compress(model, npca, learnables_reduction_goal=middle)
        if accuracy(net, images, labels) >= target:
            low, best = middle, (middle, net, info)
        else:
            high = middle
    return best or (0.0, *compress(model, npca, learnables_reduction_goal=0.0))


class OnnxRuntime(torch.nn.Module):
    """An ONNX Runtime session (1 intra-op thread) called like a module, for compare_speed."""

    def __init__(self, model, example):
        super().__init__()
        import onnxruntime

        path = tempfile.mktemp(suffix=".onnx")
        rw.export_onnx(model, path, example, verbosity="off")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        os.remove(path)

    def forward(self, x):
        return torch.from_numpy(self.session.run(None, {"input": x.numpy()})[0])


def speeds(original, compressed, images, convolutional, compile_too):
    """``{setting: {batch: SpeedComparison as a dict}}``."""
    settings = {"eager": (original, compressed, lambda x: x)}
    if convolutional:
        channels_last = lambda m: copy.deepcopy(m).to(memory_format=torch.channels_last)  # noqa: E731
        settings["eager channels-last"] = (channels_last(original), channels_last(compressed),
                                           lambda x: x.contiguous(memory_format=torch.channels_last))
    example = images[:BATCH].contiguous()
    settings["onnxruntime"] = (OnnxRuntime(original, example), OnnxRuntime(compressed, example), lambda x: x)
    if compile_too:
        settings["torch.compile"] = (torch.compile(original), torch.compile(compressed), lambda x: x)
    results = {}
    for setting, (before, after, layout) in settings.items():
        results[setting] = {}
        for batch, timing in SPEED.items():
            x = layout(images[:batch].contiguous())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                comparison = rw.compare_speed(before, after, x, **timing)
            flops = (rw.count_flops(original, images[:batch]), rw.count_flops(compressed, images[:batch]))
            results[setting][batch] = dict(flops_before=flops[0], flops_after=flops[1],
                                           seconds_before=comparison.seconds_before,
                                           seconds_after=comparison.seconds_after,
                                           speedup=comparison.realised_speedup,
                                           efficiency=comparison.realised_speedup * flops[1] / flops[0],
                                           stable=comparison.stable, spread=(comparison.spread_before,
                                                                             comparison.spread_after))
            print(f"  {setting} batch {batch}: {comparison}", flush=True)
    return results


def rows_for(name, compile_too):
    model = pretrained_mnist(name, verbose=False)
    train_images, _ = load_mnist("train")
    test_images, test_labels = load_mnist("test")
    validation = test_images[:5000], test_labels[:5000]
    test = test_images[5000:], test_labels[5000:]
    npca = rw.NeuronPCA(model, list(train_images[:CALIBRATION_IMAGES].split(BATCH)), verbosity="off")
    convolutional = name == "cnn"
    rows = [dict(network=name, goal="original", accuracy=accuracy(model, *test), flops_reduction=0.0,
                 learnables_reduction=0.0)]
    variants = [dict(flops_reduction_goal=g) for g in FLOPS_GOALS]
    if convolutional:
        variants += [dict(flops_reduction_goal=g, round_to=8) for g in FLOPS_GOALS]
    original_validation = accuracy(model, *validation)
    for round_to in ([None, 8] if convolutional else [None]):
        within = [g for g in LARGER_GOALS if accuracy(compress(model, npca, flops_reduction_goal=g, round_to=round_to)[0],
                                                      *validation) >= original_validation - MOST_LOST]
        if within:
            variants.append(dict(flops_reduction_goal=max(within), round_to=round_to, chosen=True))
    for goal in variants:
        chosen = goal.pop("chosen", False)
        net, info = compress(model, npca, **goal)
        label = (f"flops -{goal['flops_reduction_goal']:.0%}" + (", round_to=8" if goal.get("round_to") else "")
                 + (" (chosen on validation)" if chosen else ""))
        print(f"{name} {label}: {info.choice}", flush=True)
        row = dict(network=name, goal=label, accuracy=accuracy(net, *test),
                   flops_reduction=info.flops_reduction, learnables_reduction=info.learnables_reduction,
                   ranks={n: [p.side, p.rank_in, p.rank_out] for n, p in info.layers.items()})
        row["speed"] = speeds(model, net, test_images, convolutional,
                              compile_too and (goal["flops_reduction_goal"] == 0.5 or chosen))
        rows.append(row)
        if chosen:
            continue
        learnables_goal, same, same_info = matching_learnables_goal(model, npca, accuracy(net, *validation),
                                                                    *validation)
        flops = rw.count_flops(model, test_images[:BATCH])
        print(f"{name} learnables goal {learnables_goal:.3f} at the same validation accuracy", flush=True)
        rows.append(dict(network=name, goal=f"learnables -{learnables_goal:.1%} (same accuracy as {label})",
                         accuracy=accuracy(same, *test),
                         flops_reduction=1 - rw.count_flops(same, test_images[:BATCH]) / flops,
                         learnables_reduction=same_info.learnables_reduction,
                         speed=speeds(model, same, test_images, convolutional, False)))
    return rows


def table(rows):
    settings = sorted({s for r in rows for s in r.get("speed", {})}, key=["eager", "eager channels-last",
                                                                          "onnxruntime", "torch.compile"].index)
    header = ["network", "goal", "test acc. (5000-9999)", "FLOPs removed", "learnables removed"]
    header += [f"{s} b{b}: speedup (eff.)" for s in settings for b in SPEED]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["network"], r["goal"], f"{r['accuracy']:.2%}", f"{r['flops_reduction']:.1%}",
                 f"{r['learnables_reduction']:.1%}"]
        for s in settings:
            for b in SPEED:
                m = r.get("speed", {}).get(s, {}).get(b) or r.get("speed", {}).get(s, {}).get(str(b))
                cells.append("-" if m is None else f"{m['speedup']:.2f}x ({m['efficiency']:.2f})"
                             + ("" if m["stable"] else " unstable"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="also torch.compile the 50%% rows")
    parser.add_argument("--networks", default="cnn,mlp")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [row for name in args.networks.split(",") for row in rows_for(name, args.compile)]
    with open(os.path.join(RESULTS, "flops_speed.json"), "w") as stream:
        json.dump(rows, stream, indent=1, default=str)
    write_result(os.path.join(RESULTS, "flops_speed.md"), "FLOPs goals and speed (MNIST CNN and MLP)",
                 table(rows) + "\n\nspeedup = original seconds / compressed seconds (rankwise.compare_speed, "
                 "medians of the last settled round); eff. = speedup / FLOP reduction; 'unstable': the "
                 "timings did not settle (machine under load).")


if __name__ == "__main__":
    main()

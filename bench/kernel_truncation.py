"""Kernel truncation on MNIST: per layer and cut, whole networks, retraining, tensorly-torch.

The study of Singh, Jahromi and Orus (arXiv 2403.14379) on the two convolution-heavy example
networks, labelled cnn4 and resnet (`rankwise.examples.pretrained_mnist("vanilla_cnn")` and
`("small_resnet")`):

1. every 3x3 convolution alone, cut along each of the 7 bipartitions of its kernel at several
   fractions of the kernel norm kept: accuracy against relative norm loss (plots);
2. every convolution of the network truncated at once (cut ``o|ihw``, Tucker-2, TT ``ihwo``)
   at several levels: accuracy, learnables, multiply-adds;
3. the most truncated networks retrained for a few passes over part of the training set;
4. data-aware truncation (``calibration=``) against kernel-norm truncation at equal ranks;
5. tensorly-torch's ``FactorizedConv.from_conv`` (CP, Tucker, TT) against rankwise at equal
   ranks (so equal learnables): accuracy before fine-tuning, CPU latency, ONNX export.

Everything runs on one torch thread: on this shared 2-core machine two threads contend with
other processes and timings swing by 10x, one thread is steadier (and slower).

Run from the repository root: ``python bench/kernel_truncation.py``. Writes
``bench/results/kernel_truncation.md`` and ``bench/results/kernel_truncation_*.png``.
"""

import contextlib
import copy
import math
import os
import statistics
import time
import warnings

import matplotlib
import torch
from torch import nn

import rankwise as rw
from environment import write_result
from peers import tltorch_layer
from rankwise.datasets import load_mnist
from rankwise.decompose import bipartitions
from rankwise.examples import accuracy, pretrained_mnist

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

THREADS = 1
NETWORKS = {"cnn4": "vanilla_cnn", "resnet": "small_resnet"}  # label -> rankwise.examples name
SWEEP_NORMS = (0.95, 0.85, 0.7, 0.5)         # norm_retained of the per-layer sweep
SWEEP_IMAGES = 2000                          # test images per point of the per-layer sweep
NETWORK_LEVELS = (0.9, 0.7, 0.5)             # norm_retained of the whole-network truncations
NETWORK_METHODS = {"cut o|ihw": ("cut", {"cut": "o|ihw"}), "tucker-2": ("tucker", {}),
                   "tt ihwo": ("tt", {})}
RETRAIN_PASSES = 2
RETRAIN_IMAGES = 15000                       # training images per retraining pass
RETRAIN_LR = 3e-4
CALIBRATION_IMAGES = 2048
COMPARISON_LEVEL = 0.7                       # norm_retained giving the ranks of the comparison
LATENCY_BATCH = 256
LATENCY_REPEATS = 15
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def cell(text):
    """``text`` safe inside a markdown table cell (GitHub splits cells at ``|`` even in code)."""
    return text.replace("|", "\\|")


# Measurements ---------------------------------------------------------------------------------

def macs_per_image(model, image):
    """Multiply-adds of every convolution and linear layer for one image (forward hooks)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv1d | nn.Conv2d):
            total += output[0].numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(count) for m in model.modules()
               if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model.eval()(image[:1])
    for handle in handles:
        handle.remove()
    return total


def median_latencies(models, batch):
    """Median seconds of ``model(batch)`` per model, repeats interleaved across the models."""
    times = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(3):
                model.eval()(batch)
        for _ in range(LATENCY_REPEATS):
            for name, model in models.items():
                start = time.perf_counter()
                model(batch)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def retrain(model, images, labels, passes, test_images, test_labels):
    """Adam (constant ``RETRAIN_LR``, batch 128) for ``passes`` passes; test accuracy after each."""
    optimiser = torch.optim.Adam(model.parameters(), lr=RETRAIN_LR)
    history = []
    for number in range(passes):
        model.train()
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(number))
        for batch in order.split(128):
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        history.append(accuracy(model, test_images, test_labels))
    return history


def convs_of(model, kernel_larger_than_1x1=False):
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)
            and (not kernel_larger_than_1x1 or math.prod(m.kernel_size) > 1)]


# 1. Per layer and cut ------------------------------------------------------------------------

def layer_sweep(model, images, labels):
    """Rows ``(layer, cut, norm_retained, rank, relative norm loss, accuracy)``."""
    rows = []
    for name in convs_of(model, kernel_larger_than_1x1=True):
        for cut in bipartitions("oihw"):
            for level in SWEEP_NORMS:
                net, info = rw.truncate_kernels(model, "cut", cut=cut, norm_retained=level,
                                                layer_names=[name], verbosity="off")
                layer = info.layers[name]
                rows.append((name, cut, level, layer.ranks[0], layer.relative_norm_loss,
                             accuracy(net, images, labels)))
    return rows


def plot_layer_sweep(network, rows, original, path):
    layers = list(dict.fromkeys(row[0] for row in rows))
    figure, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.2), sharey=True)
    for axis, layer in zip(axes, layers):
        for cut in bipartitions("oihw"):
            points = sorted((r[4], 100 * r[5]) for r in rows if r[0] == layer and r[1] == cut)
            axis.plot(*zip(*points), marker="o", markersize=3, label=cut)
        axis.axhline(100 * original, color="gray", linestyle="--", linewidth=0.8)
        axis.set_title(f"{network}: layer {layer}")
        axis.set_xlabel("relative norm loss |W - W'| / |W|")
        axis.set_xlim(0, 1)
    axes[0].set_ylabel(f"test accuracy (%), first {SWEEP_IMAGES} images")
    axes[-1].legend(fontsize=7, title="cut")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def layer_sweep_tables(network, model, rows, original):
    """Per layer and level: mean/worst accuracy change over the cuts and mean norm loss."""
    lines = [f"**{network}**: test accuracy change (points) on the first {SWEEP_IMAGES} test images "
             f"when one layer is truncated, mean over the 7 cuts (worst cut in brackets), and the "
             f"mean relative norm loss, at each `norm_retained` (original accuracy "
             f"{100 * original:.2f}% on those images).", "",
             "| layer | kernel | " + " | ".join(f"f = {f}" for f in SWEEP_NORMS) + " |",
             "|---|---|" + "---:|" * len(SWEEP_NORMS)]
    modules = dict(model.named_modules())
    for layer in dict.fromkeys(r[0] for r in rows):
        cells = []
        for level in SWEEP_NORMS:
            chosen = [r for r in rows if r[0] == layer and r[2] == level]
            changes = [100 * (r[5] - original) for r in chosen]
            loss = statistics.mean(r[4] for r in chosen)
            cells.append(f"{statistics.mean(changes):+.2f} ({min(changes):+.2f}), loss {loss:.2f}")
        shape = "x".join(map(str, modules[layer].weight.shape))
        lines.append(f"| {layer} | {shape} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layer_sweep_detail(network, rows):
    lines = [f"<details><summary>{network}: every point of the per-layer sweep</summary>", "",
             "| layer | cut | norm_retained | rank | norm loss | accuracy |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r[0]} | `{cell(r[1])}` | {r[2]} | {r[3]} | {r[4]:.3f} | {100 * r[5]:.2f}% |" for r in rows]
    return "\n".join(lines + ["", "</details>"])


# 2-4. Whole networks, retraining, data-aware -------------------------------------------------

def network_levels(model, test_images, test_labels):
    """Per method and level: the truncated model and its numbers."""
    results = {}
    for label, (method, structure) in NETWORK_METHODS.items():
        for level in NETWORK_LEVELS:
            net, info = rw.truncate_kernels(model, method, norm_retained=level, verbosity="off",
                                            **structure)
            results[label, level] = {
                "model": net, "info": info, "accuracy": accuracy(net, test_images, test_labels),
                "macs": macs_per_image(net, test_images),
                "loss": statistics.mean(t.relative_norm_loss for t in info.layers.values())}
    return results


def conv_learnables(model):
    """Learnables of every ``nn.Conv2d`` (those inside truncated layers included)."""
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters())


def network_table(network, model, results, original, original_macs):
    lines = [f"**{network}**: {rw.count_learnables(model):,} learnables "
             f"({conv_learnables(model):,} in convolutions), {original_macs:,} multiply-adds per image, "
             f"test accuracy {100 * original:.2f}% (10 000 images).", "",
             "| method | norm_retained | mean norm loss | conv learnables | multiply-adds / image "
             "| accuracy (change) |", "|---|---:|---:|---:|---:|---:|"]
    for (label, level), r in results.items():
        lines.append(f"| {cell(label)} | {level} | {r['loss']:.3f} | {conv_learnables(r['model']):,} "
                     f"| {r['macs']:,} | {100 * r['accuracy']:.2f}% ({100 * (r['accuracy'] - original):+.2f}) |")
    return "\n".join(lines)


def retraining(results, train_images, train_labels, test_images, test_labels):
    """Retrain a copy of each method's most truncated network; accuracy after each pass."""
    level = min(NETWORK_LEVELS)
    histories = {}
    for label in NETWORK_METHODS:
        net = copy.deepcopy(results[label, level]["model"])
        start = time.perf_counter()
        history = retrain(net, train_images, train_labels, RETRAIN_PASSES, test_images, test_labels)
        histories[label] = (results[label, level]["accuracy"], history, time.perf_counter() - start)
    return histories


def retraining_table(network, histories, original):
    level = min(NETWORK_LEVELS)
    lines = [f"**{network}** (original {100 * original:.2f}%), every convolution truncated at "
             f"`norm_retained={level}`:", "",
             "| method | before | " + " | ".join(f"after pass {k + 1}" for k in range(RETRAIN_PASSES))
             + " | time |", "|---|---:|" + "---:|" * RETRAIN_PASSES + "---:|"]
    for label, (before, history, seconds) in histories.items():
        cells = " | ".join(f"{100 * a:.2f}% ({100 * (a - original):+.2f})" for a in history)
        lines.append(f"| {cell(label)} | {100 * before:.2f}% | {cells} | {seconds:.0f} s |")
    return "\n".join(lines)


def data_aware(model, results, calibration, test_images, test_labels):
    """At the ranks kernel-norm truncation chose (most truncated level): data-free vs data-aware."""
    npca = rw.NeuronPCA(model, calibration, layer_names=convs_of(model), verbosity="off")
    rows = []
    for label, (method, structure) in NETWORK_METHODS.items():
        free = results[label, min(NETWORK_LEVELS)]
        ranks = {name: t.ranks for name, t in free["info"].layers.items()}
        net, info = rw.truncate_kernels(model, method, ranks=ranks, calibration=npca, verbosity="off",
                                        **structure)
        aware_loss = statistics.mean(t.relative_norm_loss for t in info.layers.values())
        output_loss = statistics.mean(t.relative_output_loss for t in info.layers.values())
        rows.append((label, free["accuracy"], free["loss"], accuracy(net, test_images, test_labels),
                     aware_loss, output_loss))
    return rows


def data_aware_table(network, rows, original):
    lines = [f"**{network}** (original {100 * original:.2f}%), every convolution at the ranks that "
             f"`norm_retained={min(NETWORK_LEVELS)}` chose:", "",
             "| method | kernel-norm truncation: accuracy (norm loss) | data-aware: accuracy (norm loss, "
             "estimated output loss) |", "|---|---:|---:|"]
    for label, free_acc, free_loss, aware_acc, aware_loss, output_loss in rows:
        lines.append(f"| {cell(label)} | {100 * free_acc:.2f}% ({free_loss:.3f}) | {100 * aware_acc:.2f}% "
                     f"({aware_loss:.3f}, {output_loss:.3f}) |")
    return "\n".join(lines)


# 5. tensorly-torch ---------------------------------------------------------------------------

def tensorly_torch_models(model):
    """rankwise and tensorly-torch at the same ranks for CP, Tucker and TT; ``None`` if absent."""
    try:
        import tltorch  # noqa: F401  (only whether it is installed)
    except ImportError:
        return None
    _, tucker_info = rw.truncate_kernels(model, "tucker", norm_retained=COMPARISON_LEVEL, verbosity="off")
    _, tt_info = rw.truncate_kernels(model, "tt", norm_retained=COMPARISON_LEVEL, verbosity="off")
    modules = dict(model.named_modules())
    cp_ranks = {name: _cp_rank_like(modules[name], t.learnables_after) for name, t in tucker_info.layers.items()}
    settings = {
        "CP": ("cp", cp_ranks, lambda name, r: r),
        "Tucker": ("tucker", {n: t.ranks for n, t in tucker_info.layers.items()},
                   lambda name, r: (*r, *modules[name].kernel_size)),
        "TT": ("tt", {n: t.ranks for n, t in tt_info.layers.items()}, lambda name, r: (1, *r, 1)),
    }
    models = {"dense": model}
    for label, (method, ranks, their_rank) in settings.items():
        models[f"rankwise {label}"], _ = rw.truncate_kernels(model, method, ranks=ranks, verbosity="off")
        theirs = copy.deepcopy(model)
        for name, rank in ranks.items():
            theirs.set_submodule(name, tltorch_layer(modules[name], their_rank(name, rank), method))
        models[f"tensorly-torch {label}"] = theirs.eval()
    return models


def _cp_rank_like(conv, learnables):
    """The CP rank whose learnables ``R (I + O + kh + kw) + bias`` come closest to ``learnables``."""
    per_rank = conv.in_channels + conv.out_channels + sum(conv.kernel_size)
    bias = 0 if conv.bias is None else conv.out_channels
    return max(1, round((learnables - bias) / per_rank))


def onnx_exports(model, example):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), dynamo=True, verbose=False)
        return "yes"
    except Exception as error:  # noqa: BLE001 - the failure is the finding
        return f"no ({type(error).__name__})"


def comparison_table(network, models, test_images, test_labels):
    batch = test_images[:LATENCY_BATCH]
    latencies = median_latencies(models, batch)
    lines = [f"**{network}**: ranks from rankwise at `norm_retained={COMPARISON_LEVEL}` (Tucker-2, TT "
             "`ihwo`; CP at the rank matching Tucker's learnables per layer), the same ranks given to "
             "tensorly-torch. Latency: median of "
             f"{LATENCY_REPEATS} forward passes of {LATENCY_BATCH} images, one thread.", "",
             "| model | learnables | test accuracy (no fine-tuning) | latency | vs dense | ONNX export |",
             "|---|---:|---:|---:|---:|---|"]
    dense = latencies["dense"]
    for name, model in models.items():
        lines.append(f"| {name} | {rw.count_learnables(model):,} | "
                     f"{100 * accuracy(model, test_images, test_labels):.2f}% | "
                     f"{1000 * latencies[name]:.1f} ms | {latencies[name] / dense:.2f}x | "
                     f"{onnx_exports(model, batch[:2])} |")
    return "\n".join(lines)


# Putting it together -------------------------------------------------------------------------

def plot_networks(all_results, originals, path):
    figure, axes = plt.subplots(1, len(all_results), figsize=(5 * len(all_results), 3.6))
    for axis, (network, results) in zip(axes, all_results.items()):
        for label in NETWORK_METHODS:
            points = [(conv_learnables(results[label, f]["model"]), 100 * results[label, f]["accuracy"])
                      for f in NETWORK_LEVELS]
            axis.plot(*zip(*points), marker="o", label=label)
        axis.axhline(100 * originals[network], color="gray", linestyle="--", linewidth=0.8)
        axis.set_title(f"{network}: all convolutions truncated")
        axis.set_xlabel("learnables in convolutions")
        axis.set_ylabel("test accuracy (%)")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_retraining(all_histories, originals, path):
    figure, axes = plt.subplots(1, len(all_histories), figsize=(5 * len(all_histories), 3.6))
    for axis, (network, histories) in zip(axes, all_histories.items()):
        for label, (before, history, _) in histories.items():
            axis.plot(range(RETRAIN_PASSES + 1), [100 * a for a in (before, *history)], marker="o", label=label)
        axis.axhline(100 * originals[network], color="gray", linestyle="--", linewidth=0.8)
        axis.set_title(f"{network}: retraining at norm_retained={min(NETWORK_LEVELS)}")
        axis.set_xlabel(f"passes over {RETRAIN_IMAGES:,} training images")
        axis.set_ylabel("test accuracy (%)")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@contextlib.contextmanager
def timed(seconds, network, part):
    """Record (and print) the seconds the ``with`` block took as ``seconds[network, part]``."""
    start = time.perf_counter()
    yield
    seconds[network, part] = time.perf_counter() - start
    print(f"{network}: {part} {seconds[network, part]:.0f} s", flush=True)


def main():
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    train_images, train_labels = load_mnist("train")
    test_images, test_labels = load_mnist("test")
    sweep_images, sweep_labels = test_images[:SWEEP_IMAGES], test_labels[:SWEEP_IMAGES]
    calibration = list(train_images[:CALIBRATION_IMAGES].split(256))
    sections = {key: [] for key in ("sweep", "detail", "network", "retrain", "aware", "compare")}
    all_results, all_histories, originals, seconds = {}, {}, {}, {}
    for network, example in NETWORKS.items():
        model = pretrained_mnist(example)
        originals[network] = original = accuracy(model, test_images, test_labels)
        with timed(seconds, network, "per-layer sweep"):
            sweep_original = accuracy(model, sweep_images, sweep_labels)
            rows = layer_sweep(model, sweep_images, sweep_labels)
            plot_layer_sweep(network, rows, sweep_original,
                             os.path.join(RESULTS, f"kernel_truncation_layers_{network}.png"))
            sections["sweep"].append(layer_sweep_tables(network, model, rows, sweep_original))
            sections["detail"].append(layer_sweep_detail(network, rows))
        with timed(seconds, network, "whole network"):
            results = all_results[network] = network_levels(model, test_images, test_labels)
            sections["network"].append(network_table(network, model, results, original,
                                                     macs_per_image(model, test_images)))
        with timed(seconds, network, "data-aware"):
            rows = data_aware(model, results, calibration, test_images, test_labels)
            sections["aware"].append(data_aware_table(network, rows, original))
        with timed(seconds, network, "retraining"):
            all_histories[network] = retraining(results, train_images[:RETRAIN_IMAGES],
                                                train_labels[:RETRAIN_IMAGES], test_images, test_labels)
            sections["retrain"].append(retraining_table(network, all_histories[network], original))
        with timed(seconds, network, "tensorly-torch"):
            models = tensorly_torch_models(model)
            sections["compare"].append("tensorly-torch is not installed (`pip install --no-deps -r "
                                       "requirements-bench.txt`)." if models is None else
                                       comparison_table(network, models, test_images, test_labels))
    plot_networks(all_results, originals, os.path.join(RESULTS, "kernel_truncation_network.png"))
    plot_retraining(all_histories, originals, os.path.join(RESULTS, "kernel_truncation_retraining.png"))
    write_result(os.path.join(RESULTS, "kernel_truncation.md"), "Kernel truncation on MNIST",
                 _body(sections, seconds, time.perf_counter() - start))


def _body(sections, seconds, total):
    timing = ", ".join(f"{network} {part} {value:.0f} s" for (network, part), value in seconds.items())
    return "\n\n".join([
        "## 1. One layer at a time, every cut",
        "`rw.truncate_kernels(model, 'cut', cut=c, norm_retained=f, layer_names=[layer])` for each "
        "3x3 convolution, each of the 7 bipartitions `c` of its kernel and each `f`; the 1x1 "
        "shortcuts of the ResNet are left out (their cuts are all `o|i`). Plots: "
        "`kernel_truncation_layers_cnn4.png`, `kernel_truncation_layers_resnet.png`.",
        *sections["sweep"],
        "## 2. Every convolution at once",
        "All convolutions (the ResNet's 1x1 shortcuts included) truncated with the same "
        "`norm_retained`; full test set. Plot: `kernel_truncation_network.png`.",
        *sections["network"],
        "## 3. Retraining",
        f"Adam, constant learning rate {RETRAIN_LR:g}, batch 128, over the first {RETRAIN_IMAGES:,} "
        f"training images per pass (a quarter of an epoch); full test set after each pass. Plot: "
        "`kernel_truncation_retraining.png`.",
        *sections["retrain"],
        "## 4. Data-aware truncation",
        f"`calibration=` a NeuronPCA of the first {CALIBRATION_IMAGES} training images, at the ranks "
        "the kernel-norm truncation chose, so both have the same learnables.",
        *sections["aware"],
        "## 5. tensorly-torch at equal learnables",
        "`tltorch.FactorizedConv.from_conv(conv, rank, factorization, implementation='factorized', "
        "decompose_weights=True)` for every convolution.",
        *sections["compare"],
        "## Every point",
        *sections["detail"],
        f"Run time: {total:.0f} s in all ({timing}), training of the networks not included when "
        "their weights were cached.",
    ])


if __name__ == "__main__":
    main()

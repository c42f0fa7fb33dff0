"""rankwise side by side with the peers, on the same trained models and learnables budgets.

For each network (the MNIST CNN and fully connected network of `rankwise.examples`, a
torchvision ResNet-18 trained briefly on MNIST, `models.resnet18_mnist`) and each budget (the
fraction of the network's learnables removed), every method of `peers` and rankwise itself:

- ``rankwise``: ``NeuronPCA`` on the first 4096 training images (16 batches of 256), then
  ``compress_network_using_projection(model, npca, learnables_reduction_goal=budget,
  unpack=True)``; its time includes the statistics;
- ``rankwise-latency``: the same with ``latency_input`` = 32 images, which keeps dense every
  layer whose factored form was measured no faster on this CPU and takes the budget from the
  others.

Measured for each compressed network:

- learnables, and FLOPs of one image (``rankwise.count_flops``, 2 per multiply-add);
- test accuracy without fine-tuning and after fine-tuning every network with the same recipe
  (Adam, cosine schedule from ``FINE_TUNE_LR``, batches of 128, the images of the profile);
- CPU latency at batch 1 and 32, median over repeats with one thread: eager PyTorch
  (``rankwise.median_latency``) and onnxruntime (one intra-op thread) on the ONNX export
  (TorchScript exporter, ``dynamo=False``, dynamic batch: 30x faster to export than the dynamo
  exporter for the same graph, which matters with ~100 models);
- the realised batch-32 speedup against the FLOP reduction (their ratio is the efficiency);
- the wall-clock time of the compression itself.

Validation (for AIMET's greedy ratio selection) uses the first test images; the reported
accuracies use the last 5000 test images, which no method saw.

Run from the repository root: ``python bench/side_by_side.py [--quick]`` (``make bench`` /
``make bench-quick``). Writes ``bench/results/side_by_side[_quick].md``, a plot per network and
the side-by-side section of BENCHMARKS.md (a quick run does not replace a full one). A partial
run (``--networks``, ``--budgets``, ``--skip``) writes only ``bench/results/<--output>.md``.
"""

import argparse
import contextlib
import copy
import functools
import os
import re
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402

import peers  # noqa: E402
import rankwise as rw  # noqa: E402
from environment import environment_markdown, median_seconds, repeats_to_fill, write_result  # noqa: E402
from models import resnet18_mnist  # noqa: E402
from rankwise.datasets import load_mnist  # noqa: E402
from rankwise.examples import accuracy, pretrained_mnist, train_classifier  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROFILES = {
    "full": {"networks": ("cnn", "mlp", "resnet18"), "budgets": (0.5, 0.75, 0.9, 0.95),
             "fine_tune_images": 60_000, "validation_images": 5000, "latency_seconds": 1.0},
    "quick": {"networks": ("cnn", "mlp", "resnet18"), "budgets": (0.5, 0.9),
              "fine_tune_images": 4000, "validation_images": 1000, "latency_seconds": 0.3,
              "skip": {("*", "tltorch-cp"): "CP-ALS at these ranks took over 7 min for the CNN alone"}},
}
CALIBRATION_IMAGES, CALIBRATION_BATCH = 4096, 256
FINE_TUNE_LR = 1e-4
LATENCY_BATCHES = (1, 32)
REPORTED_TEST = slice(5000, None)
RANKWISE_METHODS = ("rankwise", "rankwise-latency")
MARKERS = ("<!-- side-by-side:start -->", "<!-- side-by-side:end -->")


@dataclass
class Row:
    """Everything measured for one compressed network (or the original, method ``original``)."""

    network: str
    method: str
    budget: float
    learnables: int = 0
    flops: int = 0
    accuracy: float = float("nan")
    fine_tuned: float = float("nan")
    eager_ms: dict = field(default_factory=dict)
    onnx_ms: dict = field(default_factory=dict)
    seconds: float = float("nan")
    note: str = ""


# Data and networks ---------------------------------------------------------------------------

@dataclass
class Data:
    calibration: list
    fine_tune: tuple
    validation: tuple
    test: tuple
    latency_input: torch.Tensor


def load_data(profile):
    train_images, train_labels = load_mnist("train")
    test_images, test_labels = load_mnist("test")
    count = profile["fine_tune_images"]
    order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))[:count]
    return Data(calibration=list(train_images[:CALIBRATION_IMAGES].split(CALIBRATION_BATCH)),
                fine_tune=(train_images[order], train_labels[order]),
                validation=(test_images[:profile["validation_images"]],
                            test_labels[:profile["validation_images"]]),
                test=(test_images[REPORTED_TEST], test_labels[REPORTED_TEST]),
                latency_input=test_images[:max(LATENCY_BATCHES)])


def trained_network(name):
    return (resnet18_mnist() if name == "resnet18" else pretrained_mnist(name)).eval()


# Compression ---------------------------------------------------------------------------------

class RankwiseMethods:
    """rankwise's two methods on one network, with its statistics computed once and timed."""

    def __init__(self, model, data):
        start = time.perf_counter()
        self.npca = rw.NeuronPCA(model, data.calibration, verbosity="off")
        # the spectra are decomposed on first use: force them here, so that they are timed
        # with the statistics and charged to every budget, not to the first one only
        self.reduction_range = self.npca.learnables_reduction_range
        self.statistics_seconds = time.perf_counter() - start
        self.latency_input = data.latency_input

    def compress(self, method, model, budget):
        latency_aware = method == "rankwise-latency"
        options = {"latency_input": self.latency_input} if latency_aware else {}
        start = time.perf_counter()
        with one_thread() if latency_aware else contextlib.nullcontext():
            compressed, info = rw.compress_network_using_projection(
                model, self.npca, learnables_reduction_goal=budget, unpack=True, verbosity="off",
                **options)
        seconds = self.statistics_seconds + time.perf_counter() - start
        note = "" if info.goal_reached else "goal not reachable"
        kept = getattr(info, "kept_dense_for_latency", [])
        if kept:
            note = "; ".join(filter(None, [note, "kept dense (not faster): " + ", ".join(kept)]))
        return peers.Compressed(compressed.eval(), seconds, note)


def compress(method, model, budget, rankwise_methods, data):
    if method in RANKWISE_METHODS:
        return rankwise_methods.compress(method, model, budget)
    return peers.compress(method, model, budget, data.calibration,
                          lambda candidate: accuracy(candidate, *data.validation))


# Measurements --------------------------------------------------------------------------------

def measure(row, model, data, profile, fine_tune=True):
    """Fill `row` with learnables, FLOPs, accuracies and latencies of `model` (not modified)."""
    row.learnables = rw.count_learnables(model)
    row.flops = rw.count_flops(model, data.latency_input[:1])
    row.accuracy = accuracy(model, *data.test)
    row.eager_ms, row.onnx_ms = latencies(model, data.latency_input, profile["latency_seconds"], row)
    if fine_tune:
        tuned = train_classifier(copy.deepcopy(model), *data.fine_tune, epochs=1, lr=FINE_TUNE_LR,
                                 progress=False)
        row.fine_tuned = accuracy(tuned, *data.test)


def latencies(model, images, seconds, row):
    """Median milliseconds per forward pass at each batch size: eager, then onnxruntime."""
    with one_thread():
        eager = {batch: 1000 * rw.median_latency(model, images[:batch],
                                                 repeats=eager_repeats(model, images[:batch], seconds))
                 for batch in LATENCY_BATCHES}
    try:
        session = onnx_session(model, images[:1])
    except Exception as error:  # noqa: BLE001 - an export failure is a finding, reported in the row
        row.note = "; ".join(filter(None, [row.note, f"ONNX export failed ({type(error).__name__})"]))
        return eager, {}
    onnx = {}
    for batch in LATENCY_BATCHES:
        run = functools.partial(session.run, None, {"input": images[:batch].numpy()})
        onnx[batch] = 1000 * median_seconds(run, repeats_to_fill(run, seconds))
    return eager, onnx


@contextlib.contextmanager
def one_thread():
    """Run the block with one torch thread: the latencies are measured, and decided, that way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def eager_repeats(model, example, seconds):
    """Enough repeats of ``model(example)`` to fill about `seconds`, between 5 and 200."""
    with torch.inference_mode():
        return repeats_to_fill(lambda: model(example), seconds)


def onnx_session(model, example):
    """An onnxruntime session (one thread) on `model` exported with a dynamic batch."""
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(folder, "model.onnx")
        torch.onnx.export(model, (example,), path, dynamo=False, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}})
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


# Running -------------------------------------------------------------------------------------

def run_network(name, methods, profile, data):
    model = trained_network(name)
    original = Row(name, "original", 0.0)
    measure(original, model, data, profile, fine_tune=False)
    rows = [original]
    rankwise_methods = RankwiseMethods(model, data)
    for budget in profile["budgets"]:
        for method in methods:
            row = Row(name, method, budget)
            print(f"{name} {method} {budget:.0%} ...", flush=True)
            skipped = skip_reason(profile, name, method)
            if skipped:
                row.note = f"skipped in this profile: {skipped}"
                rows.append(row)
                continue
            try:
                result = compress(method, model, budget, rankwise_methods, data)
                row.seconds, row.note = result.seconds, result.note
                measure(row, result.model, data, profile)
            except NotImplementedError as error:
                row.note = f"not applicable: {error}"
            except Exception as error:  # noqa: BLE001 - one method failing must not stop the run
                traceback.print_exc()
                row.note = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
            print(f"  {describe(row, original)}", flush=True)
            rows.append(row)
    return rows


def skip_reason(profile, network, method):
    """Why the profile leaves `method` out on `network` (``""`` when it does not)."""
    skip = profile.get("skip", {})
    return skip.get((network, method)) or skip.get(("*", method), "")


def describe(row, original):
    if not row.learnables:
        return row.note
    return (f"{1 - row.learnables / original.learnables:.1%} removed, accuracy {row.accuracy:.2%}, "
            f"fine-tuned {row.fine_tuned:.2%}, {row.seconds:.1f} s {row.note}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the ten-minute profile")
    parser.add_argument("--networks", nargs="+", help="a subset of the profile's networks")
    parser.add_argument("--skip", nargs="+", default=[], metavar="METHOD",
                        help="leave these peer methods out (named in the report)")
    parser.add_argument("--budgets", nargs="+", type=float, help="other budgets than the profile's")
    parser.add_argument("--output", help="results file stem in bench/results (default side_by_side"
                        "[_quick]); a partial run (--networks, --skip, --budgets) needs one")
    arguments = parser.parse_args()
    profile_name = "quick" if arguments.quick else "full"
    profile = dict(PROFILES[profile_name])
    profile["budgets"] = tuple(arguments.budgets or profile["budgets"])
    partial = bool(arguments.networks or arguments.skip or arguments.budgets)
    stem = arguments.output or "side_by_side" + ("" if profile_name == "full" else "_quick")
    if partial and not arguments.output:
        parser.error("a partial run (--networks, --skip, --budgets) needs --output, so that it "
                     "does not overwrite the results of a whole profile")
    profile["skip"] = {**profile.get("skip", {}),
                       **{("*", method): "left out with --skip" for method in arguments.skip}}
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    available = peers.available_methods()
    methods = RANKWISE_METHODS + tuple(name for name, reason in available.items() if not reason)
    data = load_data(profile)
    start = time.perf_counter()
    rows = [row for name in arguments.networks or profile["networks"]
            for row in run_network(name, methods, profile, data)]
    minutes = (time.perf_counter() - start) / 60
    body = report(rows, profile_name, profile, available, minutes, stem)
    write_result(os.path.join(HERE, "results", f"{stem}.md"),
                 f"rankwise side by side with the peers ({profile_name} profile)", body)
    if partial:
        print("a partial run: BENCHMARKS.md left as it is")
    else:
        update_benchmarks_section(os.path.join(ROOT, "BENCHMARKS.md"), body, profile_name)


# Reporting -----------------------------------------------------------------------------------

def report(rows, profile_name, profile, available, minutes, stem):
    networks = list(dict.fromkeys(row.network for row in rows))
    plots = [plot_network(network, [row for row in rows if row.network == network], stem)
             for network in networks]
    dropped = [f"`{name}`: {reason}" for name, reason in available.items() if reason]
    parts = [
        f"Profile `{profile_name}`: budgets {', '.join(f'{b:.0%}' for b in profile['budgets'])} of "
        f"the learnables removed; fine-tuning on {profile['fine_tune_images']:,} training images "
        f"(one pass, Adam, lr {FINE_TUNE_LR:g} cosine, batch 128); accuracy on the last 5000 test "
        f"images; AIMET's selection evaluated on the first {profile['validation_images']} test "
        f"images. Latency: median ms per forward pass, one thread, eager PyTorch and onnxruntime. "
        f"Whole run: {minutes:.0f} min.",
        "Methods not run: " + "; ".join(dropped) if dropped else "",
        "## Targets", targets_table(rows),
    ]
    for network, plot in zip(networks, plots):
        parts += [f"## {network}", network_table([row for row in rows if row.network == network]),
                  f"![{network}]({os.path.basename(plot)})"]
    return "\n\n".join(part for part in parts if part)


def network_table(rows):
    original = rows[0]
    lines = ["| budget | method | learnables (removed) | accuracy | after FT | FLOPs/image (reduction) "
             "| eager b1 / b32 ms | ORT b1 / b32 ms | speedup b32 eager / ORT | efficiency eager / ORT "
             "| compression s | note |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        if not row.learnables:
            lines.append(f"| {row.budget:.0%} | {row.method} | | | | | | | | | | {row.note} |")
            continue
        flop_reduction = original.flops / row.flops
        speedups = [speedup(original, row, kind) for kind in ("eager_ms", "onnx_ms")]
        lines.append(
            f"| {row.budget:.0%} | {row.method} "
            f"| {row.learnables:,} ({1 - row.learnables / original.learnables:.1%}) "
            f"| {pct(row.accuracy)} | {pct(row.fine_tuned)} "
            f"| {row.flops / 1e6:.2f} M ({flop_reduction:.2f}x) "
            f"| {ms(row.eager_ms)} | {ms(row.onnx_ms)} "
            f"| {' / '.join(ratio(s) for s in speedups)} "
            f"| {' / '.join(ratio(s / flop_reduction if s else None) for s in speedups)} "
            f"| {'' if row.method == 'original' else f'{row.seconds:.1f}'} | {row.note} |")
    return "\n".join(lines)


def speedup(original, row, kind, batch=32):
    before, after = getattr(original, kind).get(batch), getattr(row, kind).get(batch)
    return before / after if before and after else None


def pct(value):
    return "" if value != value else f"{100 * value:.2f}%"


def ms(latency):
    return " / ".join(f"{latency[batch]:.2f}" for batch in LATENCY_BATCHES) if latency else "n/a"


def ratio(value):
    return "n/a" if value is None else f"{value:.2f}x"


def targets_table(rows):
    """Per network and budget: rankwise against the best peer, and its speed efficiency."""
    lines = ["| network | budget | rankwise acc / after FT | best peer acc (method) | best peer after FT "
             "(method) | accuracy target | rankwise efficiency b32 eager / ORT | rankwise-latency "
             "efficiency b32 eager / ORT |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for network in dict.fromkeys(row.network for row in rows):
        own = [row for row in rows if row.network == network]
        original = own[0]
        for budget in sorted({row.budget for row in own if row.method != "original"}):
            at_budget = {row.method: row for row in own if row.budget == budget and row.learnables}
            ours = at_budget.get("rankwise")
            if ours is None:
                continue
            others = [row for method, row in at_budget.items() if method not in RANKWISE_METHODS
                      and 1 - row.learnables / original.learnables >= budget - 0.01]
            best = max(others, key=lambda row: row.accuracy, default=None)
            best_tuned = max(others, key=lambda row: row.fine_tuned, default=None)
            met = best is None or (ours.accuracy >= best.accuracy and ours.fine_tuned >= best_tuned.fine_tuned)
            lines.append(
                f"| {network} | {budget:.0%} | {pct(ours.accuracy)} / {pct(ours.fine_tuned)} "
                f"| {peer_cell(best, 'accuracy')} | {peer_cell(best_tuned, 'fine_tuned')} "
                f"| {'reached' if met else 'NOT reached'} "
                f"| {efficiency_cell(original, ours)} "
                f"| {efficiency_cell(original, at_budget.get('rankwise-latency'))} |")
    return "\n".join(lines)


def peer_cell(row, attribute):
    return "no peer at this budget" if row is None else f"{pct(getattr(row, attribute))} ({row.method})"


def efficiency_cell(original, row):
    if row is None:
        return "n/a"
    flop_reduction = original.flops / row.flops
    return " / ".join(ratio(s / flop_reduction if s else None)
                      for s in (speedup(original, row, kind) for kind in ("eager_ms", "onnx_ms")))


def plot_network(network, rows, stem):
    original = rows[0]
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    methods = list(dict.fromkeys(row.method for row in rows[1:]))
    for method in methods:
        done = [row for row in rows if row.method == method and row.learnables]
        if not done:
            continue
        removed = [100 * (1 - row.learnables / original.learnables) for row in done]
        style = {"linewidth": 2.5, "marker": "o"} if method in RANKWISE_METHODS else {"marker": "."}
        axes[0].plot(removed, [100 * row.accuracy for row in done], label=method, **style)
        axes[1].plot(removed, [100 * row.fine_tuned for row in done], label=method, **style)
        points = [(original.flops / row.flops, speedup(original, row, "eager_ms")) for row in done]
        axes[2].scatter(*zip(*points), label=method, s=40 if method in RANKWISE_METHODS else 15)
    for axis, title in zip(axes[:2], ("without fine-tuning", "after fine-tuning")):
        axis.axhline(100 * original.accuracy, color="gray", linestyle=":")
        axis.set(xlabel="learnables removed (%)", ylabel="test accuracy (%)", title=title,
                 ylim=(max(0, 100 * original.accuracy - 30), 100))
    reach = max([original.flops / row.flops for row in rows if row.learnables] + [2])
    axes[2].plot([1, reach], [1, reach], color="gray", linestyle=":", label="speedup = FLOP reduction")
    axes[2].plot([1, reach], [0.8, 0.8 * reach], color="gray", linestyle="--", label="0.8 of it")
    axes[2].set(xlabel="FLOP reduction (x)", ylabel="realised speedup, batch 32 eager (x)",
                title="speed on this CPU")
    axes[1].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    figure.suptitle(f"{network}: rankwise and the peers")
    figure.tight_layout()
    path = os.path.join(HERE, "results", f"{stem}_{network}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def update_benchmarks_section(path, body, profile_name):
    """Replace the text between the side-by-side markers of BENCHMARKS.md by `body`.

    A quick run does not replace the results of a full one.
    """
    with open(path) as stream:
        text = stream.read()
    start, end = (re.escape(marker) for marker in MARKERS)
    current = re.search(start + ".*" + end, text, flags=re.S)
    if not current:
        raise ValueError(f"{path} has no {MARKERS[0]} ... {MARKERS[1]} section to replace")
    if profile_name == "quick" and "Profile `full`" in current.group(0):
        print(f"{path} keeps the full profile's results (see bench/results/side_by_side_quick.md)")
        return
    section = environment_markdown() + "\n\n" + body.replace("\n## ", "\n### ").replace(
        "](side_by_side_", "](bench/results/side_by_side_")
    text = re.sub(start + ".*" + end, lambda _: f"{MARKERS[0]}\n{section}\n{MARKERS[1]}", text, flags=re.S)
    with open(path, "w") as stream:
        stream.write(text)


if __name__ == "__main__":
    main()

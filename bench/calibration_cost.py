"""Cost of NeuronPCA's calibration pass against a plain forward pass, and of the eigen-decompositions.

For the pretrained MNIST CNN and MLP and N = 16 batches of 256 training images:

- forward: ``model(batch)`` for every batch, eval mode, under ``torch.no_grad()``;
- calibration: ``rw.NeuronPCA(model, batches, verbosity="off")``, the whole constructor
  (hooks, float64 moment accumulation, weight Grams);
- spectra: on a fresh NeuronPCA, ``npca.spectrum(name, side)`` for every analysed layer and
  every side it analyses (all eigen-decompositions the library can need);
- first compression: on a fresh NeuronPCA, the first
  ``rw.compress_network_using_projection(model, npca, explained_variance_goal=0.95)``
  (spectra, rank selection and building the layers), and a second call that reuses the spectra.

Each time is the median of 3 repeats after one warm-up; forward and calibration repeats are
interleaved so that a slow spell of the machine hits both alike. A second table repeats the
forward / calibration comparison with 64 batches, to show whether the ratio is a fixed cost
that more data amortises or a cost per batch.

Run from the repository root: ``python bench/calibration_cost.py``.
Writes ``bench/results/calibration_cost.md``.
"""

import os
import statistics
import time

import torch

import rankwise as rw
from environment import write_result
from rankwise.datasets import load_mnist
from rankwise.examples import pretrained_mnist

NUM_BATCHES = 16
SCALING_BATCHES = 64
BATCH_SIZE = 256
REPEATS = 3
RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "calibration_cost.md")


def seconds(function):
    """Wall-clock seconds of one call of ``function()``."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def median_seconds(function, prepare=None):
    """Median over `REPEATS` calls after one warm-up; ``prepare()`` (untimed) gives the argument."""
    prepare = prepare or (lambda: None)
    function(prepare())
    times = []
    for _ in range(REPEATS):
        argument = prepare()
        times.append(seconds(lambda: function(argument)))
    return statistics.median(times)


def plain_forward(model, batches):
    with torch.no_grad():
        for batch in batches:
            model(batch)


def all_spectra(npca):
    """Compute every spectrum the NeuronPCA can give (a Linear's input side is not analysed)."""
    for name in npca.layer_names:
        for side in ("input", "output"):
            try:
                npca.spectrum(name, side)
            except ValueError:
                pass


def interleaved_medians(model, batches):
    """Median forward and calibration times, their repeats interleaved, after a warm-up each."""
    def forward():
        plain_forward(model, batches)

    def calibrate():
        rw.NeuronPCA(model, batches, verbosity="off")

    forward(), calibrate()
    forward_times, calibration_times = [], []
    for _ in range(REPEATS):
        forward_times.append(seconds(forward))
        calibration_times.append(seconds(calibrate))
    return statistics.median(forward_times), statistics.median(calibration_times)


def measure(name, batches):
    """All timings of network `name`, as a dict of seconds."""
    model = pretrained_mnist(name).eval()

    def fresh_npca():
        return rw.NeuronPCA(model, batches, verbosity="off")

    def compress(npca):
        rw.compress_network_using_projection(model, npca, explained_variance_goal=0.95, verbosity="off")

    def compress_twice(npca):
        compress(npca)
        return npca

    forward, calibration = interleaved_medians(model, batches)
    return {
        "name": name,
        "forward": forward,
        "calibration": calibration,
        "spectra": median_seconds(all_spectra, fresh_npca),
        "first_compression": median_seconds(compress, fresh_npca),
        "second_compression": median_seconds(compress, lambda: compress_twice(fresh_npca())),
    }


def markdown(results):
    lines = [
        "| network | plain forward | NeuronPCA calibration | ratio | all spectra (eigh) "
        "| first compression | later compression |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| MNIST {r['name']} | {r['forward']:.3f} s | {r['calibration']:.3f} s "
            f"| {r['calibration'] / r['forward']:.2f}x | {r['spectra']:.3f} s "
            f"| {r['first_compression']:.3f} s | {r['second_compression']:.3f} s |")
    return "\n".join(lines)


def scaling_markdown(train_images):
    """Forward and calibration times with `SCALING_BATCHES` batches, as a markdown table."""
    batches = list(train_images[:SCALING_BATCHES * BATCH_SIZE].split(BATCH_SIZE))
    lines = [f"| network ({SCALING_BATCHES} batches) | plain forward | NeuronPCA calibration | ratio |",
             "|---|---:|---:|---:|"]
    for name in ("cnn", "mlp"):
        forward, calibration = interleaved_medians(pretrained_mnist(name), batches)
        lines.append(f"| MNIST {name} | {forward:.3f} s | {calibration:.3f} s "
                     f"| {calibration / forward:.2f}x |")
    return "\n".join(lines)


def main():
    train_images, _ = load_mnist("train")
    batches = list(train_images[:NUM_BATCHES * BATCH_SIZE].split(BATCH_SIZE))
    results = [measure(name, batches) for name in ("cnn", "mlp")]
    scaling = scaling_markdown(train_images)
    notes = (
        f"{NUM_BATCHES} batches of {BATCH_SIZE} MNIST training images. Median of {REPEATS} "
        "repeats after a warm-up (forward and calibration repeats interleaved). *plain forward*: "
        "`model(batch)` over all batches under `torch.no_grad()`; *NeuronPCA calibration*: the "
        "whole `rw.NeuronPCA(model, batches, verbosity=\"off\")` call; *all spectra*: "
        "`npca.spectrum(name, side)` for every analysed layer and side on a fresh NeuronPCA; "
        "*first compression*: the first `compress_network_using_projection(model, npca, "
        "explained_variance_goal=0.95)` on a fresh NeuronPCA (spectra + ranks + new layers); "
        "*later compression*: the same call once the spectra are cached."
    )
    write_result(RESULT, "Calibration cost", notes + "\n\n" + markdown(results) + "\n\n" + scaling)


if __name__ == "__main__":
    main()

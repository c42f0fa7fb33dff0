"""Cost of the analysis report, of saving and loading, and of ONNX export, on the MNIST networks.

For the pretrained MNIST CNN and MLP, with a NeuronPCA of 16 batches of 256 training images:

- analyze: ``rw.analyze(model, npca, verbosity="off")`` (default goals: three explained
  variance goals, three learnables reduction goals) once the spectra are computed;
- HTML / JSON: ``report.to_html`` and ``report.to_json``, time and file size;
- save / load: the network compressed at ``learnables_reduction_goal=0.9`` written by
  ``rw.save(..., include_architecture=True)`` and read back by ``rw.load(path, model=...)``
  (rebuilt from the spec) and ``rw.load(path, trust_pickle=True)`` (the stored architecture);
  file size against ``torch.save(net)``; whether
  the loaded networks give bit-identical outputs on the 10 000 test images;
- ONNX: ``rw.export_onnx`` of the same network, the largest absolute difference between the
  onnxruntime (CPU) and torch logits on the test images, and both inference times.

Each time is the median of 3 repeats after one warm-up.
Run from the repository root: ``python bench/report_io_export.py``.
Writes ``bench/results/report_io_export.md``.
"""

import os
import tempfile

import numpy as np
import onnxruntime
import torch

import rankwise as rw
from environment import median_seconds, write_result
from rankwise.datasets import load_mnist
from rankwise.examples import EXAMPLE_MODELS, pretrained_mnist

NUM_BATCHES = 16
BATCH_SIZE = 256
REPEATS = 3
GOAL = 0.9
RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "report_io_export.md")


def kilobytes(path):
    return f"{os.path.getsize(path) / 1024:,.0f} kB"


def torch_logits(model, images):
    with torch.no_grad():
        return torch.cat([model(batch) for batch in images.split(1000)]).numpy()


def onnx_logits(session, images):
    return np.concatenate([session.run(["output"], {"input": batch.numpy()})[0]
                           for batch in images.split(1000)])


def measure(name, calibration, test_images, folder):
    """One row of each table for network `name`."""
    model = pretrained_mnist(name, verbose=False)
    npca = rw.NeuronPCA(model, calibration, verbosity="off")
    analyze = median_seconds(lambda: rw.analyze(model, npca, verbosity="off"), REPEATS)
    report = rw.analyze(model, npca, verbosity="off")
    html, json_path = os.path.join(folder, f"{name}.html"), os.path.join(folder, f"{name}.json")
    html_seconds = median_seconds(lambda: report.to_html(html), REPEATS)
    report.to_json(json_path)
    report_row = (f"| MNIST {name.upper()} | {len(report.analysed_layers)} | {analyze:.3f} s | "
                  f"{html_seconds:.2f} s ({kilobytes(html)}) | {kilobytes(json_path)} |")

    net, _ = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=GOAL,
                                                  verbosity="off")
    saved, pickled = os.path.join(folder, f"{name}.safetensors"), os.path.join(folder, f"{name}.pt")
    save = median_seconds(lambda: rw.save(net, saved, include_architecture=True), REPEATS)
    torch.save(net, pickled)
    architecture = EXAMPLE_MODELS[name]()
    from_spec = median_seconds(lambda: rw.load(saved, model=architecture), REPEATS)
    stored = median_seconds(lambda: rw.load(saved, trust_pickle=True), REPEATS)
    expected = torch_logits(net, test_images)
    identical = all(np.array_equal(torch_logits(loaded, test_images), expected)
                    for loaded in (rw.load(saved, model=architecture), rw.load(saved, trust_pickle=True)))
    io_row = (f"| MNIST {name.upper()} | {rw.count_learnables(net):,} | {kilobytes(saved)} | "
              f"{kilobytes(pickled)} | {save:.3f} s | {from_spec:.3f} s | {stored:.3f} s | "
              f"{'yes' if identical else 'NO'} |")

    onnx_path = os.path.join(folder, f"{name}.onnx")
    export = median_seconds(lambda: rw.export_onnx(net, onnx_path, test_images[:BATCH_SIZE], verbosity="off"),
                            REPEATS)
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    difference = np.abs(onnx_logits(session, test_images) - expected).max()
    torch_time = median_seconds(lambda: torch_logits(net, test_images), REPEATS)
    onnx_time = median_seconds(lambda: onnx_logits(session, test_images), REPEATS)
    onnx_row = (f"| MNIST {name.upper()} | {export:.2f} s | {difference:.1e} | {torch_time:.2f} s | "
                f"{onnx_time:.2f} s |")
    return report_row, io_row, onnx_row


def main():
    train_images, _ = load_mnist("train")
    test_images, _ = load_mnist("test")
    calibration = list(train_images[:NUM_BATCHES * BATCH_SIZE].split(BATCH_SIZE))
    with tempfile.TemporaryDirectory() as folder:
        rows = [measure(name, calibration, test_images, folder) for name in ("cnn", "mlp")]
    report_rows, io_rows, onnx_rows = zip(*rows)
    body = "\n".join([
        "## Analysis report", "",
        "| network | layers analysed | rw.analyze | to_html (size) | to_json size |",
        "|---|---:|---:|---:|---:|", *report_rows, "",
        f"## Saving and loading (compressed at learnables_reduction_goal={GOAL})", "",
        "| network | learnables | rw.save file | torch.save file | save | load(model=) | load(trust_pickle=True) "
        "| outputs bit-identical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|", *io_rows, "",
        "## ONNX export (same networks; 10 000 test images in batches of 1000)", "",
        "| network | export_onnx | max abs logit difference | torch inference | onnxruntime inference |",
        "|---|---:|---:|---:|---:|", *onnx_rows,
    ])
    write_result(RESULT, "Analysis report, save/load and ONNX export", body)


if __name__ == "__main__":
    main()

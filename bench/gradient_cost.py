"""What the loss-aware default costs: NeuronPCA with and without gradient statistics (issue 21).

The workloads of bench/calibration_cost.py (the pretrained MNIST CNN and MLP, 16 batches of 256
training images; all-MiniLM-L6-v2 on 64 calibration sentences in padded batches of 32), one
thread, CPU seconds of the process (``time.process_time``; the median of ``--repeats`` runs after
a warm-up), for:

- ``forward``: the plain forward pass over the batches;
- ``variance``: ``NeuronPCA(model, batches, loss_fn=None, validation=None)``, the calibration of
  the earlier default (one forward pass with the hooks);
- ``auto``: ``NeuronPCA(model, batches)``, today's default (every fourth batch held out, the
  gradient statistics of the loss the output defines on every fourth batch);
- ``every batch``: ``NeuronPCA(model, batches, loss_fn=<the same loss>)``, the gradients on
  every batch (the cost the issue measured: 3.1x to 6.3x the variance pass).

    python bench/gradient_cost.py            # writes bench/results/gradient_cost.md
"""

import argparse
import os
import statistics
import sys

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

from calibration_cost import forward_over, seconds, workload  # noqa: E402
from environment import write_result  # noqa: E402

RESULT = os.path.join(BENCH, "results", "gradient_cost.md")
WORKLOADS = {"mnist_cnn": "kl", "mnist_mlp": "kl", "minilm_batch32": "mse"}
"""Each workload and the loss ``loss_fn="auto"`` takes for it (MNIST images come without their
labels here, so "auto" reads the logits as any other output: mse)."""


def measure(name: str, loss: str, repeats: int) -> dict:
    import rankwise as rw

    torch.set_num_threads(1)
    model, batches, forward_one = workload(name)

    runs = {"forward": lambda: forward_over(model, batches, forward_one),
            "variance": lambda: rw.NeuronPCA(model, batches, verbosity="off", loss_fn=None, validation=None),
            "auto": lambda: rw.NeuronPCA(model, batches, verbosity="off"),
            "every batch": lambda: rw.NeuronPCA(model, batches, verbosity="off", loss_fn=loss)}
    for run in runs.values():
        run()  # warm-up
    return {key: statistics.median(seconds(run)[0] for _ in range(repeats)) for key, run in runs.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for name, loss in WORKLOADS.items():
        found = measure(name, loss, args.repeats)
        base = found["variance"]
        rows.append(f"| {name} | {found['forward']:.2f} | {base:.2f} | {found['auto']:.2f} ({found['auto'] / base:.2f}x) "
                    f"| {found['every batch']:.2f} ({found['every batch'] / base:.2f}x, loss_fn={loss!r}) |")
        print(rows[-1], flush=True)
    body = ("CPU seconds of the process, one thread (`torch.set_num_threads(1)`), median of "
            f"{args.repeats} runs after a warm-up. *variance*: `NeuronPCA(..., loss_fn=None, validation=None)`; "
            "*auto*: `NeuronPCA(...)` (today's default: gradients on every fourth batch, every fourth batch "
            "held out); *every batch*: `NeuronPCA(..., loss_fn=...)`.\n\n"
            "| workload | forward | variance | auto (x variance) | every batch (x variance) |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n\nCommand: `python bench/gradient_cost.py`\n")
    write_result(RESULT, "Cost of the gradient statistics (loss_fn='auto' against the variance pass)", body)


if __name__ == "__main__":
    main()

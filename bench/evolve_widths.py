"""Evolving widths on MNIST: shrink a 2M-learnable ResNet-like network, grow a too-narrow one.

Three kinds of training run, all with the same recipe (AdamW, learning rate 2e-3 with a cosine
decay, decoupled weight decay 1.0, batches of 128, 6 epochs on the first 55 000 training
images; the last 5 000 are the validation images logged during training):

- *shrink*: the wide network (about 1.95M learnables, most of them in its first fully
  connected layer) trained with a ``rw.WidthEvolver`` stepping after every optimizer step;
- *grow*: the same architecture with every width set to 2, trained with the same evolver;
- *scratch*: a network built directly with the final widths of an evolved run (so with the
  same learnables), trained from its random initialisation without the evolver.

The evolver gets the last 8 training batches as ``data`` for its least-squares refits. Test
accuracy on the 10 000 MNIST test images at the end. Plots of widths, learnables and
validation accuracy over training go next to the result file.

Run from the repository root: ``python bench/evolve_widths.py``.
Writes ``bench/results/evolve_widths.md`` and ``bench/results/evolve_widths_*.png``.
"""

import collections
import math
import os
import time

import torch
from torch import nn

import rankwise as rw
from environment import write_result
from rankwise.datasets import load_mnist
from rankwise.examples import accuracy

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WIDE = {"stem": 16, "inner1": 32, "down": 32, "inner2": 64, "hidden": 1200}
NARROW = {name: 2 for name in WIDE}
EVOLVER = {"shrink_tol": 0.35, "grow_tol": 0.5, "grow_fraction": 0.5, "min_width": 8,
           "every": 100, "until": 1500}
RECIPE = {"epochs": 6, "lr": 2e-3, "weight_decay": 1.0, "batch_size": 128}
RECENT_BATCHES = 8
TRAIN_IMAGES = 55_000
LOG_EVERY = 100
SEEDS = (0, 1)
TARGET_LEARNABLES, TARGET_ACCURACY, TARGET_SECONDS = 10_000, 0.985, 30 * 60


class Block(nn.Module):
    """``x -> relu(x + BN(conv(relu(BN(conv(x))))))``, 3x3 convolutions, ``inner`` channels inside."""

    def __init__(self, channels, inner):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, inner, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class MnistResNet(nn.Module):
    """stem conv (28x28) - pool - residual block (14x14) - pool - conv - residual block (7x7) -
    flatten - fc - fc 10. Widths: ``stem`` (tied to block 1's output), ``inner1``, ``down``
    (tied to block 2's output), ``inner2``, ``hidden``."""

    def __init__(self, stem, inner1, down, inner2, hidden):
        super().__init__()
        self.stem = nn.Conv2d(1, stem, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(stem)
        self.block1 = Block(stem, inner1)
        self.pool = nn.MaxPool2d(2)
        self.down = nn.Conv2d(stem, down, 3, padding=1, bias=False)
        self.bn_down = nn.BatchNorm2d(down)
        self.block2 = Block(down, inner2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(down * 7 * 7, hidden)
        self.out = nn.Linear(hidden, 10)

    def forward(self, x):
        x = self.block1(self.pool(torch.relu(self.bn0(self.stem(x)))))
        x = self.block2(torch.relu(self.bn_down(self.down(self.pool(x)))))
        return self.out(torch.relu(self.fc(self.flatten(x))))


def widths_of(model):
    """The constructor arguments of a network of ``model``'s current widths."""
    return {"stem": model.stem.out_channels, "inner1": model.block1.conv1.out_channels,
            "down": model.down.out_channels, "inner2": model.block2.conv1.out_channels,
            "hidden": model.fc.out_features}


def train(widths, seed, data, evolve):
    """Train a network of ``widths`` (with the evolver when ``evolve``); return its numbers."""
    torch.manual_seed(seed)
    model = MnistResNet(**widths)
    start_learnables = rw.count_learnables(model)
    train_x, train_y, val_x, val_y = data
    evolver = (rw.WidthEvolver(model, train_x[:1], seed=seed, verbosity="steps", **EVOLVER)
               if evolve else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    if evolver is not None:
        evolver.attach(optimizer)
    steps_per_epoch = math.ceil(len(train_x) / RECIPE["batch_size"])
    total = RECIPE["epochs"] * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    recent = collections.deque(maxlen=RECENT_BATCHES)
    validation, evolver_seconds, start = [], 0.0, time.perf_counter()
    for step, batch in enumerate(_batches(len(train_x), seed), start=1):
        model.train()
        loss = nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        recent.append(train_x[batch])
        if evolver is not None:
            evolver_start = time.perf_counter()
            evolver.step(data=list(recent))
            evolver_seconds += time.perf_counter() - evolver_start
        if step % LOG_EVERY == 0 or step == total:
            validation.append((step, accuracy(model, val_x, val_y)))
            if evolver is not None:
                evolver.log(**{"validation accuracy": validation[-1][1]})
    return {"model": model, "evolver": evolver, "seconds": time.perf_counter() - start,
            "evolver_seconds": evolver_seconds, "start_learnables": start_learnables,
            "learnables": rw.count_learnables(model), "validation": validation}


def _batches(count, seed):
    for epoch in range(RECIPE["epochs"]):
        order = torch.randperm(count, generator=torch.Generator().manual_seed(1000 * seed + epoch))
        yield from order.split(RECIPE["batch_size"])


def run_seed(seed, data, test):
    """The four runs of one seed: shrink, grow, and scratch at each one's final widths."""
    rows = []
    for label, widths in (("shrink", WIDE), ("grow", NARROW)):
        evolved = train(widths, seed, data, evolve=True)
        evolved["test"] = accuracy(evolved["model"], *test)
        final = widths_of(evolved["model"])
        scratch = train(final, seed, data, evolve=False)
        scratch["test"] = accuracy(scratch["model"], *test)
        if seed == SEEDS[0]:
            evolved["evolver"].history.plot(os.path.join(RESULTS, f"evolve_widths_{label}.png"))
        rows.append((seed, label, widths, final, evolved, scratch))
        print(f"seed {seed} {label}: evolved {evolved['learnables']:,} learnables, test "
              f"{evolved['test']:.2%} in {evolved['seconds']:.0f} s; scratch {scratch['test']:.2%} "
              f"in {scratch['seconds']:.0f} s", flush=True)
    return rows


def _spec(widths):
    return "/".join(str(widths[name]) for name in WIDE)


def markdown(rows, total_seconds):
    lines = [
        "Widths are listed as stem / inner1 / down / inner2 / hidden (stem and down are each tied "
        "by a residual addition to their block's output).",
        "",
        "| seed | run | start widths (learnables) | final widths | final learnables | evolved test accuracy "
        "| time (of which evolver) | scratch test accuracy | scratch time |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for seed, label, start, final, evolved, scratch in rows:
        lines.append(
            f"| {seed} | {label} | {_spec(start)} ({evolved['start_learnables']:,}) | {_spec(final)} "
            f"| {evolved['learnables']:,} | {evolved['test']:.2%} "
            f"| {evolved['seconds']:.0f} s ({evolved['evolver_seconds']:.1f} s) "
            f"| {scratch['test']:.2%} | {scratch['seconds']:.0f} s |")
    lines += ["", f"Whole benchmark: {total_seconds / 60:.1f} minutes wall-clock.", "",
              _targets(rows), "", "Changes of the first seed's runs:", ""]
    for seed, label, _, _, evolved, _ in rows:
        if seed == SEEDS[0]:
            lines += [f"**{label}** (plot: `evolve_widths_{label}.png`)", "", "```",
                      evolved["evolver"].history.table(), "```", ""]
    return "\n".join(lines)


def _targets(rows):
    shrink = [r for r in rows if r[1] == "shrink"]
    met = [r for r in shrink if r[4]["learnables"] <= TARGET_LEARNABLES and r[4]["test"] >= TARGET_ACCURACY
           and r[4]["seconds"] <= TARGET_SECONDS]
    grow = [r for r in rows if r[1] == "grow"]
    grown = [r for r in grow if r[4]["test"] >= TARGET_ACCURACY]
    return (f"Target (shrink run ends at <= {TARGET_LEARNABLES:,} learnables with >= "
            f"{TARGET_ACCURACY:.1%} test accuracy in under 30 minutes): met by {len(met)} of "
            f"{len(shrink)} seeds. Grow run reaching {TARGET_ACCURACY:.1%}: {len(grown)} of {len(grow)} seeds.")


def main():
    start = time.perf_counter()
    images, labels = load_mnist("train")
    data = (images[:TRAIN_IMAGES], labels[:TRAIN_IMAGES], images[TRAIN_IMAGES:], labels[TRAIN_IMAGES:])
    test = load_mnist("test")
    rows = [row for seed in SEEDS for row in run_seed(seed, data, test)]
    settings = ", ".join(f"{k}={v}" for k, v in EVOLVER.items())
    recipe = ", ".join(f"{k}={v}" for k, v in RECIPE.items())
    notes = (f"Evolver settings: `rw.WidthEvolver(model, x, {settings})`, stepped after every "
             f"optimizer step with the last {RECENT_BATCHES} training batches as data. Recipe: "
             f"AdamW ({recipe}), cosine decay of the learning rate.")
    write_result(os.path.join(RESULTS, "evolve_widths.md"), "Evolving widths on MNIST",
                 notes + "\n\n" + markdown(rows, time.perf_counter() - start))


if __name__ == "__main__":
    main()

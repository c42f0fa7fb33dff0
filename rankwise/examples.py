"""Small example networks trained on real data, for the demo, the benchmarks and the docs.

Two MNIST classifiers are defined here: a convolutional network (`mnist_cnn`, about 822k
learnables, most of them in its first fully connected layer) and a multilayer perceptron
(`mnist_mlp`). `pretrained_mnist` trains either one once with a fixed seed and keeps its
weights in the user's cache folder, so later calls load them in a fraction of a second.

For the kernel-truncation study two convolution-heavy networks follow: a vanilla four-layer
CNN (`mnist_vanilla_cnn`, most learnables in its deeper 3x3 kernels) and a small ResNet
(`mnist_small_resnet`, two residual blocks with batch normalisation).
"""

import itertools
import math
import os
import pathlib
import tempfile
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from rankwise.datasets import load_mnist

PRETRAINED_RECIPES = {
    "cnn": {"epochs": 3, "lr": 1e-3, "batch_size": 128, "seed": 0, "max_steps": None},
    "mlp": {"epochs": 3, "lr": 1e-3, "batch_size": 128, "seed": 0, "max_steps": None},
    "vanilla_cnn": {"epochs": 2, "lr": 1e-3, "batch_size": 128, "seed": 0, "max_steps": None},
    "small_resnet": {"epochs": 2, "lr": 1e-3, "batch_size": 128, "seed": 0, "max_steps": None},
}
"""Training settings of each pretrained network: Adam with a cosine learning-rate decay on the
60 000 MNIST training images."""

TRAINING_TIME = {"cnn": "about 30 s", "mlp": "about 5 s", "vanilla_cnn": "about 1.5 min",
                 "small_resnet": "about 3 min"}
"""How long the first call of `pretrained_mnist` trains each network on 2 CPU cores (measured
with an empty cache: 29 s, 4.4 s, 96 s and 179 s, the last two on a machine also running other
jobs)."""

RECIPE_VERSION = 1
"""Part of the cache file names: bump it when a recipe or an architecture changes."""


def mnist_cnn():
    """Build the (untrained) example convolutional network for MNIST.

    Two 5x5 convolutions (16 and 32 channels, ``padding=2``), each followed by a ReLU and a
    2x2 max-pooling, then two fully connected layers 1568 -> 512 -> 10. It has 821 706
    learnables, 803 328 of them in the first fully connected layer.

    Returns
    -------
    torch.nn.Sequential
        Maps ``(N, 1, 28, 28)`` images to ``(N, 10)`` logits.
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


def mnist_mlp():
    """Build the (untrained) example multilayer perceptron for MNIST.

    Fully connected layers 784 -> 512 -> 256 -> 10 with ReLUs in between; 535 818 learnables.

    Returns
    -------
    torch.nn.Sequential
        Maps ``(N, 1, 28, 28)`` images to ``(N, 10)`` logits.
    """
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def mnist_vanilla_cnn():
    """Build the (untrained) vanilla four-layer CNN for MNIST, for the kernel-truncation study.

    Four 3x3 convolutions (``padding=1``) with 16, 32, 64 and 64 channels, each followed by a
    ReLU, 2x2 max-pooling after the first two, then one fully connected layer 3136 -> 10. It
    has 91 594 learnables, 55 424 of them in the last two (deepest) kernels.

    Returns
    -------
    torch.nn.Sequential
        Maps ``(N, 1, 28, 28)`` images to ``(N, 10)`` logits.
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 10),
    )


class ResidualBlock(nn.Module):
    """The basic ResNet block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    ``conv1`` (3x3, with the block's stride) and ``conv2`` (3x3) have no bias (batch
    normalisation follows); the shortcut is a 1x1 convolution with the stride and batch
    normalisation, as the channel count changes in every block used here.

    Parameters
    ----------
    in_channels, out_channels : int
    stride : int
    """

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                      nn.BatchNorm2d(out_channels))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


def mnist_small_resnet():
    """Build the (untrained) small ResNet for MNIST, for the kernel-truncation study.

    A 3x3 stem convolution with stride 2 (16 channels, 14x14), a residual block 16 -> 32 at
    14x14 and one 32 -> 64 with stride 2 (7x7), global average pooling and a fully connected
    layer 64 -> 10; 73 082 learnables.

    Returns
    -------
    torch.nn.Sequential
        Maps ``(N, 1, 28, 28)`` images to ``(N, 10)`` logits.
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        ResidualBlock(16, 32, 1),
        ResidualBlock(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )


EXAMPLE_MODELS = {"cnn": mnist_cnn, "mlp": mnist_mlp, "vanilla_cnn": mnist_vanilla_cnn,
                  "small_resnet": mnist_small_resnet}


@torch.no_grad()
def accuracy(model, images, labels, batch_size=1000):
    """Fraction of `images` that `model` classifies as `labels`.

    The model is evaluated in eval mode, batch by batch, and put back in the mode it was in.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning ``(N, classes)`` logits.
    images : torch.Tensor
        Inputs, first dimension N.
    labels : torch.Tensor
        ``(N,)`` integer class labels.
    batch_size : int, default 1000
        Images per forward pass.

    Returns
    -------
    float
        Accuracy in [0, 1].
    """
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start:start + batch_size])
        correct += (logits.argmax(dim=1) == labels[start:start + batch_size]).sum().item()
    model.train(was_training)
    return correct / len(images)


def train_classifier(model, images, labels, epochs, lr=1e-3, batch_size=128, seed=0,
                     schedule="cosine", max_steps=None, progress=True, description="training"):
    """Train a classifier in place with Adam on the cross-entropy loss.

    Each epoch visits the images once in an order drawn from a generator seeded with
    ``seed + epoch``, so the run is reproducible for a given initialisation. With the cosine
    schedule the learning rate at step t of T is ``lr * (1 + cos(pi t / T)) / 2``.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning ``(N, classes)`` logits; trained in place.
    images, labels : torch.Tensor
        Training inputs and ``(N,)`` integer labels.
    epochs : int
        Passes over the training set.
    lr : float, default 1e-3
        Adam learning rate.
    batch_size : int, default 128
        Images per optimisation step.
    seed : int, default 0
        Seed of the shuffling order.
    schedule : {"cosine", "constant"}, default "cosine"
        Learning-rate schedule over the whole run.
    max_steps : int, optional
        Stop after this many optimisation steps (a smoke-test budget); no limit by default.
    progress : bool, default True
        Show a tqdm progress bar.
    description : str, default "training"
        The progress bar's label.

    Returns
    -------
    torch.nn.Module
        `model`, trained, in eval mode.
    """
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}; use 'cosine' or 'constant'")
    steps_per_epoch = -(-len(images) // batch_size)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _lr_factor(schedule, total))
    model.train()
    steps = itertools.islice(_shuffled_batches(len(images), batch_size, epochs, seed), total)
    for batch in tqdm(steps, total=total, desc=description, unit="batch", disable=not progress):
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        scheduler.step()
    return model.eval()


def _shuffled_batches(count, batch_size, epochs, seed):
    """Yield the indices of every batch of every epoch, reshuffled each epoch."""
    for epoch in range(epochs):
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch))
        yield from order.split(batch_size)


def _lr_factor(schedule, total_steps):
    """Multiplier of the base learning rate at each step, for `torch.optim.lr_scheduler.LambdaLR`."""
    if schedule == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


def cache_dir():
    """Folder where rankwise keeps trained example weights.

    ``$RANKWISE_CACHE`` if set, else ``$XDG_CACHE_HOME/rankwise``, else ``~/.cache/rankwise``.
    The folder is not created here.

    Returns
    -------
    pathlib.Path
    """
    if os.environ.get("RANKWISE_CACHE"):
        return pathlib.Path(os.environ["RANKWISE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "rankwise"
    return pathlib.Path.home() / ".cache" / "rankwise"


def pretrained_path(name):
    """Cache file of the pretrained example network `name` (see `pretrained_mnist`)."""
    return cache_dir() / f"mnist_{name}_v{RECIPE_VERSION}.pt"


def pretrained_mnist(name, verbose=True):
    """An example MNIST network, trained once and then loaded from the cache.

    The first call builds the network with ``torch.manual_seed(recipe["seed"])``, trains it
    with `train_classifier` on the 60 000 training images using ``PRETRAINED_RECIPES[name]``
    (2 or 3 epochs of Adam with a cosine decay; `TRAINING_TIME` says how long on 2 CPU cores) and
    writes its ``state_dict`` to `pretrained_path` atomically; with `verbose` it says so before
    training starts. Later calls load that file with ``weights_only=True``.

    Parameters
    ----------
    name : {"cnn", "mlp", "vanilla_cnn", "small_resnet"}
        Which network: `mnist_cnn`, `mnist_mlp`, `mnist_vanilla_cnn` or `mnist_small_resnet`.
    verbose : bool, default True
        Report training (progress bar, time, test accuracy) or loading.

    Returns
    -------
    torch.nn.Sequential
        The trained network on the CPU, in eval mode.

    Raises
    ------
    ValueError
        If `name` is not a known example network.
    """
    if name not in EXAMPLE_MODELS:
        raise ValueError(f"unknown example network {name!r}; choose one of {sorted(EXAMPLE_MODELS)}")
    path = pretrained_path(name)
    if path.is_file():
        model = EXAMPLE_MODELS[name]()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        if verbose:
            print(f"loaded pretrained MNIST {name} from {path}")
        return model.eval()
    if verbose:
        print(f"training MNIST {name} once ({PRETRAINED_RECIPES[name]['epochs']} epochs on the 60 000 "
              f"training images, {TRAINING_TIME[name]} on 2 CPU cores); its weights will be cached in "
              f"{path} and loaded from there by later runs{_busy_machine_note()}")
    with torch.random.fork_rng(devices=[]):
        model = _train_pretrained(name, verbose)
    _save_atomically(model.state_dict(), path)
    return model


def _busy_machine_note() -> str:
    """A warning to append when other processes keep the CPU cores busy, else ``""``.

    On 2 cores at a load average of 8-9, the CNN's training took 484 s instead of 29 s: the
    torch threads wait for each other while other processes hold the cores.
    """
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cores:
        return ""
    return (f"; the machine is busy (load average {load:.1f} on {cores} cores), so training may take "
            f"many times longer")


def _train_pretrained(name, verbose):
    """Build network `name` from its seeded initialisation and train it with its recipe."""
    recipe = PRETRAINED_RECIPES[name]
    torch.manual_seed(recipe["seed"])
    return train_with_recipe(EXAMPLE_MODELS[name](), recipe, f"MNIST {name}", verbose)


def train_with_recipe(model, recipe, description, verbose):
    """Train `model` in place on the 60 000 MNIST training images with `recipe`.

    `recipe` holds the arguments of `train_classifier` (``epochs``, ``lr``, ``batch_size``,
    ``seed``, ``max_steps``). With `verbose`, a progress bar, then the training time and the
    test accuracy, printed as "trained `description` in ...". Returns `model`.
    """
    images, labels = load_mnist("train")
    start = time.perf_counter()
    train_classifier(model, images, labels, recipe["epochs"], lr=recipe["lr"],
                     batch_size=recipe["batch_size"], seed=recipe["seed"],
                     max_steps=recipe["max_steps"], progress=verbose, description=f"training {description}")
    if verbose:
        seconds = time.perf_counter() - start
        test_accuracy = accuracy(model, *load_mnist("test"))
        print(f"trained {description} in {seconds:.1f} s: test accuracy {test_accuracy:.2%}")
    return model


def _save_atomically(state_dict, path):
    """Write `state_dict` to `path` through a temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state_dict, stream)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise

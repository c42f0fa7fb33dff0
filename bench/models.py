"""Networks of the benchmarks that are not rankwise example networks.

`resnet18_mnist`: torchvision's ResNet-18 adapted to MNIST, trained once on the CPU and then
loaded from the same cache folder as `rankwise.examples.pretrained_mnist`.
"""

import torch
from torch import nn
from torchvision.models import resnet18

from rankwise.examples import _save_atomically, cache_dir, train_with_recipe

RESNET18_RECIPE = {"epochs": 1, "lr": 1e-3, "batch_size": 128, "seed": 0, "max_steps": None}
"""Adam with a cosine decay, one pass over the 60 000 MNIST training images (111 s on
2 CPU cores with 2 torch threads)."""

RESNET18_VERSION = 1
"""Part of the cache file name: bump it when the recipe or the architecture changes."""


def resnet18_mnist_architecture():
    """The untrained network of `resnet18_mnist`.

    torchvision's ``resnet18(num_classes=10)`` with one change: the first convolution takes 1
    input channel (grey MNIST images) instead of 3; it keeps torchvision's 7x7 kernel, stride 2,
    padding 3 and no bias. Everything else (max-pooling, the four stages of basic blocks with
    batch normalisation, global average pooling, the final ``fc`` layer 512 -> 10) is
    torchvision's, so a 28x28 image reaches the last stage as 1x1. 11 175 370 learnables.

    Returns
    -------
    torchvision.models.ResNet
    """
    model = resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def resnet18_path():
    """Cache file of `resnet18_mnist`."""
    return cache_dir() / f"resnet18_mnist_v{RESNET18_VERSION}.pt"


def resnet18_mnist(verbose=True):
    """torchvision's ResNet-18 for MNIST (see `resnet18_mnist_architecture`), trained and cached.

    The first call builds the network with ``torch.manual_seed(RESNET18_RECIPE["seed"])``,
    trains it with `rankwise.examples.train_with_recipe` (the 60 000 MNIST training images)
    using `RESNET18_RECIPE` and writes its ``state_dict``
    atomically to `resnet18_path`. Later calls load that file.

    Parameters
    ----------
    verbose : bool, default True
        Report training (progress bar, time, test accuracy) or loading.

    Returns
    -------
    torchvision.models.ResNet
        The trained network on the CPU, in eval mode.
    """
    path = resnet18_path()
    if path.is_file():
        model = resnet18_mnist_architecture()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        if verbose:
            print(f"loaded ResNet-18 for MNIST from {path}")
        return model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RESNET18_RECIPE["seed"])
        model = train_with_recipe(resnet18_mnist_architecture(), RESNET18_RECIPE,
                                  "ResNet-18 for MNIST", verbose)
    _save_atomically(model.state_dict(), path)
    return model.eval()

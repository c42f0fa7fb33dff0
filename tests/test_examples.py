"""Example MNIST networks: architectures, training loop, accuracy, and the weights cache."""

import pytest
import torch
from torch import nn

from rankwise import examples
from rankwise.datasets import load_mnist
from rankwise.examples import (accuracy, cache_dir, mnist_cnn, mnist_mlp, pretrained_mnist,
                               pretrained_path, train_classifier)


def learnables(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("factory, count", [(mnist_cnn, 821_706), (mnist_mlp, 535_818)])
def test_architecture_sizes_and_output_shape(factory, count):
    model = factory()
    assert learnables(model) == count
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_cnn_is_large_enough_for_the_benchmarks():
    assert learnables(mnist_cnn()) >= 800_000


class ConstantClassifier(nn.Module):
    """Predicts class `label` for every input."""

    def __init__(self, label):
        super().__init__()
        self.label = label

    def forward(self, x):
        return nn.functional.one_hot(torch.full((len(x),), self.label), 10).float()


def test_accuracy_is_the_fraction_correct_and_keeps_the_mode():
    labels = torch.tensor([3, 3, 1, 3, 0])
    model = ConstantClassifier(3).train()
    assert accuracy(model, torch.zeros(5, 1, 28, 28), labels, batch_size=2) == pytest.approx(0.6)
    assert model.training


def test_training_learns_a_small_subset():
    images, labels = load_mnist("train")
    images, labels = images[:1024], labels[:1024]
    torch.manual_seed(0)
    model = mnist_mlp()
    before = accuracy(model, images, labels)
    train_classifier(model, images, labels, epochs=3, batch_size=64, progress=False)
    assert accuracy(model, images, labels) > max(0.9, before + 0.5)
    assert not model.training


def test_max_steps_zero_leaves_the_weights_alone():
    model = mnist_mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    train_classifier(model, images, labels, epochs=2, max_steps=0, progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RANKWISE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "rankwise"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "rankwise"
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    assert pretrained_path("cnn").parent == tmp_path / "mine"


@pytest.fixture
def tiny_budget(monkeypatch, tmp_path):
    """Pretrained networks trained for a few steps only, cached under tmp_path."""
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(examples.PRETRAINED_RECIPES["mlp"], "max_steps", 3)
    return tmp_path / "cache"


def test_pretrained_is_trained_once_then_loaded(tiny_budget, monkeypatch):
    trained = pretrained_mnist("mlp", verbose=False)
    path = pretrained_path("mlp")
    assert path.parent == tiny_budget and path.is_file()
    assert [p.name for p in tiny_budget.iterdir()] == [path.name]  # no temporary file left

    def no_training(*args, **kwargs):
        raise AssertionError("the cached weights should have been loaded")

    monkeypatch.setattr(examples, "train_classifier", no_training)
    loaded = pretrained_mnist("mlp", verbose=False)
    assert not loaded.training
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_pretrained_training_is_reproducible_and_leaves_the_global_rng(tiny_budget):
    rng_state = torch.get_rng_state()
    first = pretrained_mnist("mlp", verbose=False).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_state)
    pretrained_path("mlp").unlink()
    second = pretrained_mnist("mlp", verbose=False).state_dict()
    for key, value in first.items():
        assert torch.equal(second[key], value)


def test_pretrained_unknown_name():
    with pytest.raises(ValueError, match="'cnn', 'mlp'"):
        pretrained_mnist("resnet")


def test_before_training_it_says_the_network_is_trained_once_and_where_it_is_cached(tiny_budget, monkeypatch,
                                                                                    capsys):
    monkeypatch.setattr(examples.os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    monkeypatch.setattr(examples.os, "cpu_count", lambda: 2)
    pretrained_mnist("mlp")
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (f"training MNIST mlp once (3 epochs on the 60 000 training images, about 5 s on 2 CPU "
                     f"cores); its weights will be cached in {pretrained_path('mlp')} and loaded from there "
                     f"by later runs")
    pretrained_mnist("mlp")
    assert capsys.readouterr().out == f"loaded pretrained MNIST mlp from {pretrained_path('mlp')}\n"


def test_a_busy_machine_is_named_before_training(tiny_budget, monkeypatch, capsys):
    monkeypatch.setattr(examples.os, "getloadavg", lambda: (8.5, 8.0, 7.0))
    monkeypatch.setattr(examples.os, "cpu_count", lambda: 2)
    pretrained_mnist("mlp")
    assert capsys.readouterr().out.splitlines()[0].endswith(
        "; the machine is busy (load average 8.5 on 2 cores), so training may take many times longer")


def test_every_example_network_has_a_recipe_and_an_expected_training_time():
    assert set(examples.PRETRAINED_RECIPES) == set(examples.TRAINING_TIME) == set(examples.EXAMPLE_MODELS)

"""Output metrics: whitened statistics are those of the whitened layer; the oblique projection
is exact at full rank and its discarded eigenvalues are the error measured in the metric."""

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.layers import ProjectedConv, ProjectedLinear
from rankwise.metric import (OutputMetric, batchnorm_metrics, unwhiten_output, whitened_layer,
                             whitened_statistics)


def _metrics(out_channels, generator):
    scale = torch.rand(out_channels, generator=generator, dtype=torch.float64) * 3 + 0.1
    a = torch.randn(out_channels, out_channels, generator=generator, dtype=torch.float64)
    return [OutputMetric.diagonal(scale), OutputMetric.from_gram(a @ a.T, shrinkage=0.1)]


LAYERS = [lambda: nn.Linear(7, 6), lambda: nn.Conv2d(4, 5, 3, padding=1), lambda: nn.Conv1d(3, 6, 2, bias=False)]


def _inputs(layer, generator):
    if isinstance(layer, nn.Linear):
        return torch.randn(64, 7, generator=generator) @ torch.randn(7, 7, generator=generator)
    if isinstance(layer, nn.Conv2d):
        return torch.randn(8, 4, 6, 6, generator=generator)
    return torch.randn(8, 3, 10, generator=generator)


@pytest.mark.parametrize("make", LAYERS)
def test_whitened_statistics_are_those_of_the_whitened_layer(make):
    generator = torch.Generator().manual_seed(0)
    layer = make().double()
    x = _inputs(layer, generator).double()
    for metric in _metrics(layer.weight.shape[0], generator):
        npca = rw.NeuronPCA(nn.Sequential(layer), [x], verbosity="off")
        expected = rw.NeuronPCA(nn.Sequential(whitened_layer(layer, metric)), [x], verbosity="off")
        got = whitened_statistics(npca.statistics("0"), layer, metric)
        want = expected.statistics("0")
        torch.testing.assert_close(got.output.outer, want.output.outer)
        torch.testing.assert_close(got.output.sum, want.output.sum)
        torch.testing.assert_close(got.weight_gram_output, want.weight_gram_output)
        if want.weight_gram_input is not None:
            torch.testing.assert_close(got.weight_gram_input, want.weight_gram_input)


@pytest.mark.parametrize("make", LAYERS)
def test_oblique_projection_is_exact_at_full_rank_and_its_error_is_the_discarded_eigenvalues(make):
    generator = torch.Generator().manual_seed(1)
    layer = make().double()
    x = _inputs(layer, generator).double()
    cls = ProjectedLinear if isinstance(layer, nn.Linear) else ProjectedConv
    out_c = layer.weight.shape[0]
    for metric in _metrics(out_c, generator):
        whitened = whitened_layer(layer, metric)
        npca = rw.NeuronPCA(nn.Sequential(whitened), [x], verbosity="off", regularization=0.0)
        spectrum = npca.spectrum("0", "output")
        for rank in (out_c, 2):
            projected = unwhiten_output(cls.from_dense(whitened, output_basis=spectrum.eigenvectors[:, :rank],
                                                       output_mean=spectrum.mean), metric)
            error = layer(x) - projected(x)
            rows = error.movedim(1, -1).reshape(-1, out_c) if error.dim() > 2 else error
            measured = (rows @ metric.root).square().sum(1).mean()
            expected = spectrum.eigenvalues[rank:].sum()
            torch.testing.assert_close(measured, expected, atol=1e-9, rtol=1e-6)


def test_from_gram_shrinks_toward_isotropy_and_floors_zero_directions():
    gram = torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64))
    full = OutputMetric.from_gram(gram, shrinkage=1.0)
    torch.testing.assert_close(full.root, torch.eye(3, dtype=torch.float64) * (5 / 3) ** 0.5)
    raw = OutputMetric.from_gram(gram, shrinkage=0.0)
    torch.testing.assert_close(raw.root @ raw.inverse_root, torch.eye(3, dtype=torch.float64))
    assert raw.root[2, 2] > 0


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


class _Untraceable(nn.Sequential):
    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace it
            return x
        return super().forward(x)


def _set_statistics(norm):
    with torch.no_grad():
        norm.running_var.copy_(torch.tensor([4.0, 1.0, 0.25, 9.0]))
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 0.0]))
    return norm


@pytest.mark.parametrize("model, name", [(_Block(), "conv"),
                                         (_Untraceable(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), "0")])
def test_batchnorm_metric_is_gamma_over_sigma_traced_or_sequential(model, name):
    norm = _set_statistics(model.bn if isinstance(model, _Block) else model[1])
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    metrics = batchnorm_metrics(model, layers)
    assert list(metrics) == [name]
    expected = norm.weight.double().abs() / (norm.running_var.double() + norm.eps).sqrt()
    diagonal = metrics[name].root.diagonal()
    torch.testing.assert_close(diagonal[:3], expected[:3])
    assert 0 < diagonal[3] < 1e-5  # a channel BatchNorm zeroes is floored, not dropped to 0


def test_a_layer_feeding_two_places_gets_no_metric():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = Fork()
    assert batchnorm_metrics(model, {"conv": model.conv}) == {}

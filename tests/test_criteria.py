"""Where errors are measured: after a BatchNorm, in the loss; and the sequential correction."""

import copy

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.layers.build import project_layer
from rankwise.ranks import RankChoice


def _bn_net(norm=True):
    """A 1x1 conv with 32 loud output channels (scale 100) and 32 quiet ones (scale 0.1), each
    normalised to unit variance by the BatchNorm that follows: all 64 matter alike after it."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 1, bias=False)
    scales = torch.cat([torch.full((32,), 100.0), torch.full((32,), 0.1)])
    with torch.no_grad():
        conv.weight.copy_(torch.diag(scales).view(64, 64, 1, 1))
    layers = [conv]
    if norm:
        layers.append(nn.BatchNorm2d(64))
        with torch.no_grad():
            layers[1].running_var.copy_(scales ** 2)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 3 * 3, 3)).eval()


def _images():
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(64, 64, 3, 3, generator=generator) for _ in range(4)]


def test_a_layer_before_a_batchnorm_is_judged_after_it():
    # without the BatchNorm, the 32 loud channels hold all the variance: rank 29 keeps 90%
    _, raw = rw.compress_network_using_projection(_bn_net(norm=False), _images(), explained_variance_goal=0.9,
                                                  layer_names="0", verbosity="off")
    assert raw.layers["0"].rank_out == 29
    # after it, all 64 hold a 64th each: 90% needs 58, no smaller than the dense layer
    _, info = rw.compress_network_using_projection(_bn_net(), _images(), explained_variance_goal=0.9,
                                                   layer_names="0", verbosity="off")
    assert info.layers["0"].side == "dense"


def test_the_reported_variance_is_the_one_measured_after_the_batchnorm():
    net, data = _bn_net(), _images()
    compressed, info = rw.compress_network_using_projection(net, data, explained_variance_goal=0.4,
                                                            layer_names="0", verbosity="off")
    assert info.layers["0"].side != "dense"
    with torch.no_grad():
        reference = torch.cat([net[1](net[0](x)) for x in data]).movedim(1, -1).reshape(-1, 64)
        projected = torch.cat([compressed[1](compressed[0](x)) for x in data]).movedim(1, -1).reshape(-1, 64)
    measured = 1 - (reference - projected).square().sum() / (reference - reference.mean(0)).square().sum()
    assert abs(float(measured) - info.layers["0"].explained_variance) < 0.02


def test_the_projection_is_exact_at_full_rank_in_the_batchnorm_metric():
    net = _bn_net().double()
    data = [x.double() for x in _images()[:2]]
    npca = rw.NeuronPCA(net, data, verbosity="off", regularization=0.0)
    options = rw.ranks.measured_options(net, npca, {"0": net[0]})["0"]
    assert options.metric is not None
    full = project_layer(net[0], options, RankChoice("output", None, 64, 0, 0.0, 0.0))
    torch.testing.assert_close(full(data[0]), net[0](data[0]))


class _TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.loud, self.quiet = nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.loud(x)) + 1e-3 * torch.tanh(self.quiet(x)))


def test_the_loss_criterion_spends_the_budget_where_the_network_ignores_the_output():
    net = _TwoBranches()
    data = [torch.randn(128, 16) for _ in range(4)]
    npca = rw.NeuronPCA(net, data, verbosity="off", loss_fn="kl")
    goal = 0.3
    _, loss = rw.compress_network_using_projection(net, npca, learnables_reduction_goal=goal,
                                                   layer_names=["loud", "quiet"], criterion="loss",
                                                   verbosity="off")
    assert loss.layers["quiet"].side != "dense"
    assert loss.layers["loud"].learnables_after > loss.layers["quiet"].learnables_after
    x = torch.randn(256, 16)
    with torch.no_grad():
        reference = net(x).softmax(-1)
    _, variance = rw.compress_network_using_projection(net, npca, learnables_reduction_goal=goal,
                                                       layer_names=["loud", "quiet"], verbosity="off")
    nets = {}
    for name, info in (("loss", loss), ("variance", variance)):
        nets[name] = rw.compress_network_using_projection(
            net, npca, learnables_reduction_goal=goal, layer_names=["loud", "quiet"],
            criterion=name, verbosity="off")[0]
    with torch.no_grad():
        kl = {name: nn.functional.kl_div(m(x).log_softmax(-1), reference, reduction="batchmean")
              for name, m in nets.items()}
    assert kl["loss"] < kl["variance"]


def test_the_loss_criterion_needs_gradients_and_dense_layers():
    net = _TwoBranches()
    data = [torch.randn(16, 16)]
    npca = rw.NeuronPCA(net, data, verbosity="off", loss_fn=None)
    with pytest.raises(ValueError, match="criterion: 'loss' needs the gradient statistics"):
        rw.compress_network_using_projection(net, npca, criterion="loss", verbosity="off")
    with pytest.raises(ValueError, match="criterion: expected one of 'variance', 'loss'"):
        rw.compress_network_using_projection(net, npca, criterion="hessian", verbosity="off")
    rnn = nn.Sequential(nn.LSTM(3, 4))
    with pytest.raises(ValueError, match="criterion: 'loss' judges Linear and convolution layers only"):
        rw.compress_network_using_projection(
            rnn, [torch.randn(5, 2, 3)], criterion="loss", verbosity="off",
            loss_fn=lambda out, batch: out[0].sum())


def _deep_linear():
    torch.manual_seed(2)
    return nn.Sequential(*[nn.Linear(12, 12) for _ in range(4)]).double()


def _error(net, reference, data):
    with torch.no_grad():
        return sum(float((net(x) - reference(x)).square().sum()) for x in data)


def test_sequential_correction_is_never_worse_than_one_shot_on_a_deep_linear_network():
    net = _deep_linear()
    mixing = torch.randn(12, 12, dtype=torch.float64) * torch.logspace(0, -2, 12, dtype=torch.float64)
    data = [torch.randn(64, 12, dtype=torch.float64) @ mixing for _ in range(4)]
    before = copy.deepcopy(net.state_dict())
    for goal in (0.2, 0.4, 0.6):
        one_shot, info = rw.compress_network_using_projection(net, data, learnables_reduction_goal=goal,
                                                              verbosity="off")
        corrected, corrected_info = rw.compress_network_using_projection(
            net, data, learnables_reduction_goal=goal, correction="sequential", verbosity="off")
        assert corrected_info.layers == info.layers  # same decisions, refitted factors
        assert rw.count_learnables(corrected) == rw.count_learnables(one_shot)
        assert _error(corrected, net, data) <= _error(one_shot, net, data) * (1 + 1e-9)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_sequential_correction_needs_data_and_a_known_name():
    net = _deep_linear()
    data = [torch.randn(16, 12, dtype=torch.float64)]
    npca = rw.NeuronPCA(net, data, verbosity="off")
    with pytest.raises(ValueError, match="correction_data: correction='sequential' refits"):
        rw.compress_network_using_projection(net, npca, correction="sequential", verbosity="off")
    with pytest.raises(ValueError, match="correction: expected None or 'sequential'"):
        rw.compress_network_using_projection(net, npca, correction="gptq", verbosity="off")
    with pytest.raises(ValueError, match="correction_data: it is only used with"):
        rw.compress_network_using_projection(net, npca, correction_data=data, verbosity="off")
    net_c, _ = rw.compress_network_using_projection(net, npca, correction="sequential",
                                                    correction_data=data, verbosity="off",
                                                    learnables_reduction_goal=0.3)
    assert rw.count_learnables(net_c) < rw.count_learnables(net)


def test_uniform_allocation_keeps_the_same_fraction_of_every_layer():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    data = [torch.randn(128, 32) for _ in range(2)]
    npca = rw.NeuronPCA(net, data, verbosity="off")
    compressed, info = rw.compress_network_using_projection(net, npca, learnables_reduction_goal=0.4,
                                                            allocation="uniform", verbosity="off")
    assert info.goal_reached and info.learnables_reduction >= 0.4
    assert info.learnables_after == rw.count_learnables(compressed)
    kept = [p.learnables_after / p.learnables_before for p in info.layers.values()]
    assert max(kept) - min(kept) < 0.25  # one common fraction, up to each layer's rank steps
    with pytest.raises(ValueError, match="allocation: expected 'auto', 'global' or 'uniform'"):
        rw.compress_network_using_projection(net, npca, learnables_reduction_goal=0.4, allocation="greedy",
                                             verbosity="off")
    with pytest.raises(ValueError, match="allocation: 'uniform' spreads a learnables, FLOPs or latency reduction goal"):
        rw.compress_network_using_projection(net, npca, explained_variance_goal=0.9, allocation="uniform",
                                             verbosity="off")

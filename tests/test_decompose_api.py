"""truncate_kernels: argument checks, model safety, data-aware truncation, TruncatedConv structure."""

import math

import pytest
import torch
from torch import nn

import rankwise as rw
from conftest import assert_unchanged, make_batches, state_of, tiny_cnn


def model_with_grouped_conv():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, groups=3), nn.Flatten(),
                         nn.Linear(6 * 6 * 6, 4))


BAD_CALLS = {
    "unknown method": (dict(method="svd", ranks=2), "method:"),
    "bad cut": (dict(method="cut", cut="oi|h", ranks=1), "cut:"),
    "cut with two bars": (dict(method="cut", cut="o|i|hw", ranks=1), "cut:"),
    "cut for tucker": (dict(method="tucker", cut="o|ihw", ranks=2), "cut:"),
    "order for cut": (dict(method="cut", order="ihwo", ranks=2), "order:"),
    "bad order": (dict(method="tt", order="ihw", ranks=2), "order:"),
    "bad modes": (dict(method="tucker", modes="ox", ranks=2), "modes:"),
    "rank zero": (dict(method="cut", ranks=0), "ranks:"),
    "rank too large for its layer": (dict(method="cut", cut="o|ihw", ranks={"0": (9,), "2": 1}), "ranks:"),
    "tuple rank too large": (dict(method="cut", cut="o|ihw", ranks=(9,)), "ranks:"),
    "rank not an int": (dict(method="cp", ranks=2.5), "ranks:"),
    "wrong rank count": (dict(method="tucker", ranks=(2, 2, 2)), "ranks:"),
    "inconsistent train": (dict(method="tt", ranks=(1, 9, 1)), "ranks:"),
    "both": (dict(method="cut", ranks=2, norm_retained=0.9), "ranks, norm_retained:"),
    "neither": (dict(method="cut"), "ranks, norm_retained:"),
    "norm out of range": (dict(method="cut", norm_retained=1.5), "norm_retained:"),
    "unknown layer": (dict(method="cut", ranks=1, layer_names=["7"]), "layer_names:"),
    "linear layer": (dict(method="cut", ranks=1, layer_names=["4"]), "layer_names:"),
    "rank dict with stranger": (dict(method="cut", ranks={"0": 1, "9": 1}), "ranks:"),
    "rank dict missing a layer": (dict(method="cut", ranks={"0": 1}, layer_names=["0", "2"]), "ranks:"),
    "bad verbosity": (dict(method="cut", ranks=1, verbosity="loud"), "verbosity:"),
}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_user_errors_name_the_argument_and_leave_the_model_untouched(case, inplace):
    kwargs, argument = dict(BAD_CALLS[case][0]), BAD_CALLS[case][1]
    torch.manual_seed(0)
    model = tiny_cnn()
    snapshot = state_of(model)
    with pytest.raises(ValueError) as raised:
        rw.truncate_kernels(model, kwargs.pop("method"), inplace=inplace, **kwargs)
    assert str(raised.value).startswith(argument)
    assert_unchanged(model, snapshot)


def test_unknown_layer_error_lists_the_valid_layers():
    with pytest.raises(ValueError, match=r"Truncatable layers: 0, 2\."):
        rw.truncate_kernels(tiny_cnn(), "cut", ranks=1, layer_names="conv9")


def test_grouped_convolutions_are_skipped_or_refused_with_the_reason():
    model = model_with_grouped_conv()
    _, info = rw.truncate_kernels(model, "cut", ranks=1, verbosity="off")
    assert info.layer_names == ["0"]
    with pytest.raises(ValueError, match="grouped convolution"):
        rw.truncate_kernels(model, "cut", ranks=1, layer_names=["1"])


def test_a_cut_that_does_not_fit_a_conv1d_names_the_layer():
    model = nn.Sequential(nn.Conv1d(3, 4, 3))
    with pytest.raises(ValueError, match=r"^cut: .*layer '0'"):
        rw.truncate_kernels(model, "cut", cut="oh|iw", ranks=1)


def test_the_input_model_is_not_modified_unless_inplace():
    torch.manual_seed(0)
    model = tiny_cnn()
    snapshot = state_of(model)
    truncated, _ = rw.truncate_kernels(model, "tt", norm_retained=0.7, verbosity="off", allow_larger=True)
    assert_unchanged(model, snapshot)
    assert isinstance(truncated[0], rw.TruncatedConv)
    same, _ = rw.truncate_kernels(model, "tt", norm_retained=0.7, inplace=True, verbosity="off",
                                  allow_larger=True)
    assert same is model and isinstance(model[0], rw.TruncatedConv)


def test_rank_dict_selects_and_sizes_layers():
    torch.manual_seed(0)
    truncated, info = rw.truncate_kernels(tiny_cnn(), "cut", cut="oh|iw", ranks={"2": 3}, verbosity="off")
    assert info.layer_names == ["2"] and info.layers["2"].ranks == (3,)
    assert isinstance(truncated[0], nn.Conv2d) and isinstance(truncated[2], rw.TruncatedConv)


def test_ranks_chosen_by_norm_retained_can_be_given_back_explicitly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
    for method in ("cut", "tucker", "tt"):
        _, chosen = rw.truncate_kernels(model, method, norm_retained=0.6, verbosity="off",
                                        allow_larger=True)
        _, again = rw.truncate_kernels(model, method, ranks={n: t.ranks for n, t in chosen.layers.items()},
                                       verbosity="off", allow_larger=True)
        for name, layer in chosen.layers.items():
            assert again.layers[name].relative_norm_loss == pytest.approx(layer.relative_norm_loss, abs=1e-9)


def test_layers_already_truncated_are_not_truncated_again():
    torch.manual_seed(0)
    once, _ = rw.truncate_kernels(tiny_cnn(), "cut", ranks=2, layer_names=["0"], verbosity="off")
    _, info = rw.truncate_kernels(once, "cut", ranks=2, verbosity="off")
    assert info.layer_names == ["2"]


def correlated_batches(count=8, seed=0):
    """Inputs whose 6 channels are the same mixtures of 2 sources, plus an offset."""
    mixing = torch.randn(6, 2, generator=torch.Generator().manual_seed(100))
    generator = torch.Generator().manual_seed(seed)
    return [torch.einsum("cs,nshw->nchw", mixing, torch.randn(32, 2, 8, 8, generator=generator)) + 0.5
            for _ in range(count)]


def test_data_aware_truncation_loses_less_output_than_kernel_norm_truncation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 8, 3))  # no padding: the mean folded into the bias is exact
    data, test = correlated_batches(), correlated_batches(seed=1)
    plain, _ = rw.truncate_kernels(model, "cut", cut="ohw|i", ranks=2, verbosity="off")
    aware, info = rw.truncate_kernels(model, "cut", cut="ohw|i", ranks=2, calibration=data,
                                      verbosity="off")

    def error(net):
        return sum(float((net(x) - model(x)).square().mean()) for x in test)

    with torch.no_grad():
        assert error(aware) < 1e-3 * error(plain)
    assert info.layers["0"].relative_output_loss < 1e-3 < info.layers["0"].relative_norm_loss


def test_data_aware_truncation_at_full_rank_is_exact_and_accepts_a_neuron_pca():
    torch.manual_seed(0)
    model = tiny_cnn().eval()
    data = make_batches((16, 3, 8, 8))
    npca = rw.NeuronPCA(model, data, verbosity="off")
    truncated, info = rw.truncate_kernels(model, "tucker", ranks={"0": (8, 3), "2": (12, 8)},
                                          calibration=npca, verbosity="off")
    with torch.no_grad():
        torch.testing.assert_close(truncated(data[0]), model(data[0]), atol=1e-5, rtol=1e-5)
    assert all(t.relative_output_loss < 1e-6 for t in info.layers.values())


def test_calibration_without_the_layer_is_refused():
    model = tiny_cnn()
    npca = rw.NeuronPCA(model, make_batches((16, 3, 8, 8)), layer_names=["0"], verbosity="off")
    with pytest.raises(ValueError, match="^calibration:"):
        rw.truncate_kernels(model, "cut", ranks=1, calibration=npca)


def test_truncated_conv_unpacks_and_rebuilds_from_its_spec():
    torch.manual_seed(0)
    truncated, _ = rw.truncate_kernels(tiny_cnn(), "tt", order="hiwo", ranks=(2, 4, 3), verbosity="off")
    layer = truncated[2]
    x = torch.randn(2, 8, 8, 8)
    plain = layer.unpack()
    assert type(plain) is nn.Sequential and plain[0].weight is layer[0].weight
    assert plain.rankwise_spec == layer.spec()
    rebuilt = rw.TruncatedConv.from_spec(tiny_cnn()[2], layer.spec())
    rebuilt.load_state_dict(layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), layer(x))
    assert (rebuilt.method, rebuilt.structure, rebuilt.ranks) == ("tt", "hiwo", (2, 4, 3))


def test_summary_prints_a_table(capsys):
    rw.truncate_kernels(tiny_cnn(), "cut", cut="oi|hw", ranks=2)
    printed = capsys.readouterr().out
    assert "oi|hw" in printed and "learnables" in printed and printed.count("\n") >= 4


def one_channel_cnn():
    """A CNN whose first convolution has one input channel: its CP rank is at most 9 (1 x 3 x 3)."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def test_an_integer_rank_is_clipped_to_what_each_kernel_allows_and_said_so():
    torch.manual_seed(0)
    truncated, info = rw.truncate_kernels(one_channel_cnn(), "cp", ranks=24, verbosity="off")   # the README's
    first, second = info.kept_dense["0"], info.layers["2"]     # 9 (1 + 3 + 3 + 16) > 16 * 9 learnables
    assert (first.ranks, first.requested_rank) == ((9,), 24)   # R_max = 1 * 16 * 3 * 3 / 16 = 9
    assert (second.ranks, second.requested_rank) == ((24,), None)
    assert "ranks clipped to what the kernel allows: 0 (24 -> 9)" in info.table()
    with torch.no_grad():
        assert truncated(torch.randn(2, 1, 4, 4)).shape == (2, 10)
    _, tucker = rw.truncate_kernels(one_channel_cnn(), "tucker", ranks=12, verbosity="off")
    assert tucker.layers["2"].ranks == (12, 12) and tucker.layers["2"].requested_rank is None
    assert tucker.kept_dense["0"].ranks == (12, 1) and tucker.kept_dense["0"].requested_rank == 12


def test_a_layer_whose_truncated_form_is_not_smaller_stays_dense_unless_allowed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Conv2d(64, 8, 3))
    snapshot = state_of(model)
    kept, info = rw.truncate_kernels(model, "tucker", ranks={"0": (64, 64), "2": (8, 16)}, verbosity="off")
    assert_unchanged(model, snapshot)
    assert info.layer_names == ["2"] and list(info.kept_dense) == ["0"]
    assert (info.kept_dense["0"].learnables_before, info.kept_dense["0"].learnables_after) == (36_928, 45_120)
    assert type(kept[0]) is nn.Conv2d and isinstance(kept[2], rw.TruncatedConv)
    assert info.learnables_after == rw.count_learnables(kept) < info.learnables_before
    assert "kept dense, the truncated form not smaller (allow_larger=True truncates them): 0 " \
           "(36,928 -> 45,120 learnables)" in info.table()
    grown, allowed = rw.truncate_kernels(model, "tucker", ranks={"0": (64, 64), "2": (8, 16)},
                                         allow_larger=True, verbosity="off")
    assert allowed.layer_names == ["0", "2"] and not allowed.kept_dense
    assert isinstance(grown[0], rw.TruncatedConv) and allowed.learnables_after > info.learnables_after


def test_a_progress_bar_runs_over_the_layers_unless_verbosity_is_off(capsys):
    torch.manual_seed(0)
    rw.truncate_kernels(tiny_cnn(), "cut", ranks=1)
    assert "truncate_kernels: 100%" in capsys.readouterr().err
    rw.truncate_kernels(tiny_cnn(), "cut", ranks=1, verbosity="off")
    assert capsys.readouterr() == ("", "")


def effective_kernel(layer, shape):
    """``W'`` of a layer computing a convolution without padding whose output is 1 x 1: the
    Jacobian of its output, read off unit inputs."""
    inputs = torch.eye(math.prod(shape)).reshape(-1, *shape)
    with torch.no_grad():
        outputs = layer(inputs) - layer(torch.zeros(1, *shape))
    return outputs.reshape(len(inputs), -1).T.reshape(-1, *shape).to(torch.float64)


def test_with_calibration_norm_retained_bounds_the_kernel_in_whitened_coordinates():
    from rankwise.decompose.calibration import input_weighting

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 8, 3))
    npca = rw.NeuronPCA(model, correlated_batches(), verbosity="off")
    truncated, info = rw.truncate_kernels(model, "cut", cut="ohw|i", norm_retained=0.7, calibration=npca,
                                          verbosity="off", allow_larger=True)
    kernel = model[0].weight.detach().to(torch.float64)
    error = kernel - effective_kernel(truncated[0], (6, 3, 3))
    root = input_weighting(npca, "0").root

    def whitened(k):
        return float(torch.tensordot(k, root, dims=([1], [0])).norm())

    assert whitened(error) / whitened(kernel) <= math.sqrt(1 - 0.7 ** 2) + 1e-9
    assert info.layers["0"].relative_norm_loss > math.sqrt(1 - 0.7 ** 2)    # not a bound on W itself

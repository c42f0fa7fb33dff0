"""truncate_kernels: reconstruction identities of every method, cut and leg order, and the norm bookkeeping."""

import itertools
import math

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.decompose import bipartitions

LAYERS = {
    "conv2d": (lambda: nn.Conv2d(3, 5, 3), (2, 3, 7, 7)),
    "conv2d-stride-padding-dilation": (
        lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), (2, 3, 9, 8)),
    "conv2d-reflect-no-bias": (lambda: nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect", bias=False),
                               (2, 2, 6, 6)),
    "conv2d-same": (lambda: nn.Conv2d(3, 4, (2, 3), padding="same"), (2, 3, 6, 6)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 11)),
}


def full_ranks(method, layer, structure):
    """The ranks at which each exact method reproduces the kernel."""
    dims = dict(zip("oihw" if layer.weight.dim() == 4 else "oiw", layer.weight.shape))
    if method == "cut":
        left, right = structure.split("|")
        return min(math.prod(dims[l] for l in left), math.prod(dims[l] for l in right))
    if method == "tucker":
        return tuple(dims[leg] for leg in structure)
    sizes = [dims[leg] for leg in structure]
    return tuple(min(math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, len(sizes)))


def structures(layer):
    legs = "oihw" if layer.weight.dim() == 4 else "oiw"
    cases = [("cut", cut) for cut in bipartitions(legs)]
    cases += [("tucker", modes) for modes in ("oi", legs, "i", legs[2:])]
    cases += [("tt", "".join(order)) for order in itertools.permutations(legs)]
    return cases


STRUCTURE_KEYWORD = {"cut": "cut", "tucker": "modes", "tt": "order"}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_full_rank_reproduces_the_output(name):
    torch.manual_seed(0)
    factory, shape = LAYERS[name]
    layer = factory().eval()
    model, x = nn.Sequential(layer), torch.randn(*shape)
    for method, structure in structures(layer):
        truncated, info = rw.truncate_kernels(model, method, ranks=full_ranks(method, layer, structure),
                                              verbosity="off", allow_larger=True,
                                              **{STRUCTURE_KEYWORD[method]: structure})
        torch.testing.assert_close(truncated(x), model(x), atol=1e-5, rtol=1e-5,
                                   msg=f"{method} {structure}")
        assert info.layers["0"].relative_norm_loss < 1e-6
        assert all(isinstance(m, nn.Conv1d | nn.Conv2d) for m in truncated[0])


def effective_kernel(module, in_channels, kernel_size):
    """The kernel a stride-1, unpadded convolution sequence computes: its response to unit patches."""
    patches = torch.eye(in_channels * math.prod(kernel_size)).reshape(-1, in_channels, *kernel_size)
    with torch.no_grad():
        response = module(patches) - module(torch.zeros_like(patches[:1]))
    return response.reshape(len(patches), -1).T.reshape(-1, in_channels, *kernel_size)


@pytest.mark.parametrize("method, structure, ranks", [
    *[("cut", cut, 1) for cut in bipartitions("oihw")],
    ("tucker", "oi", (3, 2)), ("tucker", "oihw", (3, 2, 2, 1)), ("cp", None, 3),
    ("tt", "ihwo", (2, 3, 2)), ("tt", "hoiw", (2, 3, 2)), ("tt", "whio", (2, 3, 2)),
])
def test_norm_loss_is_the_loss_of_the_kernel_the_layer_computes(method, structure, ranks):
    torch.manual_seed(1)
    layer = nn.Conv2d(4, 6, (3, 2))
    kwargs = {} if structure is None else {STRUCTURE_KEYWORD[method]: structure}
    truncated, info = rw.truncate_kernels(nn.Sequential(layer), method, ranks=ranks, verbosity="off",
                                          allow_larger=True, **kwargs)
    computed = effective_kernel(truncated[0], 4, (3, 2)).double()
    weight = layer.weight.detach().double()
    expected = float((weight - computed).norm() / weight.norm())
    assert info.layers["0"].relative_norm_loss == pytest.approx(expected, abs=1e-5)
    assert info.layers["0"].relative_norm_loss > 1e-3


@pytest.mark.parametrize("cut", bipartitions("oihw"))
def test_cut_loss_is_the_singular_value_tail(cut):
    torch.manual_seed(2)
    layer = nn.Conv2d(4, 5, 3)
    left, right = cut.split("|")
    order = [("oihw".index(leg)) for leg in left + right]
    weight = layer.weight.detach().double().permute(order)
    singular_values = torch.linalg.svdvals(weight.reshape(math.prod(weight.shape[:len(left)]), -1))
    _, info = rw.truncate_kernels(nn.Sequential(layer), "cut", cut=cut, ranks=1, verbosity="off",
                                  allow_larger=True)
    tail = singular_values[1:].square().sum() / singular_values.square().sum()
    assert info.layers["0"].relative_norm_loss == pytest.approx(float(tail.sqrt()), rel=1e-9)


@pytest.mark.parametrize("method, keyword, structure", [
    ("cut", "cut", "o|ihw"), ("cut", "cut", "ow|ih"), ("tucker", "modes", "oi"),
    ("tucker", "modes", "oihw"), ("tt", "order", "ihwo"), ("tt", "order", "hoiw"), ("cp", None, None),
])
@pytest.mark.parametrize("norm_retained", [0.5, 0.8, 0.95])
def test_norm_retained_is_met_and_minimal_for_cuts(method, keyword, structure, norm_retained):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 6, 3))
    kwargs = {} if keyword is None else {keyword: structure}
    _, info = rw.truncate_kernels(model, method, norm_retained=norm_retained, verbosity="off",
                                  allow_larger=True, **kwargs)
    layer_info = info.layers["0"]
    assert layer_info.relative_norm_loss <= math.sqrt(1 - norm_retained ** 2) + 1e-9
    if method == "cut" and layer_info.ranks[0] > 1:
        _, smaller = rw.truncate_kernels(model, "cut", cut=structure, ranks=layer_info.ranks[0] - 1,
                                         verbosity="off", allow_larger=True)
        assert smaller.layers["0"].relative_norm_loss > math.sqrt(1 - norm_retained ** 2)


def test_cp_recovers_a_kernel_of_known_rank():
    generator = torch.Generator().manual_seed(4)
    factors = [torch.randn(n, 3, generator=generator, dtype=torch.float64) for n in (6, 4, 3, 3)]
    layer = nn.Conv2d(4, 6, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.einsum("or,ir,hr,wr->oihw", *factors))
    _, info = rw.truncate_kernels(nn.Sequential(layer), "cp", ranks=3, verbosity="off", allow_larger=True)
    assert info.layers["0"].relative_norm_loss < 1e-4
    _, searched = rw.truncate_kernels(nn.Sequential(layer), "cp", norm_retained=0.9999, verbosity="off",
                                      allow_larger=True)
    assert searched.layers["0"].ranks == (3,)


def test_learnables_and_flops_are_counted_from_the_built_layers():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 16, 3))
    truncated, info = rw.truncate_kernels(model, "cp", ranks=4, verbosity="off", allow_larger=True)
    assert info.learnables_after == rw.count_learnables(truncated)
    assert info.learnables_before == rw.count_learnables(model)
    first = info.layers["0"]
    assert (first.learnables_before, first.learnables_after) == (8 * 16 * 9 + 16, 4 * (8 + 3 + 3 + 16) + 16)
    # The 1x1 8->4 runs before both strided depthwise convolutions (4x the output positions),
    # the kh x 1 one before the 1 x kw stride (2x).
    assert (first.flops_before, first.flops_after) == (16 * 8 * 9, 4 * 8 * 2 * 2 + 4 * 3 * 2 + 4 * 3 + 16 * 4)

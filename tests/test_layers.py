"""ProjectedLayer construction: exact at full rank for every layer configuration and side."""

import pytest
import torch
from torch import nn

import rankwise as rw

SIDES = ("input", "output", "both")


def orthonormal(dim, seed):
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q


def project(layer, side, rank_in=None, rank_out=None, seed=0):
    in_c, out_c = layer.weight.shape[1], layer.weight.shape[0]
    cls = rw.ProjectedLinear if isinstance(layer, nn.Linear) else rw.ProjectedConv
    generator = torch.Generator().manual_seed(seed + 7)
    kwargs = {}
    if side in ("input", "both"):
        kwargs.update(input_basis=orthonormal(in_c, seed)[:, :rank_in or in_c],
                      input_mean=torch.randn(in_c, generator=generator))
    if side in ("output", "both"):
        kwargs.update(output_basis=orthonormal(out_c, seed + 1)[:, :rank_out or out_c],
                      output_mean=torch.randn(out_c, generator=generator))
    return cls.from_dense(layer, **kwargs)


LAYERS = {
    "linear": (lambda: nn.Linear(10, 7), (5, 10)),
    "linear-3d-input": (lambda: nn.Linear(10, 7), (4, 3, 10)),
    "linear-no-bias": (lambda: nn.Linear(10, 7, bias=False), (5, 10)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3), (2, 4, 11)),
    "conv1d-unbatched": (lambda: nn.Conv1d(4, 6, 3, padding=2), (4, 11)),
    "conv2d": (lambda: nn.Conv2d(3, 5, 3), (2, 3, 9, 9)),
    "conv2d-stride-padding": (lambda: nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 2)), (2, 3, 9, 8)),
    "conv2d-dilation-no-bias": (lambda: nn.Conv2d(3, 5, 3, dilation=2, bias=False), (2, 3, 10, 10)),
    "conv2d-reflect": (lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), (2, 3, 6, 6)),
    "conv2d-same": (lambda: nn.Conv2d(3, 5, 3, padding="same"), (2, 3, 6, 6)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 2, stride=2, padding=1), (2, 2, 5, 5, 5)),
}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_full_rank_projection_is_exact(name, side):
    torch.manual_seed(0)
    factory, shape = LAYERS[name]
    layer = factory()
    x = torch.randn(*shape)
    projected = project(layer, side)
    torch.testing.assert_close(projected(x), layer(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(projected.unpack()(x), layer(x), atol=1e-5, rtol=1e-5)


def test_unpack_holds_plain_torch_layers_sharing_parameters():
    projected = project(nn.Conv2d(3, 5, 3), "both", rank_in=2, rank_out=4)
    unpacked = projected.unpack()
    assert [type(m) for m in unpacked] == [nn.Conv2d, nn.Conv2d, nn.Conv2d]
    assert unpacked[1].weight is projected.core.weight


def test_ranks_sides_and_repr():
    projected = project(nn.Linear(10, 7), "both", rank_in=3, rank_out=4)
    assert (projected.side, projected.rank_in, projected.rank_out) == ("both", 3, 4)
    assert "rank_in=3, rank_out=4" in repr(projected)
    assert project(nn.Linear(10, 7), "output", rank_out=2).side == "output"
    assert project(nn.Linear(10, 7), "input", rank_in=2).rank_out is None


@pytest.mark.parametrize("rank_in, rank_out", [(3, None), (None, 2), (4, 5)])
def test_learnables_formula_matches_the_modules(rank_in, rank_out):
    layer = nn.Conv2d(6, 8, 3, bias=False)
    side = "both" if rank_in and rank_out else ("input" if rank_in else "output")
    projected = project(layer, side, rank_in, rank_out)
    expected = rw.learnables.factored_learnables(6, 8, 9, rank_in, rank_out)
    assert rw.count_learnables(projected) == expected


def test_input_mean_is_folded_exactly_at_reduced_rank():
    """Data in an affine 3-dim subspace: rank-3 input projection with its mean is exact."""
    torch.manual_seed(0)
    layer = nn.Linear(10, 6)
    basis = orthonormal(10, 3)[:, :3]
    mean = torch.randn(10, dtype=torch.float64)
    x = (mean + torch.randn(50, 3, dtype=torch.float64) @ basis.T).float()
    projected = rw.ProjectedLinear.from_dense(layer, input_basis=basis, input_mean=mean)
    torch.testing.assert_close(projected(x), layer(x), atol=1e-5, rtol=1e-5)


def test_keeps_dtype_and_trainability():
    layer = nn.Linear(8, 4).double()
    layer.weight.requires_grad_(False)
    projected = project(layer, "output", rank_out=2)
    assert projected.core.weight.dtype == torch.float64
    assert not any(p.requires_grad for p in projected.parameters())


@pytest.mark.parametrize("kwargs, message", [
    ({}, "input_basis, output_basis or both"),
    ({"input_basis": torch.zeros(9, 2)}, "input_basis: expected shape \\(10, rank\\)"),
    ({"output_basis": torch.zeros(7, 9)}, "output_basis"),
    ({"output_basis": torch.eye(7), "output_mean": torch.zeros(3)}, "output_mean"),
])
def test_from_dense_rejects_bad_bases(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rw.ProjectedLinear.from_dense(nn.Linear(10, 7), **kwargs)


@pytest.mark.parametrize("factory, rank_in, rank_out", [
    (lambda: nn.Linear(10, 7), None, 3),
    (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), 2, None),
    (lambda: nn.Conv1d(6, 8, 3), 4, 5),
])
def test_spec_rebuilds_the_same_structure(factory, rank_in, rank_out):
    layer = factory()
    side = "both" if rank_in and rank_out else ("input" if rank_in else "output")
    projected = project(layer, side, rank_in, rank_out)
    cls = type(projected)
    rebuilt = cls.from_spec(factory(), projected.spec())
    rebuilt.load_state_dict(projected.state_dict())
    assert repr(rebuilt) == repr(projected)
    x = torch.randn(2, 6, 9) if isinstance(layer, nn.Conv1d) else (
        torch.randn(2, 6, 9, 9) if isinstance(layer, nn.Conv2d) else torch.randn(3, 10))
    assert torch.equal(rebuilt(x), projected(x))
    with pytest.raises(ValueError, match="spec: describes a 'ProjectedLinear'"):
        rw.ProjectedConv.from_spec(factory(), {**projected.spec(), "type": "ProjectedLinear"})


def test_plain_linear_parts_run_as_products_and_anything_else_as_modules():
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    basis = torch.linalg.qr(torch.randn(12, 12))[0]
    wrapper = rw.ProjectedLinear.from_dense(layer, input_basis=basis[:, :4], output_basis=torch.eye(10)[:, :6])
    x = torch.randn(3, 12)
    assert torch.equal(wrapper(x), wrapper.unpack()(x))  # the same products, bit for bit

    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: seen.append(module))
    try:
        assert torch.equal(wrapper(x), wrapper.unpack()(x))
    finally:
        handle.remove()
    assert [m for m in seen if m in (wrapper.in_proj, wrapper.core, wrapper.out_proj)][:3] == [
        wrapper.in_proj, wrapper.core, wrapper.out_proj]  # a global hook sees every part called

    class Doubled(nn.Module):
        def forward(self, weight):
            return 2 * weight

    core_weight = wrapper.core.weight.detach().clone()
    torch.nn.utils.parametrize.register_parametrization(wrapper.core, "weight", Doubled())
    with torch.no_grad():
        expected = wrapper.out_proj(nn.functional.linear(wrapper.in_proj(x), 2 * core_weight, wrapper.core.bias))
        torch.testing.assert_close(wrapper(x), expected)  # a parametrized part is called as a module

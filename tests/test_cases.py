"""One table of tiny models x methods, every row run through one common tester (as peft's tests).

Each :class:`Case` names a model factory (the structures of :mod:`structures`: chains, residual
additions, concatenations, a flatten into a Linear, a module used twice, recurrent layers), one
batch shape and a *method*: project with either goal (packed or unpacked), truncate with a cut,
Tucker, CP or a tensor train, evolve widths (grow, shrink), compress incrementally, or all of
evolve, truncate and project in one model. The tester
checks, for every row:

1. the input model is unchanged (structure and every tensor of its state, bit for bit);
2. the learnables the method reports equal ``count_learnables`` of the built modules, network
   and layer by layer, and the spec of each built form says what the method reported;
3. where the method has an exact setting (projection and cuts, Tucker, trains at full rank;
   growing; shrinking only what is dead), the result computes the original's outputs;
4. ``save`` then ``load(path, model=original)`` gives back the same structure, state dict and
   outputs bit for bit, for the result and for its unpacked form;
5. ``export_onnx`` runs and onnxruntime computes the same outputs (float32, ``atol=1e-4``);
   rows whose result holds nothing new for the exporter skip it (see :class:`Case`).

The evolver changes its model in place: its rows evolve a copy, so that (1) still compares the
original. Row-specific expectations (the widths that changed, layer sizes) are data in the row.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

import rankwise as rw
from conftest import (SequenceModel, assert_identical, assert_unchanged, make_batches, state_of, tiny_cnn,
                      tiny_mlp)
from evolve_helpers import outputs
from rankwise.forms import compressed_forms, form_spec, form_types, unpack_forms
from rankwise.rnn import cell_input_sizes
from structures import (average_pool_net, chain, concat_net, gru_net, lstm_net, max_pool_net,
                        residual_net, shared_net)

@dataclass
class Outcome:
    """What a method reported: network learnables, and per built layer its learnables and the
    spec entries it must have (``None`` where the method reports no learnables)."""

    learnables: int | None
    layers: dict = field(default_factory=dict)     # name -> learnables after
    specs: dict = field(default_factory=dict)      # name -> expected entries of its spec
    facts: dict = field(default_factory=dict)      # row expectations: name -> observed value


@dataclass(frozen=True)
class Case:
    """One row: ``method(model, batches) -> (net, Outcome)`` on ``build()`` with batches of ``shape``.

    ``exact(original, net)`` gives a module that must compute the original's outputs (within
    ``atol``; also in train mode with ``train_mode``); ``expect`` holds row expectations
    compared with ``Outcome.facts`` (``"sizes"``: attributes of the result). ``onnx=False``
    where the result is plain torch layers of the kind another row of the same method already
    exports (the evolver's shrinks: resized Linear / Conv / BatchNorm, as the grow rows), to
    keep the table within a minute.
    """

    build: Callable[[], nn.Module]
    shape: tuple
    method: Callable
    exact: Callable | None = None
    atol: float = 1e-5
    train_mode: bool = False
    expect: dict = field(default_factory=dict)
    onnx: bool = True


# Methods ------------------------------------------------------------------------------------------

def project(goal, value, unpack=False):
    """compress_network_using_projection with one goal; exact: the same forms at full rank."""
    def method(model, data):
        net, info = rw.compress_network_using_projection(model, data, **{goal: value}, unpack=unpack,
                                                         verbosity="off")
        built = {name: layer for name, layer in info.layers.items() if layer.side != "dense"}
        return net, Outcome(info.learnables_after, {n: l.learnables_after for n, l in built.items()},
                            {n: {"rank_in": _plain(l.rank_in), "rank_out": _plain(l.rank_out)}
                             for n, l in built.items()})
    return method


def projected_at_full_rank(original, net):
    """``original`` with every form of ``net`` rebuilt on the original layer at full rank
    (identity bases, which :meth:`from_spec` takes as placeholders): exact by construction."""
    full = copy.deepcopy(original)
    for name, form in compressed_forms(net).items():
        dense, spec = original.get_submodule(name), form_spec(form)
        full.set_submodule(name, form_types()[spec["type"]].from_spec(dense, _full_ranks(spec, dense)))
    return full


def _full_ranks(spec, dense):
    if isinstance(dense, nn.RNNBase):
        inputs = cell_input_sizes(dense)
        widths = {"rank_in": inputs, "rank_out": [dense.hidden_size] * len(inputs)}
    elif isinstance(dense, nn.MultiheadAttention):  # key, value and output maps, each E wide
        widths = {"rank_in": [dense.embed_dim], "rank_out": [dense.embed_dim] * 3}
    else:
        widths = {"rank_in": [dense.weight.shape[1]], "rank_out": [dense.weight.shape[0]]}
    full = {}
    for key, dims in widths.items():
        ranks = spec[key] if isinstance(spec[key], list) else [spec[key]]
        full[key] = [None if r is None else d for r, d in zip(ranks, dims)]
        full[key] = full[key] if isinstance(spec[key], list) else full[key][0]
    return {**spec, **full}


def truncate(method_name, calibrated=False, **options):
    """truncate_kernels (on the batches when ``calibrated``: a bias is added to a layer without
    one); exact (for cuts, Tucker, trains): the same call keeping the whole norm."""
    def method(model, data):
        net, info = rw.truncate_kernels(model, method_name, **options, verbosity="off",
                                        calibration=data if calibrated else None)
        return net, truncation_outcome(info)
    return method


def truncation_outcome(info, learnables=None):
    return Outcome(info.learnables_after if learnables is None else learnables,
                   {n: t.learnables_after for n, t in info.layers.items()},
                   {n: {"method": t.method, "ranks": list(t.ranks)} for n, t in info.layers.items()})


def mixed(model, data):
    """Evolve (grow the first width), then truncate the grown convolution and project the one
    it feeds and the head: forms on resized layers."""
    evolved = copy.deepcopy(model)
    rw.WidthEvolver(evolved, data[0][:1], verbosity="off").grow("0", 2)
    truncated, truncation = rw.truncate_kernels(evolved, "tt", order="hiwo", ranks=(2, 3, 4),
                                                layer_names=["0"], verbosity="off")
    net, projection = rw.compress_network_using_projection(truncated, data, layer_names=["2", "5"],
                                                           learnables_reduction_goal=0.3, verbosity="off")
    outcome = truncation_outcome(truncation, projection.learnables_after)
    outcome.layers.update({name: projection.layers[name].learnables_after for name in projection.layer_names})
    outcome.facts["grown layer projected"] = "2" in projection.layer_names
    return net, outcome


def truncated_at_full_rank(method_name, **options):
    options = {key: value for key, value in options.items() if key != "ranks"}
    return lambda original, net: rw.truncate_kernels(original, method_name, **options, norm_retained=1.0,
                                                     verbosity="off")[0]


def evolve(action, settings=None, with_data=True, **widths):
    """A WidthEvolver on a copy: ``grow`` the named widths by the given counts, or ``shrink``
    (on the batches when ``with_data``); exact: the evolved copy itself."""
    def method(model, data):
        evolved = copy.deepcopy(model)
        evolver = rw.WidthEvolver(evolved, data[0][:1], verbosity="off", **(settings or {}))
        if action == "grow":
            changed = {}
            for name, count in widths.items():
                changed.update(evolver.grow(name, count))
        else:
            changed = evolver.shrink(data=data if with_data else None)
        facts = {"changed": changed, "widths": evolver.widths(), "shape_spec": evolver.shape_spec(),
                 "rotatable": {n for n, g in evolver.groups.items() if g.rotatable and not g.frozen}}
        return evolved, Outcome(evolver.history.events[-1].learnables, facts=facts)
    return method


def incremental(model, data):
    targets = [torch.randint(0, 5, (len(x),), generator=torch.Generator().manual_seed(i))
               for i, x in enumerate(data)]
    net, history = rw.compress_incrementally(model, data, train_data=list(zip(data, targets)),
                                             eval_fn=lambda m: 1.0, learnables_reduction_goal=0.5,
                                             verbosity="off")
    kept = [s for s in history.steps if s.kept]
    return net, Outcome(history.final_learnables, {s.layer: s.layer_learnables_after for s in kept},
                        {s.layer: {"type": "ProjectedLinear"} for s in kept})


def _plain(ranks):
    return list(ranks) if isinstance(ranks, tuple) else ranks


def _attribute(model, path):
    module, attribute = path.rsplit(".", 1)
    return getattr(model.get_submodule(module), attribute)


# The table ----------------------------------------------------------------------------------------

EV, LR = "explained_variance_goal", "learnables_reduction_goal"
def seeded(factory):
    """``factory`` in eval mode, with the weights of seed 0 (whatever ran before)."""
    @functools.wraps(factory)
    def build():
        torch.manual_seed(0)
        return factory().eval()
    return build


MLP, CNN = (seeded(tiny_mlp), (16, 12)), (seeded(tiny_cnn), (8, 3, 8, 8))
SEQUENCE = (seeded(SequenceModel), (4, 7, 6))
CHAIN, RESIDUAL, CONCAT = (chain, (16, 20)), (residual_net, (16, 2, 6, 6)), (concat_net, (16, 3, 4, 4))
MAX_POOL, AVERAGE_POOL = (max_pool_net, (16, 2, 8, 8)), (average_pool_net, (16, 2, 8, 8))
SHARED = (shared_net, (16, 20))
LSTM, GRU = (lstm_net, (8, 9, 6)), (gru_net, (8, 9, 6))


def with_changes(build, change):
    """``build`` followed by ``change(model)`` under no_grad (a dead unit, a duplicated channel)."""
    @functools.wraps(build)
    def changed():
        model = build()
        with torch.no_grad():
            change(model)
        return model
    return changed


def dead_and_proportional_units(model):
    model[3].weight[4].zero_()                       # dead: zero row and bias
    model[3].bias[4] = 0.0
    model[3].weight[7] = 2.5 * model[3].weight[2]    # relu(2.5 h) = 2.5 relu(h)
    model[3].bias[7] = 2.5 * model[3].bias[2]


def dead_unit(model):
    model[3].weight[4].zero_()
    model[3].bias[4] = 0.0


def rank_three_fc3(model):  # fc3 of rank 3 and no bias: 5 of its 8 directions are zero
    generator = torch.Generator().manual_seed(3)
    model[5].weight.copy_(torch.randn(8, 3, generator=generator, dtype=torch.float64)
                          @ torch.randn(3, 12, generator=generator, dtype=torch.float64))
    model[5].bias.zero_()


def duplicated_right_channel(model):  # right channel 3 repeats channel 1, also in the shared BatchNorm
    model.right.weight[3], model.right.bias[3] = model.right.weight[1], model.right.bias[1]
    for tensor in (model.bn.weight, model.bn.bias, model.bn.running_mean, model.bn.running_var):
        tensor[8 + 3] = tensor[8 + 1]


def duplicated_conv_channel(model):
    model[0].weight[4], model[0].bias[4] = model[0].weight[1], model[0].bias[1]


def rank_two_conv(model):  # 6 output channels of rank 2 (bias in the same span)
    generator = torch.Generator().manual_seed(3)
    mixing = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    model[0].weight.copy_(torch.einsum("or,rikl->oikl", mixing,
                                       torch.randn(2, 2, 3, 3, generator=generator, dtype=torch.float64)))
    model[0].bias.copy_(mixing @ torch.randn(2, generator=generator, dtype=torch.float64))


def duplicated_block_channel(model):  # inner channel 3 of block 1 repeats channel 0 (rows and BatchNorm)
    model.block1.conv1.weight[3] = model.block1.conv1.weight[0]
    for tensor in (model.block1.bn1.weight, model.block1.bn1.bias,
                   model.block1.bn1.running_mean, model.block1.bn1.running_var):
        tensor[3] = tensor[0]


def row(model, method, **options):
    build, shape = model
    return Case(build, shape, method, **options)


ZERO_TOLERANCE = {"shrink_tol": 0.0}
TINY_TOLERANCE = {"shrink_tol": 1e-9}
TEST_CASES = {
    # projection, both goals, packed and unpacked, on every structure ---------------------------
    "project-ev-mlp": row(MLP, project(EV, 0.9), exact=projected_at_full_rank),
    "project-lr-cnn-unpacked": row(CNN, project(LR, 0.5, unpack=True), exact=projected_at_full_rank),
    "project-lr-sequence": row(SEQUENCE, project(LR, 0.5), exact=projected_at_full_rank),
    "project-lr-residual": row(RESIDUAL, project(LR, 0.5), exact=projected_at_full_rank),
    "project-ev-concat": row(CONCAT, project(EV, 0.8), exact=projected_at_full_rank),
    "project-lr-flatten": row(MAX_POOL, project(LR, 0.5), exact=projected_at_full_rank),
    "project-lr-shared": row(SHARED, project(LR, 0.5), exact=projected_at_full_rank),
    "project-lr-lstm": row(LSTM, project(LR, 0.5), exact=projected_at_full_rank),
    "project-ev-gru-unpacked": row(GRU, project(EV, 0.9, unpack=True), exact=projected_at_full_rank),
    "project-lr-transformer": row((seeded(lambda: nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)),
                                   (4, 6, 16)), project(LR, 0.6), exact=projected_at_full_rank),
    # kernel truncation, every method ----------------------------------------------------------
    "cut-cnn": row(CNN, truncate("cut", cut="oh|iw", ranks=2),
                   exact=truncated_at_full_rank("cut", cut="oh|iw")),
    "tucker-cnn": row(CNN, truncate("tucker", ranks=(4, 2)), exact=truncated_at_full_rank("tucker")),
    "cp-cnn": row(CNN, truncate("cp", ranks=3)),
    "tt-cnn": row(CNN, truncate("tt", order="hiwo", ranks=(2, 3, 2)),
                  exact=truncated_at_full_rank("tt", order="hiwo")),
    "tt-residual": row(RESIDUAL, truncate("tt", ranks=(2, 3, 2), layer_names=["block1.conv1", "block2.conv2"]),
                       exact=truncated_at_full_rank("tt", layer_names=["block1.conv1", "block2.conv2"])),
    "tucker-concat": row(CONCAT, truncate("tucker", modes="oihw", ranks=(3, 4, 2, 2), layer_names=["mix"]),
                         exact=truncated_at_full_rank("tucker", modes="oihw", layer_names=["mix"])),
    "cut-residual-calibrated": row(RESIDUAL, truncate("cut", calibrated=True, ranks=2,
                                                      layer_names=["block1.conv2", "block2.conv1"])),
    # width evolution: growing is exact, shrinking only what is dead is exact --------------------
    "grow-chain": row(CHAIN, evolve("grow", **{"0": 5, "3": 5, "5": 5}), exact=lambda o, net: net, atol=1e-12,
                      train_mode=True, expect={"widths": {"0": 21, "3": 17, "5": 13}}),
    "grow-concat": row(CONCAT, evolve("grow", left=2, right=3, mix=1), exact=lambda o, net: net, atol=1e-12,
                       train_mode=True,
                       expect={"sizes": {"bn.num_features": 17, "mix.in_channels": 17, "out.in_features": 56}}),
    "grow-flatten": row(MAX_POOL, evolve("grow", **{"0": 3}), exact=lambda o, net: net, atol=1e-12,
                        expect={"sizes": {"0.out_channels": 9, "4.in_features": 144}}),
    "grow-average-pool": row(AVERAGE_POOL, evolve("grow", **{"0": 3}), exact=lambda o, net: net, atol=1e-12,
                             expect={"sizes": {"0.out_channels": 9, "3.in_features": 144}}),
    "grow-residual": row(RESIDUAL, evolve("grow", stem=3, **{"block2.conv1": 2}), exact=lambda o, net: net,
                         atol=1e-12, train_mode=True,
                         expect={"widths": {"stem": 9, "block1.conv1": 10, "block2.conv1": 6},
                                 "sizes": {"block1.conv2.out_channels": 9, "fc.out_features": 9,
                                           "out.in_features": 9}}),
    "shrink-nothing-chain": row(CHAIN, evolve("shrink", ZERO_TOLERANCE), exact=lambda o, net: net, atol=1e-10,
                                expect={"changed": {}, "shape_spec": {}}, onnx=False),
    "shrink-nothing-chain-without-data": row(CHAIN, evolve("shrink", ZERO_TOLERANCE, with_data=False),
                                             exact=lambda o, net: net, atol=1e-10, expect={"changed": {}},
                                             onnx=False),
    "shrink-nothing-concat": row(CONCAT, evolve("shrink", ZERO_TOLERANCE), exact=lambda o, net: net,
                                 atol=1e-10, expect={"changed": {}}, onnx=False),
    "shrink-nothing-flatten": row(MAX_POOL, evolve("shrink", ZERO_TOLERANCE), exact=lambda o, net: net,
                                  atol=1e-10, expect={"changed": {}}, onnx=False),
    "shrink-nothing-residual": row(RESIDUAL, evolve("shrink", ZERO_TOLERANCE), exact=lambda o, net: net,
                                   atol=1e-10, expect={"changed": {}}, onnx=False),
    "shrink-dead-proportional-chain": row(
        (with_changes(chain, dead_and_proportional_units), CHAIN[1]), evolve("shrink", TINY_TOLERANCE),
        exact=lambda o, net: net, atol=1e-7, expect={"changed": {"3": (12, 10)}}, onnx=False),
    "shrink-dead-chain-without-data": row(
        (with_changes(chain, dead_unit), CHAIN[1]), evolve("shrink", TINY_TOLERANCE, with_data=False),
        exact=lambda o, net: net, atol=1e-10, expect={"changed": {"3": (12, 11)}}, onnx=False),
    "shrink-rotated-chain": row(
        (with_changes(chain, rank_three_fc3), CHAIN[1]), evolve("shrink", TINY_TOLERANCE, with_data=False),
        exact=lambda o, net: net, atol=1e-10, expect={"changed": {"5": (8, 3)}}, onnx=False),
    "shrink-duplicate-concat": row(
        (with_changes(concat_net, duplicated_right_channel), CONCAT[1]), evolve("shrink", TINY_TOLERANCE),
        exact=lambda o, net: net, atol=1e-7,
        expect={"changed": {"right": (4, 3)},
                "sizes": {"bn.num_features": 11, "mix.in_channels": 11, "out.in_features": 36},
                "shape_spec": {"right": {"type": "Conv2d", "in_channels": 3, "out_channels": 3},
                               "bn": {"type": "BatchNorm2d", "num_features": 11},
                               "mix": {"type": "Conv2d", "in_channels": 11, "out_channels": 6},
                               "out": {"type": "Linear", "in_features": 36, "out_features": 3}}}),
    "shrink-duplicate-flatten": row(
        (with_changes(max_pool_net, duplicated_conv_channel), MAX_POOL[1]), evolve("shrink", TINY_TOLERANCE),
        exact=lambda o, net: net, atol=1e-7, expect={"changed": {"0": (6, 5)}, "sizes": {"4.in_features": 80}},
        onnx=False),
    "shrink-rotated-average-pool": row(
        (with_changes(average_pool_net, rank_two_conv), AVERAGE_POOL[1]),
        evolve("shrink", TINY_TOLERANCE, with_data=False), exact=lambda o, net: net, atol=1e-10,
        expect={"changed": {"0": (6, 2)}, "sizes": {"3.in_features": 32}, "rotatable": {"0"}}),
    "shrink-duplicate-residual": row(
        (with_changes(residual_net, duplicated_block_channel), RESIDUAL[1]), evolve("shrink", TINY_TOLERANCE),
        exact=lambda o, net: net, atol=1e-7, expect={"changed": {"block1.conv1": (10, 9)}}, onnx=False),
    # layer by layer with fine-tuning; every form in one model -----------------------------------
    "incremental-mlp": row(MLP, incremental),
    "mixed-cnn": row(CNN, mixed, expect={"grown layer projected": True}),
}


# The tester ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TEST_CASES))
def test_case(name, tmp_path):
    case = TEST_CASES[name]
    original = case.build()
    data = [x.to(next(original.parameters()).dtype) for x in make_batches(case.shape, count=3)]
    snapshot = state_of(original)
    net, outcome = case.method(original, data)
    assert_unchanged(original, snapshot)
    assert_learnables_match(net, outcome)
    for key, expected in case.expect.items():
        observed = {p: _attribute(net, p) for p in expected} if key == "sizes" else outcome.facts[key]
        assert observed == expected, key
    if case.exact is not None:
        assert_same_outputs(case.exact(original, net), original, data[1], case.atol, case.train_mode)
    for form in (net, unpack_forms(net)):
        assert_save_load_bit_exact(form, case.build(), data[1], tmp_path / "model.safetensors")
    if case.onnx:
        assert_onnx_matches(net, data[1], tmp_path / "model.onnx")


def assert_learnables_match(net, outcome):
    if outcome.learnables is None:
        return
    assert outcome.learnables == rw.count_learnables(net)
    for name, learnables in outcome.layers.items():
        assert rw.count_learnables(net.get_submodule(name)) == learnables, name
    forms = compressed_forms(net)
    assert set(outcome.specs) <= set(forms)
    for name, entries in outcome.specs.items():
        spec = form_spec(forms[name])
        assert {key: spec[key] for key in entries} == entries, name


def assert_same_outputs(model, original, x, atol, train_mode):
    for train in (False, True) if train_mode else (False,):
        torch.testing.assert_close(outputs(model, x, train=train), outputs(original, x, train=train),
                                   rtol=0 if atol < 1e-6 else 1e-4, atol=atol)


def assert_save_load_bit_exact(model, architecture, x, path):
    rw.save(model, path)
    snapshot = state_of(architecture)
    loaded = rw.load(path, model=architecture)
    assert_unchanged(architecture, snapshot)
    assert_identical(loaded.eval(), model.eval(), x)


def assert_onnx_matches(model, x, path):
    ort = pytest.importorskip("onnxruntime")  # the last step: every other check has run
    single = copy.deepcopy(model).float().eval()
    x = x.float()
    rw.export_onnx(single, path, x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (result,) = session.run(["output"], {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(result, single(x).numpy(), rtol=1e-4, atol=1e-4)

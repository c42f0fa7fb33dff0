"""One table of tiny models x methods, each check one parametrized test over the rows (peft's layout).

Each :class:`Case` names a model factory (the structures of :mod:`structures`: chains, residual
additions, concatenations, a flatten into a Linear, a module used twice, recurrent layers, and
a model per layer kind of :data:`rankwise.kinds.KINDS`), one batch shape and a *method*:
project with either goal (packed or unpacked), truncate with a cut, Tucker, CP or a tensor
train, evolve widths (grow, shrink), compress incrementally, or several methods on one model
(truncate then project, project then truncate, evolve, truncate and project). Every row runs
its method once (:func:`result`); each check is its own test, so that one failure hides no other:

1. ``test_input_model_is_unchanged``: structure and every tensor of its state, bit for bit;
2. ``test_learnables_and_specs_are_as_reported``: the learnables the method reports equal
   ``count_learnables`` of the built modules, network and layer by layer, and the spec of each
   built form says what the method reported;
3. ``test_row_expectations``: the row's own expectations (widths changed, layer sizes, ...);
4. ``test_kinds_are_compressed``: the row compresses a layer of each kind it stands for, and
   ``test_every_kind_has_a_row`` fails when a kind of :data:`~rankwise.kinds.KINDS` has no row;
5. ``test_exact_setting_computes_the_original``: where the method has an exact setting
   (projection and cuts, Tucker, trains at full rank; growing; shrinking only what is dead),
   the result computes the original's outputs;
6. ``test_save_load_is_bit_exact``: ``save`` then ``load(path, model=original)`` gives back the
   same structure, state dict and outputs bit for bit, for the result and for its unpacked form;
7. ``test_onnx_matches_onnxruntime``: ``export_onnx`` runs and onnxruntime computes the same
   outputs (float32, ``atol=1e-4``); rows whose result holds nothing new for the exporter skip it
   (see :class:`Case`).

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
from rankwise.kinds import KINDS, kind_of
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
    kinds: set = field(default_factory=set)        # the kinds of the layers it compressed


@dataclass(frozen=True)
class Case:
    """One row: ``method(model, batches) -> (net, Outcome)`` on ``build()`` with batches of ``shape``.

    ``exact(original, net)`` gives a module that must compute the original's outputs (within
    ``atol``; also in train mode with ``train_mode``); ``expect`` holds row expectations
    compared with ``Outcome.facts`` (``"sizes"``: attributes of the result); ``kinds`` the
    kinds of :data:`~rankwise.kinds.KINDS` the row stands for (it must compress a layer of
    each). ``tokens``: the batches are token ids below it instead of floats. ``onnx=False``
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
    kinds: tuple = ()
    tokens: int | None = None


# Methods ------------------------------------------------------------------------------------------

def project(goal, value, unpack=False):
    """compress_network_using_projection with one goal; exact: the same forms at full rank."""
    def method(model, data):
        net, info = rw.compress_network_using_projection(model, data, **{goal: value}, unpack=unpack,
                                                         verbosity="off")
        return net, projection_outcome(info)
    return method


def projection_outcome(info, learnables=None):
    built = {name: layer for name, layer in info.layers.items() if layer.side != "dense"}
    return Outcome(info.learnables_after if learnables is None else learnables,
                   {n: l.learnables_after for n, l in built.items()},
                   {n: {"rank_in": _plain(l.rank_in), "rank_out": _plain(l.rank_out)} for n, l in built.items()},
                   kinds={l.kind for l in built.values()})


def projected_at_full_rank(original, net):
    """``original`` with every form of ``net`` rebuilt on the original layer at full rank
    (identity bases, which :meth:`from_spec` takes as placeholders): exact by construction."""
    full = copy.deepcopy(original)
    for name, form in compressed_forms(net).items():
        dense, spec = original.get_submodule(name), form_spec(form)
        full.set_submodule(name, form_types()[spec["type"]].from_spec(dense, _full_ranks(spec, dense)))
    return full


def _full_ranks(spec, dense):
    kind = kind_of(dense)
    if kind.family == "recurrent":
        inputs = cell_input_sizes(dense)
        widths = {"rank_in": inputs, "rank_out": [dense.hidden_size] * len(inputs)}
    elif kind.family == "attention":  # key, value and output maps, each E wide
        widths = {"rank_in": [dense.embed_dim], "rank_out": [dense.embed_dim] * 3}
    else:
        out_channels, in_channels = kind.weight(dense).shape[:2]
        widths = {"rank_in": [in_channels], "rank_out": [out_channels]}
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


def truncate_then_project(model, data):
    """Tucker on every convolution, then projection: the factors inside the truncated layers are no
    candidates (projecting one nested forms that save could not describe), the head is projected."""
    truncated, truncation = rw.truncate_kernels(model, "tucker", ranks=(4, 2), verbosity="off")
    with pytest.warns(UserWarning, match="learnables_reduction_goal"):
        net, projection = rw.compress_network_using_projection(truncated, data, learnables_reduction_goal=0.8,
                                                               verbosity="off")
    outcome = truncation_outcome(truncation, projection.learnables_after)
    outcome.layers.update({name: projection.layers[name].learnables_after for name in projection.layer_names})
    outcome.facts["projected"] = projection.layer_names
    return net, outcome


def project_then_truncate(model, data):
    """Projection, then Tucker on every convolution: a projected convolution's core is no candidate,
    the convolution left dense is truncated."""
    projected, projection = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.5,
                                                                 verbosity="off")
    net, truncation = rw.truncate_kernels(projected, "tucker", ranks=(4, 2), verbosity="off")
    outcome = projection_outcome(projection, rw.count_learnables(net))
    outcome.layers.update({n: t.learnables_after for n, t in truncation.layers.items()})
    outcome.specs.update(truncation_outcome(truncation).specs)
    outcome.facts.update({"projected": projection.layer_names, "truncated": truncation.layer_names})
    return net, outcome


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


class Volume(nn.Module):
    """Conv3d -> ReLU -> Conv3d -> flatten -> Linear over (N, 2, 5, 5, 5) volumes."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv3d(2, 8, 3, padding=1), nn.Conv3d(8, 10, 3, stride=2)
        self.head = nn.Linear(10 * 2 * 2 * 2, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


class Tokens(nn.Module):
    """A token embedding (40 tokens, 16 wide) read by a Linear head, over (N, T) token ids."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(40, 16), nn.Linear(16, 6)

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)))


class SelfAttention(nn.Module):
    """A bare nn.MultiheadAttention over (N, T, 16) sequences, read by a Linear head."""

    def __init__(self):
        super().__init__()
        self.attention, self.head = nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.attention(x, x, x, need_weights=False)[0])


def gpt2_mlp():
    """GPT-2's MLP block: Conv1D(12 -> 32) -> GELU -> Conv1D(32 -> 12) (``Conv1D(nf, nx)``)."""
    from transformers.pytorch_utils import Conv1D  # imported here: the kind matches it once imported

    model = nn.Sequential(Conv1D(32, 12), nn.GELU(), Conv1D(12, 32))
    with torch.no_grad():  # Conv1D starts with std 0.02 weights and zero biases
        for layer in model[::2]:
            layer.weight.normal_(0, layer.weight.shape[0] ** -0.5)
            layer.bias.normal_(0, 0.1)
    return model


VOLUME, TOKENS = (seeded(Volume), (4, 2, 5, 5, 5)), (seeded(Tokens), (8, 7))
ATTENTION, GPT2_MLP = (seeded(SelfAttention), (4, 6, 16)), (seeded(gpt2_mlp), (4, 5, 12))


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
    "project-ev-mlp": row(MLP, project(EV, 0.9), exact=projected_at_full_rank, kinds=("linear",)),
    "project-lr-cnn-unpacked": row(CNN, project(LR, 0.5, unpack=True), exact=projected_at_full_rank,
                                   kinds=("conv2d",)),
    "project-lr-sequence": row(SEQUENCE, project(LR, 0.5), exact=projected_at_full_rank, kinds=("conv1d",)),
    "project-lr-volume": row(VOLUME, project(LR, 0.5), exact=projected_at_full_rank, kinds=("conv3d",)),
    "project-lr-tokens": row(TOKENS, project(LR, 0.5), exact=projected_at_full_rank, kinds=("embedding",),
                             tokens=40),
    "project-lr-gpt2-mlp": row(GPT2_MLP, project(LR, 0.5), exact=projected_at_full_rank,
                               kinds=("gpt2_conv1d",)),
    "project-lr-attention": row(ATTENTION, project(LR, 0.5), exact=projected_at_full_rank,
                                kinds=("attention",)),
    "project-lr-residual": row(RESIDUAL, project(LR, 0.5), exact=projected_at_full_rank),
    "project-ev-concat": row(CONCAT, project(EV, 0.8), exact=projected_at_full_rank),
    "project-lr-flatten": row(MAX_POOL, project(LR, 0.5), exact=projected_at_full_rank),
    "project-lr-shared": row(SHARED, project(LR, 0.5), exact=projected_at_full_rank),
    "project-lr-lstm": row(LSTM, project(LR, 0.5), exact=projected_at_full_rank, kinds=("lstm",)),
    "project-ev-gru-unpacked": row(GRU, project(EV, 0.9, unpack=True), exact=projected_at_full_rank,
                                   kinds=("gru",)),
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
    # layer by layer with fine-tuning; several methods on one model ----------------------------
    "incremental-mlp": row(MLP, incremental),
    "truncate-then-project-cnn": row(CNN, truncate_then_project, expect={"projected": ["5"]}),
    "project-then-truncate-cnn": row(CNN, project_then_truncate,
                                     expect={"projected": ["2", "5"], "truncated": ["0"]}),
    "mixed-cnn": row(CNN, mixed, expect={"grown layer projected": True}),
}


# The checks, one test each -------------------------------------------------------------------------

@dataclass
class Result:
    """A row's method run once: the original, its state before the run, the batches and the outcome."""

    original: nn.Module
    snapshot: tuple
    data: list
    net: nn.Module
    outcome: Outcome


@functools.cache
def result(name: str) -> Result:
    """Row ``name``'s method run on its model (once per session: every check reads the same run)."""
    case = TEST_CASES[name]
    original = case.build()
    if case.tokens is None:
        data = [x.to(next(original.parameters()).dtype) for x in make_batches(case.shape, count=3)]
    else:
        generator = torch.Generator().manual_seed(0)
        data = [torch.randint(0, case.tokens, case.shape, generator=generator) for _ in range(3)]
    snapshot = state_of(original)
    net, outcome = case.method(original, data)
    return Result(original, snapshot, data, net, outcome)


def rows(having=None):
    """The names of the rows (those for which ``having(case)`` holds)."""
    return [name for name, case in TEST_CASES.items() if having is None or having(case)]


@pytest.mark.parametrize("name", rows())
def test_input_model_is_unchanged(name):
    run = result(name)
    assert_unchanged(run.original, run.snapshot)


@pytest.mark.parametrize("name", rows())
def test_learnables_and_specs_are_as_reported(name):
    run = result(name)
    outcome, net = run.outcome, run.net
    if outcome.learnables is not None:
        assert outcome.learnables == rw.count_learnables(net)
    for layer, learnables in outcome.layers.items():
        assert rw.count_learnables(net.get_submodule(layer)) == learnables, layer
    forms = compressed_forms(net)
    assert set(outcome.specs) <= set(forms)
    for layer, entries in outcome.specs.items():
        spec = form_spec(forms[layer])
        assert {key: spec[key] for key in entries} == entries, layer


@pytest.mark.parametrize("name", rows(lambda case: case.expect))
def test_row_expectations(name):
    run = result(name)
    for key, expected in TEST_CASES[name].expect.items():
        observed = ({path: _attribute(run.net, path) for path in expected} if key == "sizes"
                    else run.outcome.facts[key])
        assert observed == expected, key


@pytest.mark.parametrize("name", rows(lambda case: case.kinds))
def test_kinds_are_compressed(name):
    assert set(TEST_CASES[name].kinds) <= result(name).outcome.kinds


def test_every_kind_has_a_row():
    covered = {kind for case in TEST_CASES.values() for kind in case.kinds}
    assert [kind.name for kind in KINDS if kind.name not in covered] == []


@pytest.mark.parametrize("name", rows(lambda case: case.exact is not None))
def test_exact_setting_computes_the_original(name):
    case, run = TEST_CASES[name], result(name)
    exact = case.exact(run.original, run.net)
    for train in (False, True) if case.train_mode else (False,):
        torch.testing.assert_close(outputs(exact, run.data[1], train=train),
                                   outputs(run.original, run.data[1], train=train),
                                   rtol=0 if case.atol < 1e-6 else 1e-4, atol=case.atol)


@pytest.mark.parametrize("name", rows())
def test_save_load_is_bit_exact(name, tmp_path):
    run = result(name)
    for model in (run.net, unpack_forms(run.net)):
        rw.save(model, tmp_path / "model.safetensors")
        architecture = TEST_CASES[name].build()
        snapshot = state_of(architecture)
        loaded = rw.load(tmp_path / "model.safetensors", model=architecture)
        assert_unchanged(architecture, snapshot)
        assert_identical(loaded.eval(), model.eval(), run.data[1])


@pytest.mark.parametrize("name", rows(lambda case: case.onnx))
def test_onnx_matches_onnxruntime(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    run = result(name)
    single = copy.deepcopy(run.net).float().eval()
    x = run.data[1].float() if run.data[1].is_floating_point() else run.data[1]
    rw.export_onnx(single, tmp_path / "model.onnx", x, verbosity="off")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (exported,) = session.run(["output"], {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(exported, single(x).numpy(), rtol=1e-4, atol=1e-4)

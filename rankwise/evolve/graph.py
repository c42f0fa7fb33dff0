"""Which layer widths can change: a channel analysis of the traced network (torch.fx).

A *width* is the number of output channels (features) of a *producer*: an ungrouped layer
whose kind has size attributes (:func:`rankwise.kinds.size_attributes`: a ``nn.Linear`` or an
``nn.Conv1d/2d/3d``). Changing it means changing the producer's output rows and
everything that sees those channels downstream, up to the *consumers*, the next producers,
whose input columns follow. In between the channels may pass through

- channel-wise layers, resized with the width: ``BatchNorm1d/2d/3d``;
- elementwise functions (ReLU, GELU, tanh, ...) and max pooling, which act on each channel
  separately but do **not** commute with a rotation of the channels;
- dropout, average pooling and scalar multiples, which are linear per channel and commute with
  any rotation of the channels;
- flattening ``(N, C, *spatial) -> (N, C * S)``: channel ``c`` becomes the block of ``S``
  consecutive input features ``c S, ..., c S + S - 1`` of the next ``Linear``;
- additions (residual connections): the two summands' widths are *tied* and move together;
- concatenation along the channel axis: each part keeps its own width, and the consumer's
  columns of one part start at that part's *offset*.

Widths tied by additions form one :class:`~rankwise.evolve.widths.WidthGroup`. A group is *frozen* (left alone, and
the reason recorded) when any of its channels reach something this analysis does not follow:
the network output, an unsupported operation, a layer with weights called twice, a BatchNorm
on flattened features, ... The analysis is a single pass over the fx graph in topological order: each
tensor gets a *layout*, the sequence of width segments along its channel axis.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from rankwise.evolve.widths import ChannelMember, Consumer, WidthAnalysis
from rankwise.kinds import channels_last, is_batchnorm, size_attributes
from rankwise.metric import only_batchnorm_user

ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
                       nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish,
                       nn.Hardsigmoid, nn.Softplus)
MAX_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
                    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
AVG_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
F = nn.functional
ELEMENTWISE_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu,
                         F.silu, F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
                         F.hardtanh, F.hardswish, F.softplus, "relu", "relu_", "sigmoid", "tanh"}
MAX_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
                      F.adaptive_max_pool2d}
IDENTITY_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, "contiguous", "clone"}
AVG_POOL_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                      F.adaptive_avg_pool2d}
PASSTHROUGH_MODULES = ELEMENTWISE_MODULES + MAX_POOL_MODULES + IDENTITY_MODULES + AVG_POOL_MODULES
PASSTHROUGH_FUNCTIONS = ELEMENTWISE_FUNCTIONS | MAX_POOL_FUNCTIONS | IDENTITY_FUNCTIONS | AVG_POOL_FUNCTIONS
ADDITIONS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub,
             "add", "add_", "sub", "sub_"}
SCALINGS = {operator.mul, operator.imul, operator.truediv, operator.itruediv, operator.neg,
            torch.mul, torch.div, torch.neg, "mul", "mul_", "div", "div_", "neg"}
CONCATENATIONS = {torch.cat, torch.concat}
RESHAPES = {torch.flatten, torch.reshape, "flatten", "view", "reshape"}
SHAPE_QUERIES = {"size", "dim", getattr, len}


@dataclass(frozen=True)
class Layout:
    """Width segments along a tensor's channel axis; ``None`` in a segment marks untracked channels."""

    axis: int
    block: int
    segments: tuple  # ((width_id or None, channels), ...)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; a ``ValueError`` that says how to fix an untraceable model.

    The returned GraphModule shares its submodules with ``model``, so it sees every later
    change of their weights.
    """
    try:
        return fx.symbolic_trace(model)
    except Exception as error:
        raise ValueError(
            f"model: torch.fx cannot trace it ({type(error).__name__}: {error}). Width evolution "
            "needs a forward without data-dependent control flow; move such code into a leaf "
            "module, or evolve a traceable submodule instead.") from error


def analyze_widths(model: nn.Module, example_input, graph: fx.GraphModule | None = None) -> list:
    """Find every width of ``model`` and whether it may change.

    Parameters
    ----------
    model : torch.nn.Module
        A network that ``torch.fx.symbolic_trace`` can trace.
    example_input : torch.Tensor or tuple of torch.Tensor
        Input(s) of one forward pass, used to know the shapes (a batch of one is enough). The
        model runs on it once in eval mode without gradients, and is put back in its mode.
    graph : torch.fx.GraphModule, optional
        ``trace(model)``, when already done.

    Returns
    -------
    list of rankwise.evolve.widths.WidthGroup
        In graph order of their first producer, frozen ones included.
    """
    graph = trace(model) if graph is None else graph
    _propagate_shapes(model, graph, example_input)
    analysis = WidthAnalysis()
    layouts: dict = {}
    calls = _module_call_counts(graph)
    modules = dict(model.named_modules())
    for node in graph.graph.nodes:
        layouts[node] = _layout_of(node, layouts, analysis, modules, calls)
    return analysis.groups()


def _propagate_shapes(model, graph, example_input) -> None:
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(graph).propagate(*inputs)
    except Exception as error:
        raise ValueError(f"example_input: the model rejected it ({type(error).__name__}: {error}); "
                         "pass a tensor (or tuple of tensors) the model accepts, e.g. one "
                         "training batch.") from error
    finally:
        model.train(was_training)


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _module_call_counts(graph: fx.GraphModule) -> dict:
    counts: dict = {}
    for node in graph.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _shape(node) -> torch.Size | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


def _input_layouts(node, layouts) -> list:
    """Layouts of every tensor argument of ``node`` (``None`` for untracked ones)."""
    found = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(layouts.get(n)))
    return found


def _freeze_inputs(node, layouts, analysis, reason) -> None:
    for layout in _input_layouts(node, layouts):
        analysis.freeze(layout, f"{reason} ({node.name})")


def _layout_of(node, layouts, analysis, modules, calls) -> Layout | None:
    """The layout of ``node``'s output, recording ties, members, consumers and freezes."""
    if node.op in ("placeholder", "get_attr"):
        return None
    if node.op == "output":
        _freeze_inputs(node, layouts, analysis, "reaches the network output")
        return None
    if node.op == "call_module":
        module = modules[node.target]
        layout = _module_layout(node, module, layouts, analysis, modules)
        if calls[node.target] > 1 and _has_state(module):
            reason = f"module {node.target} is called more than once"
            _freeze_inputs(node, layouts, analysis, reason)
            analysis.freeze(layout, reason)
        return layout
    return _function_layout(node, layouts, analysis)


def _module_layout(node, module, layouts, analysis, modules) -> Layout | None:
    source = layouts.get(node.args[0]) if node.args else None
    if is_batchnorm(module):
        return _batchnorm_layout(node, source, analysis)
    if size_attributes(module) and getattr(module, "groups", 1) == 1:
        return _producer_layout(node, module, source, analysis, modules)
    if isinstance(module, PASSTHROUGH_MODULES) and len(node.args) == 1:
        return _passthrough(node, source, analysis,
                            unit_wise=isinstance(module, ELEMENTWISE_MODULES + MAX_POOL_MODULES),
                            pooling=isinstance(module, MAX_POOL_MODULES + AVG_POOL_MODULES))
    if isinstance(module, nn.Flatten):
        return _flatten_layout(node, source, analysis, module.start_dim, module.end_dim)
    _freeze_inputs(node, layouts, analysis, f"used by {type(module).__name__} {node.target}")
    return None


def _producer_layout(node, module, source, analysis, modules) -> Layout:
    shape = _shape(node)
    is_linear = channels_last(module)
    if source is not None:
        expected_axis = len(_shape(node.args[0])) - 1 if is_linear else 1
        if source.axis != expected_axis or (not is_linear and source.block != 1):
            analysis.freeze(source, f"{node.target} reads it along another axis")
        else:
            _add_consumer(node.target, source, analysis)
    width_id = analysis.new_width(node.target, shape[-1] if is_linear else shape[1])
    folded = only_batchnorm_user(node, modules)
    if folded is not None:
        analysis.folded[node.target] = folded
    return Layout(len(shape) - 1 if is_linear else 1, 1, ((width_id, shape[-1] if is_linear else shape[1]),))


def _add_consumer(name, layout, analysis) -> None:
    offset = 0
    for width_id, channels in layout.segments:
        if width_id is not None:
            analysis.consumers.append((width_id, Consumer(name, offset, layout.block)))
        offset += channels


def _batchnorm_layout(node, source, analysis) -> Layout | None:
    if source is None:
        return None
    if source.axis != 1 or source.block != 1:
        analysis.freeze(source, f"BatchNorm {node.target} normalises flattened features")
        return None
    offset = 0
    for width_id, channels in source.segments:
        if width_id is not None:
            analysis.batchnorms.append((width_id, ChannelMember(node.target, offset)))
        offset += channels
    analysis.mark_unit_wise(source)
    return source


def _passthrough(node, source, analysis, unit_wise, pooling) -> Layout | None:
    """An operation acting on each channel separately; pooling must see channels on axis 1."""
    if source is None:
        return None
    if pooling and (source.axis != 1 or source.block != 1):
        analysis.freeze(source, f"{node.name} pools along the channel axis")
        return None
    if unit_wise:
        analysis.mark_unit_wise(source)
    return source


def _flatten_layout(node, source, analysis, start_dim, end_dim) -> Layout | None:
    if source is None:
        return None
    in_shape = _shape(node.args[0])
    if start_dim != 1 or end_dim not in (-1, len(in_shape) - 1) or source.axis != 1:
        analysis.freeze(source, f"{node.name} flattens across the channel axis")
        return None
    spatial = 1
    for size in in_shape[2:]:
        spatial *= size
    return Layout(1, source.block * spatial, source.segments)


def _function_layout(node, layouts, analysis) -> Layout | None:
    target = node.target
    inputs = [n for n in _tensor_args(node) if _shape(n) is not None]
    tracked = [layouts.get(n) for n in inputs]
    if target in SHAPE_QUERIES or not any(tracked):
        return None
    if target in PASSTHROUGH_FUNCTIONS and len(inputs) == 1:
        return _passthrough(node, tracked[0], analysis,
                            unit_wise=target in ELEMENTWISE_FUNCTIONS | MAX_POOL_FUNCTIONS,
                            pooling=target in MAX_POOL_FUNCTIONS | AVG_POOL_FUNCTIONS)
    if target in SCALINGS and len(inputs) == 1:
        return tracked[0]
    if target in ADDITIONS and len(inputs) == 1:  # adding a constant: a per-channel shift
        return _passthrough(node, tracked[0], analysis, unit_wise=True, pooling=False)
    if target in ADDITIONS and len(inputs) == 2:
        return _addition_layout(node, inputs, tracked, analysis)
    if target in CONCATENATIONS:
        return _concatenation_layout(node, inputs, tracked, analysis)
    if target in RESHAPES:
        return _reshape_layout(node, inputs[0], tracked[0], analysis)
    _freeze_inputs(node, layouts, analysis, f"used by {getattr(target, '__name__', target)}")
    return None


def _tensor_args(node) -> list:
    found = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def _addition_layout(node, inputs, tracked, analysis) -> Layout | None:
    first, second = tracked
    if _shape(inputs[0]) != _shape(inputs[1]) or first is None or second is None \
            or (first.axis, first.block) != (second.axis, second.block) \
            or [c for _, c in first.segments] != [c for _, c in second.segments]:
        for layout in tracked:
            analysis.freeze(layout, f"{node.name} adds it to a tensor of another layout")
        return None
    for (a, _), (b, _) in zip(first.segments, second.segments):
        if (a is None) != (b is None):
            analysis.freeze(first, f"{node.name} adds it to untracked channels")
            analysis.freeze(second, f"{node.name} adds it to untracked channels")
        elif a is not None:
            analysis.tie(a, b)
    return first


def _concatenation_layout(node, inputs, tracked, analysis) -> Layout | None:
    ndim = len(_shape(node))
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) % ndim
    known = [layout for layout in tracked if layout is not None]
    if dim != 1 or any(layout.axis != 1 or layout.block != 1 for layout in known):
        for layout in known:
            analysis.freeze(layout, f"{node.name} concatenates along another axis")
        return None
    segments = []
    for tensor, layout in zip(inputs, tracked):
        segments.extend(layout.segments if layout else ((None, _shape(tensor)[1]),))
    return Layout(1, 1, tuple(segments))


def _reshape_layout(node, tensor, layout, analysis) -> Layout | None:
    """A reshape that only flattens ``(N, C, *spatial)`` into ``(N, C * S)``; else freeze."""
    in_shape, out_shape = _shape(tensor), _shape(node)
    if len(out_shape) == 2 and len(in_shape) > 2 and out_shape[0] == in_shape[0]:
        return _flatten_layout(node, layout, analysis, 1, -1)
    if tuple(in_shape) == tuple(out_shape):
        return layout
    analysis.freeze(layout, f"{node.name} reshapes it")
    return None

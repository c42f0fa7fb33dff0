"""Peers of rankwise for the side-by-side benchmark: one adapter per method, one signature.

``compress(method, model, reduction, calibration, evaluate)`` returns a `Compressed`: a new
network (eval mode, on the input model's device; the input model is left untouched) with about
``reduction`` of the whole network's learnables removed (counted with
`rankwise.count_learnables`), the wall-clock seconds of the compression (any search for the
budget included) and a note. Each method turns its one knob to hit the budget as closely as it
can, never exceeding it by more than 1% of the original learnables where that is reachable; the
note says when the result misses the budget by more than that either way (``closest reachable:
...``; the knob's steps can be coarse) and which layers were left dense.

Methods (`available_methods` says which are usable here, and why the others are not):

- ``svd``: data-free uniform truncated SVD of every Linear and Conv2d (`svd_baseline`), the
  rank fraction found by bisection (`svd_baseline.match_learnables`).
- ``tp-magnitude``, ``tp-activation``: Torch-Pruning 1.6.1 structured channel pruning,
  ``tp.pruner.BasePruner`` (``MetaPruner`` is its deprecated alias in 1.6.1) with global
  pruning, the final classifier layer ignored, ``MagnitudeImportance(p=2)`` or
  ``ActivationImportance``; bisection on ``pruning_ratio``. ``ActivationImportance`` records
  in a forward hook the mean absolute input of every Conv2d and Linear of *one* forward pass
  (each pass overwrites the last), so the calibration batches are concatenated and fed in one
  pass. Recurrent layers are refused (`NotImplementedError`): Torch-Pruning 1.6.1 has no pruner
  for ``nn.GRU`` (its hidden units are never pruned) and its ``nn.LSTM`` pruning fails.
- ``tltorch-cp``, ``tltorch-tucker``, ``tltorch-tt``: tensorly-torch 0.5.0,
  ``FactorizedConv.from_conv(conv, rank=f, factorization=..., implementation='factorized',
  decompose_weights=True)`` and ``FactorizedLinear.from_linear(linear, rank=f, ...)`` (its
  default tensorisation of the weight matrix into an order-6 tensor; for ``tt`` the linear
  layers use tensorly-torch's TT-matrix format ``blocktt``, as ``tt`` is not defined for
  tensorised matrices). ``f`` is tensorly-torch's float rank, the fraction of the layer's
  parameters kept, the same for every layer, found by bisection. Linear layers in CP and Tucker
  use ``implementation='reconstructed'``: the ``'factorized'`` contraction of a tensorised
  CP/Tucker matrix asks for gigabytes (14 GB for a 1568 x 512 layer at ``f = 0.1``). Layers
  whose factorisation would not be smaller (or cannot be built) stay dense. CP runs
  ``CP_ITERATIONS`` ALS iterations (tensorly's default 100 is far too slow at these ranks).
- ``aimet-spatial-svd``, ``aimet-weight-svd``: AIMET 2.42.0
  ``ModelCompressor.compress_model`` with ``CompressionScheme.spatial_svd`` / ``weight_svd``,
  ``CostMetric.memory`` and greedy per-layer ratio selection
  (``GreedySelectionParameters(target_comp_ratio, num_comp_ratio_candidates=10)``) scored by
  ``evaluate``. AIMET's memory cost counts the weights of the layers it can compress only, so
  ``target_comp_ratio`` starts at ``1 - reduction`` and is bisected (re-using the saved
  per-layer scores, so without new evaluations) while the whole network's learnables miss the
  budget by more than 1 point. AIMET runs in a temporary working folder (it writes
  ``./data/greedy_selection_eval_scores_dict.pkl``).

Pins: ``requirements-bench.txt`` (tensorly-torch, torch-pruning; installed ``--no-deps``) and
``requirements-bench-aimet.txt`` (installed together with the torch/torchvision/numpy pins).
"""

import contextlib
import copy
import functools
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import rankwise as rw
from svd_baseline import is_factorable, keeps_dense, layer_rank, match_learnables, svd_compress

TOLERANCE = 0.01
"""The budget may be exceeded by at most this fraction of the original learnables."""

GOOD_ENOUGH = 0.002
"""A search stops once the learnables are within this fraction of the original of the budget."""


@dataclass
class Compressed:
    model: nn.Module          # the compressed network, eval mode, same device as the input model, a new object
    seconds: float            # wall-clock of the compression itself (including any search for the budget)
    note: str = ""            # e.g. "closest reachable: 88.1% removed", "layers left dense: fc2"


def compress(method: str, model: nn.Module, reduction: float, calibration: list[torch.Tensor],
             evaluate: Callable[[nn.Module], float]) -> Compressed:
    """Compress `model` with peer `method`, removing about `reduction` of its learnables.

    Parameters
    ----------
    method : str
        A usable name of `available_methods`.
    model : torch.nn.Module
        The trained network; not modified.
    reduction : float
        Fraction of the whole network's learnables to remove, in (0, 1).
    calibration : list of torch.Tensor
        Input batches (for data-driven methods).
    evaluate : callable
        ``evaluate(model) -> accuracy`` on a validation set (AIMET's greedy selection).

    Returns
    -------
    Compressed

    Raises
    ------
    ValueError
        Unknown method.
    RuntimeError
        The method's package is not usable here (the reason from `available_methods`).
    NotImplementedError
        The method cannot handle this network (the reason in the message).
    """
    if method not in _ADAPTERS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(_ADAPTERS)}")
    reason = available_methods()[method]
    if reason:
        raise RuntimeError(f"{method} is not available: {reason}")
    original = rw.count_learnables(model)
    target = round((1 - reduction) * original)
    device = next(model.parameters()).device
    calibration = [batch.to(device) for batch in calibration]
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        compressed, notes = _ADAPTERS[method](model, target, calibration, evaluate)
        seconds = time.perf_counter() - start
    finally:
        model.train(was_training)
    compressed = compressed.to(device).eval()
    realised = rw.count_learnables(compressed)
    if abs(realised - target) > TOLERANCE * original:
        notes = [f"closest reachable: {1 - realised / original:.1%} removed", *notes]
    return Compressed(compressed, seconds, "; ".join(notes))


@functools.cache
def available_methods() -> dict[str, str]:
    """``name -> ""`` for usable methods, else the reason (e.g. the package is not installed)."""
    reasons = {"svd": ""}
    for methods, module, install in (
            (("tp-magnitude", "tp-activation"), "torch_pruning", "pip install --no-deps -r requirements-bench.txt"),
            (("tltorch-cp", "tltorch-tucker", "tltorch-tt"), "tltorch", "pip install --no-deps -r requirements-bench.txt"),
            (("aimet-spatial-svd", "aimet-weight-svd"), "aimet_torch.compress",
             "see requirements-bench-aimet.txt")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                __import__(module)
            reason = ""
        except ImportError as error:
            reason = f"{module.split('.')[0]} is not installed ({install}): {error}"
        except Exception as error:  # noqa: BLE001 - a broken install is a reason, not a crash
            reason = f"importing {module} fails: {type(error).__name__}: {error}"
        reasons.update(dict.fromkeys(methods, reason))
    return reasons


# Searching the one knob ----------------------------------------------------------------------

def _search(learnables_at, target, original, low, high, larger_removes_more, iterations=20):
    """Bisection on a knob in ``[low, high]`` for the learnables closest to `target`.

    ``learnables_at(knob) -> (learnables, payload)`` is monotone in the knob (non-increasing when
    `larger_removes_more`). Returns ``(knob, learnables, payload)`` of the candidate closest to
    `target` among those at most ``TOLERANCE * original`` above it, else the smallest one.
    """
    tried = []
    for _ in range(iterations):
        knob = (low + high) / 2
        learnables, payload = learnables_at(knob)
        tried.append((knob, learnables, payload))
        if abs(learnables - target) <= GOOD_ENOUGH * original:
            break
        if (learnables > target) == larger_removes_more:
            low = knob
        else:
            high = knob
    within = [t for t in tried if t[1] <= target + TOLERANCE * original]
    if within:
        return min(within, key=lambda t: abs(t[1] - target))
    return min(tried, key=lambda t: t[1])


# svd -----------------------------------------------------------------------------------------

def _svd(model, target, calibration, evaluate):
    fraction, _ = match_learnables(model, target)
    dense = [name for name, m in model.named_modules()
             if is_factorable(m) and keeps_dense(m, layer_rank(m, fraction))]
    notes = [f"rank fraction {fraction:.3f}"] + ([f"layers left dense: {', '.join(dense)}"] if dense else [])
    return svd_compress(model, fraction), notes


# Torch-Pruning -------------------------------------------------------------------------------

TP_RECURRENT_REASON = (
    "Torch-Pruning 1.6.1 cannot prune recurrent layers: it has no pruner for nn.GRU (the hidden "
    "units are never pruned, only the classifier's outputs could be) and pruning an nn.LSTM "
    "classifier fails inside its dependency graph (IndexError: index out of range in self)")


def _last_layer_name(model, example):
    """Name of the last Conv2d or Linear executed by a forward pass: the final classifier."""
    executed = []
    names = {m: n for n, m in model.named_modules()}
    handles = [m.register_forward_hook(lambda module, i, o: executed.append(names[module]))
               for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    with torch.no_grad():
        model(example)
    for handle in handles:
        handle.remove()
    return executed[-1]


def _torch_pruning(importance_kind):
    def adapter(model, target, calibration, evaluate):
        import torch_pruning as tp
        recurrent = [n for n, m in model.named_modules() if isinstance(m, nn.RNNBase)]
        if recurrent:
            raise NotImplementedError(f"{TP_RECURRENT_REASON} (recurrent layers: {', '.join(recurrent)})")
        original = rw.count_learnables(model)
        example = calibration[0][:1]
        base = copy.deepcopy(model).eval()
        final = _last_layer_name(base, example)
        if importance_kind == "activation":
            importance = tp.importance.ActivationImportance()
            with torch.no_grad(), importance.compute_importance(base):
                base(torch.cat(calibration))
        else:
            importance = tp.importance.MagnitudeImportance(p=2)

        def prune(ratio):
            pruned = copy.deepcopy(base)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pruner = tp.pruner.BasePruner(pruned, example, importance, global_pruning=True,
                                              pruning_ratio=ratio, ignored_layers=[pruned.get_submodule(final)])
                pruner.step()
            return rw.count_learnables(pruned), pruned

        ratio, _, pruned = _search(prune, target, original, 0.0, 0.99, larger_removes_more=True, iterations=16)
        for module in pruned.modules():
            if hasattr(module, "_importance"):
                del module._importance
        return pruned, [f"pruning ratio {ratio:.3f}", f"layer left whole: {final}"]
    return adapter


# tensorly-torch ------------------------------------------------------------------------------

def tltorch_factorization(layer, factorization):
    """tensorly-torch's name of `factorization` for `layer` (``tt`` is ``blocktt`` for Linear)."""
    return "blocktt" if factorization == "tt" and isinstance(layer, nn.Linear) else factorization


def tltorch_implementation(layer, factorization):
    """``'factorized'``, but ``'reconstructed'`` for CP and Tucker Linear (see the module docstring)."""
    return "reconstructed" if isinstance(layer, nn.Linear) and factorization in ("cp", "tucker") else "factorized"


CP_ITERATIONS = 10
"""ALS iterations of tensorly's ``parafac`` for CP (tensorly's default 100 takes 3 minutes for the
MNIST CNN's 1568 x 512 layer at ``f = 0.1`` alone, and grows with the rank)."""


def _decomposition_kwargs(factorization):
    return {"n_iter_max": CP_ITERATIONS} if factorization == "cp" else {}


def tltorch_layer(layer, rank, factorization, decompose=True, decomposition_kwargs=None):
    """tensorly-torch's factorised form of a Conv2d or Linear `layer`.

    ``FactorizedConv.from_conv(layer, rank, factorization, implementation='factorized',
    decompose_weights=True)`` or ``FactorizedLinear.from_linear(layer, rank, ...)``; with
    ``decompose=False`` an untrained layer of the same shape (for counting its learnables).
    `rank` is anything tensorly-torch accepts (a float is a fraction of the parameters);
    `decomposition_kwargs` go to tensorly's decomposition (its defaults when ``None``).
    """
    decomposition_kwargs = decomposition_kwargs or {}
    import tltorch
    implementation = tltorch_implementation(layer, factorization)
    factorization = tltorch_factorization(layer, factorization)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        if isinstance(layer, nn.Linear):
            if decompose:
                return tltorch.FactorizedLinear.from_linear(layer, rank=rank, factorization=factorization,
                                                            implementation=implementation,
                                                            bias=layer.bias is not None,
                                                            decomposition_kwargs=decomposition_kwargs)
            from tltorch.utils import get_tensorized_shape
            shape_in, shape_out = get_tensorized_shape(layer.in_features, layer.out_features, order=3,
                                                       min_dim=2, verbose=False)
            return tltorch.FactorizedLinear(shape_in, shape_out, bias=layer.bias is not None, rank=rank,
                                            factorization=factorization, implementation=implementation)
        if decompose:
            return tltorch.FactorizedConv.from_conv(layer, rank=rank, factorization=factorization,
                                                    implementation=implementation, decompose_weights=True,
                                                    decomposition_kwargs=decomposition_kwargs)
        return tltorch.FactorizedConv(layer.in_channels, layer.out_channels, layer.kernel_size,
                                      rank=rank, factorization=factorization, implementation=implementation,
                                      bias=layer.bias is not None, padding=layer.padding,
                                      stride=layer.stride[0], dilation=layer.dilation)


def _tltorch_candidates(model):
    """Conv2d (ungrouped, zero padding, square stride) and Linear layers tensorly-torch can take."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1
                                            and m.padding_mode == "zeros" and len(set(m.stride)) == 1)}


def _tltorch(factorization):
    def adapter(model, target, calibration, evaluate):
        original = rw.count_learnables(model)
        candidates = _tltorch_candidates(model)
        dense_sizes = {name: rw.count_learnables(m) for name, m in candidates.items()}
        elsewhere = original - sum(dense_sizes.values())

        def plan(fraction):
            """Learnables at `fraction`, and the layers factorised there."""
            chosen, total = [], elsewhere
            for name, layer in candidates.items():
                try:
                    size = rw.count_learnables(tltorch_layer(layer, fraction, factorization, decompose=False))
                except Exception:  # noqa: BLE001 - a layer tensorly-torch cannot factorise stays dense
                    size = dense_sizes[name]
                if size < dense_sizes[name]:
                    chosen.append(name)
                    total += size
                else:
                    total += dense_sizes[name]
            return total, chosen

        fraction, _, chosen = _search(plan, target, original, 0.0, 1.0, larger_removes_more=False, iterations=18)
        compressed = copy.deepcopy(model)
        for name in chosen:
            factorised = tltorch_layer(candidates[name], fraction, factorization,
                                       decomposition_kwargs=_decomposition_kwargs(factorization))
            compressed.set_submodule(name, factorised.to(candidates[name].weight.device))
        notes = [f"rank fraction {fraction:.3f}"]
        dense = [name for name in candidates if name not in chosen]
        if dense:
            notes.append(f"layers left dense: {', '.join(dense)}")
        if factorization in ("cp", "tucker") and any(isinstance(candidates[n], nn.Linear) for n in chosen):
            notes.append("Linear layers with implementation='reconstructed'")
        return compressed, notes
    return adapter


# AIMET ---------------------------------------------------------------------------------------

def _aimet(scheme):
    def adapter(model, target, calibration, evaluate):
        from aimet_torch.common.defs import (CompressionScheme, CostMetric, GreedySelectionParameters,
                                             RankSelectScheme)
        from aimet_torch.compress import ModelCompressor
        from aimet_torch.defs import SpatialSvdParameters, WeightSvdParameters
        if scheme == "spatial" and not any(isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1
                                           for m in model.modules()):
            raise NotImplementedError("AIMET spatial SVD factors convolutions with kernels larger than "
                                      "1x1 only, and this network has none")
        original = rw.count_learnables(model)
        input_shape = (1, *calibration[0].shape[1:])

        def eval_callback(candidate, iterations=None, use_cuda=False):
            return evaluate(candidate)

        def run(ratio, saved):
            greedy = GreedySelectionParameters(target_comp_ratio=ratio, num_comp_ratio_candidates=10,
                                               saved_eval_scores_dict=saved)
            if scheme == "spatial":
                params = SpatialSvdParameters(SpatialSvdParameters.Mode.auto,
                                              SpatialSvdParameters.AutoModeParams(greedy))
                kind = CompressionScheme.spatial_svd
            else:
                params = WeightSvdParameters(WeightSvdParameters.Mode.auto,
                                             WeightSvdParameters.AutoModeParams(RankSelectScheme.greedy, greedy))
                kind = CompressionScheme.weight_svd
            compressed, _ = ModelCompressor.compress_model(copy.deepcopy(model), eval_callback, 1, input_shape,
                                                           kind, CostMetric.memory, params)
            return compressed

        target_fraction = target / original
        ratio, saved, best, low, high = target_fraction, None, None, 0.0, 1.0
        with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder):
            for _ in range(8):
                compressed = run(ratio, saved)
                saved = os.path.join(folder, "data", "greedy_selection_eval_scores_dict.pkl")
                realised = rw.count_learnables(compressed) / original
                if best is None or abs(realised - target_fraction) < abs(best[1] - target_fraction):
                    best = (ratio, realised, compressed)
                if abs(realised - target_fraction) <= TOLERANCE:
                    break
                if realised < target_fraction:
                    low = ratio
                else:
                    high = ratio
                ratio = (low + high) / 2
        ratio, realised, compressed = best
        return compressed, [f"target_comp_ratio {ratio:.3f}"]
    return adapter


_ADAPTERS = {
    "svd": _svd,
    "tp-magnitude": _torch_pruning("magnitude"),
    "tp-activation": _torch_pruning("activation"),
    "tltorch-cp": _tltorch("cp"),
    "tltorch-tucker": _tltorch("tucker"),
    "tltorch-tt": _tltorch("tt"),
    "aimet-spatial-svd": _aimet("spatial"),
    "aimet-weight-svd": _aimet("weight"),
}

"""Recurrent layers: the explained variance of the output sequence, measured through the recurrence.

The residual of a recurrent option (:mod:`rankwise.ranks.frontier`) is the fraction of the gate
pre-activation variance it loses in **one** step, with the original's inputs and hidden states.
It does not bound the error of the output sequence: the projected layer's ``h'_t`` feeds its
own next step, so the error ``e_t = h_t - h'_t`` follows, to first order,

    e_{t+1} ~ J_t e_t + d_t,        J_t = d h_{t+1} / d h_t,

with ``d_t`` the error added in step ``t``, hence ``e_T ~ sum_s (J_{T-1} ... J_{s+1}) d_s``.
Along the directions the recurrence remembers (``|J|`` near 1, what a trained LSTM or GRU keeps
for its memory), the errors of all steps add up instead of decaying; a stacked layer then reads
its predecessor's erroneous output. ``J_t`` depends on the data and on how saturated the gates
are, so no function of the per-step moments bounds ``E |e_t|^2``: it is measured. On the
reservoir of calibration sequences (the first ones the layer saw,
:mod:`rankwise.statistics.recurrent`), the original layer and the projected one are run (eval
mode, zero initial states) and

    EV_seq = 1 - sum_{i,t} |h_{i,t} - h'_{i,t}|^2 / sum_{i,t} |h_{i,t} - mean h|^2

is taken over every time step of every sequence of the last stacked layer's output (both
directions of a bidirectional layer, ``D H`` wide).

- ``explained_variance_goal = g``: the variance choice ``i0`` (cheapest option with
  ``res <= 1 - g``) is measured; while ``EV_seq(i0) < g``, the layer moves along its frontier
  toward more learnables, by bisection over the frontier's indices ``(i0, dense]``: the dense
  option reproduces the layer (``EV_seq = 1``), so the upper end always passes, and bisection
  returns the first index of a failing-then-passing pair, an option measured to reach ``g`` (or
  the dense layer). The frontier's estimated error falls with its index, so ``EV_seq`` mostly
  rises with it; where it does not, bisection still returns a measured pass, perhaps not the
  cheapest. The choice is never cheaper than the variance choice. Cost: ``1 + ceil(log2 m)`` runs
  of a projected layer on the reservoir, ``m`` the frontier's length past ``i0``.
- ``learnables_reduction_goal``: the global allocation is left as it is (its errors stay the
  per-step estimates, comparable across layers); the measured ``EV_seq`` of the chosen option is
  reported in the info.

A NeuronPCA without reservoir (loaded from a file written before it was kept) cannot be
measured: the variance choice stands and a warning says so.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

from rankwise.batches import eval_mode
from rankwise.goals import Goal
from rankwise.kinds import kind_of
from rankwise.layers.build import project_layer
from rankwise.ranks.options import LayerOptions, RankChoice


@torch.no_grad()
def sequence_explained_variance(original: nn.Module, projected: nn.Module, sequences: list) -> float:
    """``1 - sum |h - h'|^2 / sum |h - mean h|^2`` over every output step of both layers.

    Parameters
    ----------
    original, projected : torch.nn.Module
        An ``nn.LSTM`` / ``nn.GRU`` and a module called like it (its projected form).
    sequences : list of torch.Tensor
        Input sequences, ``(T_i, input_size)`` each; run as one ``PackedSequence``, in eval mode,
        from zero initial states, on ``original``'s device and dtype.

    Returns
    -------
    float
        1 when the two outputs agree; 1 as well when the output does not vary at all.
    """
    weight = next(original.parameters())
    packed = pack_sequence([s.to(weight.device, weight.dtype) for s in sequences], enforce_sorted=False)
    with eval_mode(original), eval_mode(projected):
        h, h_projected = original(packed)[0].data, projected(packed)[0].data
    h, h_projected = h.double(), h_projected.double()
    total = float(((h - h.mean(0)) ** 2).sum())
    lost = float(((h - h_projected) ** 2).sum())
    return 1.0 if total == 0 else 1.0 - lost / total


class SequenceBound:
    """Measured output-sequence explained variance of the recurrent layers' choices (see the
    module docstring), applied to the choices of one goal.

    Parameters
    ----------
    layers : dict of str to torch.nn.Module
        The analysed dense layers, by name (only the recurrent ones are measured).
    options : dict of str to LayerOptions
        Their frontiers.
    npca : NeuronPCA
        Their statistics; a recurrent layer's reservoir is read from them.
    goal : Goal

    Attributes
    ----------
    warnings : list of str
        One message per recurrent layer that could not be measured under an explained variance
        goal (no reservoir); each was also issued as a ``UserWarning`` by the caller.
    """

    def __init__(self, layers: dict, options: dict[str, LayerOptions], npca, goal: Goal):
        self.layers, self.options, self.goal = layers, options, goal
        self.reservoirs = {name: npca.statistics(name).reservoir for name, layer in layers.items()
                           if kind_of(layer).traits.sequences}
        self.warnings = [_unmeasured_message(name) for name, reservoir in self.reservoirs.items()
                         if not reservoir and not goal.is_budget]
        self._measured: dict[tuple[str, int], float] = {}

    def __call__(self, choices: dict[str, RankChoice]) -> dict[str, RankChoice]:
        """``choices`` with every measurable recurrent layer's choice bounded and measured."""
        return {name: self._bounded(name, choice) if self.reservoirs.get(name) else choice
                for name, choice in choices.items()}

    def _bounded(self, name: str, choice: RankChoice) -> RankChoice:
        opts = self.options[name]
        index = _index_of(opts, choice)
        if not self.goal.is_budget and self._measure(name, index) < self.goal.value:
            index = self._first_reaching(name, index)
        return dataclasses.replace(opts.choice(index), measured_explained_variance=self._measure(name, index))

    def _first_reaching(self, name: str, failing: int) -> int:
        """Bisection over ``(failing, dense]`` for an index measured to reach the goal."""
        passing = self.options[name].dense_index
        while passing - failing > 1:
            middle = (failing + passing) // 2
            if self._measure(name, middle) >= self.goal.value:
                passing = middle
            else:
                failing = middle
        return passing

    def _measure(self, name: str, index: int) -> float:
        opts = self.options[name]
        if index == opts.dense_index:
            return 1.0
        if (name, index) not in self._measured:
            projected = project_layer(self.layers[name], opts, opts.choice(index))
            self._measured[(name, index)] = sequence_explained_variance(self.layers[name], projected,
                                                                        self.reservoirs[name])
        return self._measured[(name, index)]


def _index_of(opts: LayerOptions, choice: RankChoice) -> int:
    """The frontier index of ``choice`` (a frontier's learnables are strictly ascending)."""
    return int(np.searchsorted(opts.learnables, choice.learnables))


def _unmeasured_message(name: str) -> str:
    return (f"layer {name!r}: the NeuronPCA holds no calibration sequences for this LSTM/GRU (it was "
            "loaded from a file written before rankwise kept them), so its explained variance goal "
            "bounds the gate variance lost per time step only, not the error of its output sequence, "
            "which can be much larger; recompute the NeuronPCA on the calibration data to bound it")

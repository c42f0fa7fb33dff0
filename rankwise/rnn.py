"""Anatomy of torch's recurrent layers, and running them on given weights.

An ``nn.LSTM`` or ``nn.GRU`` of ``L`` stacked layers and ``D`` directions (``D = 2`` when
bidirectional) holds ``L D`` *cells*, named like torch's parameter suffixes: ``l0``,
``l0_reverse``, ``l1``, ... Cell ``(l, d)`` has input weights ``W_ih`` (``G H x D_l``), recurrent
weights ``W_hh`` (``G H x H``) and biases ``b_ih``, ``b_hh`` (``G = 4`` gates for an LSTM, 3 for
a GRU, ``H`` hidden units). It reads the sequence ``x_t`` of its stacked layer (the module's
input for ``l = 0``, else the outputs ``h_t`` of both directions of layer ``l - 1``,
concatenated: ``D_l = D H``) and its own previous hidden state ``h_{t-1}``; every gate is a
nonlinearity of the pre-activations ``W_ih x_t + b_ih`` and ``W_hh h_{t-1} + b_hh``.

:func:`normalise` turns the arguments of a call into the batched form torch's fused kernels
take (padded tensor or the rows of a ``PackedSequence``, initial states of every cell),
checking them with clear errors; :func:`fused` runs the kernel on any flat weight list, so a
single stacked layer of a module can be run on its own (:func:`run_layer`: the inputs of the
inner layers are not visible to a hook on the module).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import _VF, nn
from torch.nn.utils.rnn import PackedSequence

from rankwise.kinds import is_fused_recurrence

GATES = {"lstm": 4, "gru": 3}
"""Gates per kind: an LSTM's ``i, f, g, o``, a GRU's ``r, z, n`` (torch's row order)."""


def fused_gates(module: nn.Module) -> int:
    """Gates ``G`` of one of torch's recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``), read
    from its weights (``W_ih`` holds ``G H`` rows: 4 for an LSTM, 3 for a GRU, 1 for a plain
    RNN); 0 for any other module."""
    return module.weight_ih_l0.shape[0] // module.hidden_size if is_fused_recurrence(module) else 0


def cell_names(num_layers: int, bidirectional: bool) -> list[str]:
    """``["l0", "l0_reverse", "l1", ...]``: the cells in torch's order (layer, then direction)."""
    suffixes = ("", "_reverse") if bidirectional else ("",)
    return [f"l{layer}{suffix}" for layer in range(num_layers) for suffix in suffixes]


def cell_input_sizes(module) -> list[int]:
    """``D_l`` of each cell of ``module`` (anything with ``nn.LSTM``'s size attributes), in order."""
    directions = 2 if module.bidirectional else 1
    return [module.input_size if index < directions else module.hidden_size * directions
            for index in range(module.num_layers * directions)]


def cell_weights(module: nn.Module, cell: str) -> list[torch.Tensor]:
    """``[W_ih, W_hh, b_ih, b_hh]`` of a cell of an ``nn.LSTM`` / ``nn.GRU`` (biases if it has any)."""
    names = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if module.bias else ())
    return [getattr(module, f"{name}_{cell}") for name in names]


@dataclass
class RecurrentCall:
    """One call of a recurrent layer, normalised as ``nn.LSTM.forward`` does it.

    Attributes
    ----------
    input : torch.Tensor
        Batched: a padded ``(T, N, D)`` tensor (``(N, T, D)`` when ``batch_first``) or the
        ``(sum_t b_t, D)`` time-major rows of a ``PackedSequence``.
    hx : tuple of torch.Tensor
        Initial states of every cell, ``(L D, N, H)`` each, in the batch order of ``input``:
        ``(h_0, c_0)`` for an LSTM, ``(h_0,)`` for a GRU.
    batch_first : bool
    batch_sizes, sorted_indices, unsorted_indices : torch.Tensor or None
        Those of a ``PackedSequence`` input; ``None`` for a padded one.
    unbatched : bool
        The input was one ``(T, D)`` sequence.
    """

    input: torch.Tensor
    hx: tuple
    batch_first: bool
    batch_sizes: torch.Tensor | None = None
    sorted_indices: torch.Tensor | None = None
    unsorted_indices: torch.Tensor | None = None
    unbatched: bool = False

    def states(self, first: int, stop: int) -> tuple:
        """The initial states of cells ``first:stop``."""
        return tuple(state[first:stop] for state in self.hx)

    def steps(self, sequence: torch.Tensor) -> list[torch.Tensor]:
        """The rows of each time step of ``sequence`` (laid out like ``input``)."""
        if self.batch_sizes is not None:
            return list(sequence.split(self.batch_sizes.tolist()))
        return list(sequence.unbind(1 if self.batch_first else 0))

    def join(self, steps: list[torch.Tensor]) -> torch.Tensor:
        """The inverse of :meth:`steps`."""
        if self.batch_sizes is not None:
            return torch.cat(steps)
        return torch.stack(steps, 1 if self.batch_first else 0)

    def finish(self, output: torch.Tensor, state: tuple):
        """``(output, h_n)`` or ``(output, (h_n, c_n))`` in the caller's form."""
        if self.batch_sizes is not None:
            output = PackedSequence(output, self.batch_sizes, self.sorted_indices, self.unsorted_indices)
            state = _permute(state, self.unsorted_indices)
        elif self.unbatched:
            output = output.squeeze(0 if self.batch_first else 1)
            state = tuple(s.squeeze(1) for s in state)
        return output, (state if len(state) == 2 else state[0])


def normalise(kind: str, layer: nn.Module, input, hx=None) -> RecurrentCall:
    """Check and normalise the arguments of ``layer(input, hx)``.

    ``layer`` is anything with the attributes ``input_size``, ``hidden_size``, ``num_layers``,
    ``bidirectional`` and ``batch_first`` (an ``nn.LSTM``, ``nn.GRU`` or their projected
    wrappers). Missing initial states are zeros; packed initial states are put in the sorted
    batch order, as torch does.

    Raises
    ------
    ValueError
        For an input that is not 2-D or 3-D, has the wrong number of features, or initial
        states of the wrong shape.
    """
    packed = isinstance(input, PackedSequence)
    data = input.data if packed else input
    if not isinstance(data, torch.Tensor) or data.dim() not in ((2,) if packed else (2, 3)):
        shape = f"a {data.dim()}-D tensor" if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"input: expected a 3-D batch of sequences, a 2-D unbatched sequence or a "
                         f"PackedSequence, got {shape}.")
    if data.shape[-1] != layer.input_size:
        raise ValueError(f"input: expected {layer.input_size} features in its last dimension "
                         f"(input_size), got {data.shape[-1]}.")
    unbatched = not packed and data.dim() == 2
    if unbatched:
        data = data.unsqueeze(0 if layer.batch_first else 1)
    batch = int(input.batch_sizes[0]) if packed else data.shape[0 if layer.batch_first else 1]
    states = _initial_states(kind, layer, hx, batch, unbatched, data)
    if packed:
        return RecurrentCall(data, _permute(states, input.sorted_indices), layer.batch_first,
                             input.batch_sizes, input.sorted_indices, input.unsorted_indices)
    return RecurrentCall(data, states, layer.batch_first, unbatched=unbatched)


def _initial_states(kind, layer, hx, batch: int, unbatched: bool, like: torch.Tensor) -> tuple:
    cells = layer.num_layers * (2 if layer.bidirectional else 1)
    expected = (cells, batch, layer.hidden_size)
    count = 2 if kind == "lstm" else 1
    if hx is None:
        return tuple(like.new_zeros(expected) for _ in range(count))
    states = tuple(hx) if kind == "lstm" else (hx,)
    if len(states) != count or not all(isinstance(s, torch.Tensor) for s in states):
        raise ValueError("hx: expected a pair of tensors (h_0, c_0) for an LSTM." if kind == "lstm"
                         else "hx: expected a tensor h_0 for a GRU.")
    shown = (cells, layer.hidden_size) if unbatched else expected
    for state in states:
        if tuple(state.shape) != shown:
            raise ValueError(f"hx: expected initial states of shape {shown} (layers x directions, "
                             f"{'' if unbatched else 'batch, '}hidden_size), got {tuple(state.shape)}.")
    return tuple(s.unsqueeze(1) for s in states) if unbatched else states


def _permute(states: tuple, permutation: torch.Tensor | None) -> tuple:
    if permutation is None:
        return states
    return tuple(s.index_select(1, permutation) for s in states)


def fused(kind: str, call: RecurrentCall, sequence: torch.Tensor, states: tuple, weights: list,
          *, has_biases: bool, num_layers: int, dropout: float, training: bool,
          bidirectional: bool) -> tuple[torch.Tensor, tuple]:
    """torch's fused kernel (``_VF.lstm`` / ``_VF.gru``, as ``nn.LSTM`` calls it) on given weights.

    Parameters
    ----------
    kind : {"lstm", "gru"}
    call : RecurrentCall
        Gives the layout (padded or packed) of ``sequence``.
    sequence : torch.Tensor
        Input of the first of the ``num_layers`` layers run, laid out like ``call.input``.
    states : tuple of torch.Tensor
        Their initial states, ``(num_layers D, N, H)`` each.
    weights : list of torch.Tensor
        ``[W_ih, W_hh, b_ih, b_hh]`` (no biases unless ``has_biases``) of every cell run, in
        torch's cell order.

    Returns
    -------
    output : torch.Tensor
        Hidden states of the last layer run, laid out like ``sequence``.
    state : tuple of torch.Tensor
        Final states of every cell run.
    """
    kernel = _VF.lstm if kind == "lstm" else _VF.gru
    hx = list(states) if kind == "lstm" else states[0]
    flags = (has_biases, num_layers, dropout, training, bidirectional)
    if call.batch_sizes is None:
        output, *state = kernel(sequence, hx, weights, *flags, call.batch_first)
    else:
        output, *state = kernel(sequence, call.batch_sizes, hx, weights, *flags)
    return output, tuple(state)


def run_layer(kind: str, module: nn.Module, call: RecurrentCall, sequence: torch.Tensor,
              layer: int) -> torch.Tensor:
    """Output sequence of stacked layer ``layer`` of ``module`` (in eval mode) for its input."""
    directions = 2 if module.bidirectional else 1
    first, stop = layer * directions, (layer + 1) * directions
    cells = cell_names(module.num_layers, module.bidirectional)[first:stop]
    weights = [w for cell in cells for w in cell_weights(module, cell)]
    output, _ = fused(kind, call, sequence, call.states(first, stop), weights, has_biases=module.bias,
                      num_layers=1, dropout=0.0, training=False, bidirectional=module.bidirectional)
    return output

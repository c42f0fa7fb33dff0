"""ProjectedGRU: ``nn.GRU`` projected on its input and hidden state (see :mod:`rankwise.layers.recurrent`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.layers.recurrent import ProjectedRecurrent


class ProjectedGRU(ProjectedRecurrent):
    """A projected ``nn.GRU`` (MATLAB's ``gruProjectedLayer``); see :mod:`rankwise.layers.recurrent`.

    ``r, z = sigma(W_ir x + b_ir + W_hr h + b_hr), sigma(W_iz x + b_iz + W_hz h + b_hz)``,
    ``n = tanh(W_in x + b_in + r (W_hn h + b_hn))``, ``h_t = (1 - z) n + z h_{t-1}``, with ``W_ih``
    and ``W_hh`` acting through their projections.
    """

    kind = "gru"
    dense_type = nn.GRU

    def _input_gates(self, cell, sequence):
        bias = self.core[f"bias_ih_{cell}"] if self.bias else None
        return F.linear(self._project_input(cell, sequence), self.core[f"weight_ih_{cell}"], bias)

    def _recurrent(self, cell):
        """``h -> W_hh Q_out Q_out^T h + b_hh`` (kept apart: ``b_hn`` sits inside ``r (...)``)."""
        product, bias = super()._recurrent(cell), self.core[f"bias_hh_{cell}"] if self.bias else None
        return lambda h: product(h, bias)

    @staticmethod
    def _step(gates, state, recurrent):
        (h,) = state
        x_r, x_z, x_n = gates.chunk(3, 1)
        h_r, h_z, h_n = recurrent(h).chunk(3, 1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        return (torch.lerp(torch.tanh(x_n + r * h_n), h, z),)

"""ProjectedLSTM: ``nn.LSTM`` projected on its input and hidden state (see :mod:`rankwise.layers.recurrent`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.layers.recurrent import ProjectedRecurrent


class ProjectedLSTM(ProjectedRecurrent):
    """A projected ``nn.LSTM`` (MATLAB's ``lstmProjectedLayer``); see :mod:`rankwise.layers.recurrent`.

    Gates ``i, f, g, o = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh`` (split in four),
    ``c_t = sigma(f) c_{t-1} + sigma(i) tanh(g)``, ``h_t = sigma(o) tanh(c_t)``, with ``W_ih`` and
    ``W_hh`` acting through their projections.
    """

    kind = "lstm"
    dense_type = nn.LSTM

    def _input_gates(self, cell, sequence):
        bias = self.core[f"bias_ih_{cell}"] + self.core[f"bias_hh_{cell}"] if self.bias else None
        return F.linear(self._project_input(cell, sequence), self.core[f"weight_ih_{cell}"], bias)

    @staticmethod
    def _step(gates, state, recurrent):
        h, c = state
        i, f, g, o = recurrent(h, gates).chunk(4, 1)
        c = torch.addcmul(torch.sigmoid(f) * c, torch.sigmoid(i), torch.tanh(g))
        return torch.sigmoid(o) * torch.tanh(c), c

"""Data-aware truncation: judge a kernel's error by what it does to the layer's output.

For inputs with channel mean ``mu`` and channel covariance ``C`` (from
:class:`~rankwise.NeuronPCA`), the output error of a kernel error ``D = W - W'`` at one position
is ``e = sum_k D_k x_{p+k}`` over the kernel taps ``k`` (``D_k`` the ``O x I`` slice). Its mean
``sum_k D_k mu`` is the same at every position, so it is folded into the bias,
``b' = b + sum_k D_k mu`` (exact away from zero padding). Neglecting the correlation between
different taps (as :mod:`rankwise.ranks` does), its variance is

.. math:: E|e - E e|^2 \\approx \\sum_k \\operatorname{tr}(D_k C D_k^T)
          = \\| D \\times_i C^{1/2} \\|^2 .

So the kernel is truncated in whitened input coordinates: ``W~ = W x_i S`` with
``S = (C + delta I)^{1/2}``, any method truncates ``W~`` (``norm_retained`` then refers to the
norm of ``W~``, the output's estimated power), and the input leg is mapped back with
``S^{-1}``. The ridge ``delta = DAMPING * tr(C) / I`` (as GPTQ damps its Hessian) bounds
``S^{-1}``: without it a channel the calibration data never moved would get an arbitrary
kernel. At full rank ``W' = W``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankwise.pca import NeuronPCA

DAMPING = 0.01


@dataclass(frozen=True)
class InputWeighting:
    """The input statistics of one layer as used for data-aware truncation (float64).

    Attributes
    ----------
    root : torch.Tensor
        ``S = (C + delta I)^{1/2}``, ``I x I``.
    inverse_root : torch.Tensor
        ``S^{-1}``.
    covariance : torch.Tensor
        ``C``, to estimate the output error.
    mean : torch.Tensor
        ``mu``, ``(I,)``.
    """

    root: torch.Tensor
    inverse_root: torch.Tensor
    covariance: torch.Tensor
    mean: torch.Tensor

    def output_power(self, kernel: torch.Tensor) -> float:
        """``sum_k tr(K_k C K_k^T)``: the output variance of ``kernel`` (taps independent)."""
        slices = kernel.reshape(kernel.shape[0], kernel.shape[1], -1)
        return float(torch.einsum("oik,ij,ojk->", slices, self.covariance, slices))


def calibration_statistics(calibration, model, layers: dict) -> NeuronPCA:
    """``calibration`` itself when it is a NeuronPCA covering ``layers``, else one computed from it.

    Raises
    ------
    ValueError
        Naming ``calibration``, when a NeuronPCA lacks a layer or has other shapes.
    """
    if not isinstance(calibration, NeuronPCA):
        return NeuronPCA(model, calibration, layer_names=list(layers), verbosity="off", loss_fn=None,
                         validation=None)
    for name, layer in layers.items():
        if name not in calibration.layer_names:
            raise ValueError(f"calibration: the NeuronPCA has no statistics for layer {name!r} (it "
                             f"analysed: {', '.join(calibration.layer_names)}). Compute it with that "
                             "layer included, or pass layer_names to truncate fewer layers.")
        if calibration.statistics(name).in_channels != layer.weight.shape[1]:
            raise ValueError(f"calibration: layer {name!r} has {layer.weight.shape[1]} input channels "
                             "in the model but not in the NeuronPCA; it was computed on another model.")
    return calibration


def input_weighting(npca: NeuronPCA, name: str) -> InputWeighting:
    """The whitening of layer ``name``'s input channels (see the module docstring)."""
    moments = npca.statistics(name).input
    covariance = moments.covariance
    values, vectors = torch.linalg.eigh(covariance)
    ridge = DAMPING * covariance.trace() / len(covariance)
    roots = (values.clamp_min(0) + ridge).sqrt()
    return InputWeighting((vectors * roots) @ vectors.T, (vectors / roots) @ vectors.T,
                          covariance, moments.mean)

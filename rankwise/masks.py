"""Token masks: padding positions of a padded batch never enter a statistic.

A padded batch of ``N`` sequences of at most ``T`` tokens comes with an ``(N, T)`` mask,
``1`` for a token and ``0`` for padding (a Hugging Face batch's ``attention_mask``). While a mask
is active, every statistic keeps only the rows of real tokens: a hooked activation whose
channels are last (a ``Linear``'s, an ``Embedding``'s, its looked-up token ids) and whose
leading dimensions are the mask's, ``x`` of shape ``(N, T, ..., d)``, contributes the rows
``x[mask]``, so that its moments are

    n = sum_{i,t} m_it,    s = sum_{i,t} m_it x_it,    S = sum_{i,t} m_it x_it x_it^T,

exactly those of the ``N`` sequences run one at a time. The rule, for an activation of ``k =
mask.dim()`` leading dimensions or more:

- leading dimensions ``(N, T)``: the rows of real tokens are kept;
- leading dimensions ``(1, T)`` (an activation shared by the whole batch, such as BERT's
  position embeddings, looked up once for positions ``0..T-1``): it is expanded over the
  batch first, so each position counts once per sequence that reaches it;
- anything else is taken whole: an activation without token dimensions (a pooled ``(N, d)``
  head), a convolution's (channels on axis 1), or a sequence of another length (a decoder's).

Recurrent layers keep their own convention: give them ``PackedSequence`` batches (their hooks do
not read the mask).

Where the mask comes from: :func:`rankwise.batches.run_batch` makes a dict batch's
``attention_mask`` the active mask while the batch runs; a ``forward_fn`` whose batches are of
another form enters :func:`token_mask` around its model call::

    def forward_fn(model, batch):
        ids, mask = batch
        with rw.token_mask(mask):
            return model(input_ids=ids, attention_mask=mask)

A mask is bound to the calls made while it is active: each hook reads it when its layer runs
(the gradient statistics keep it with the layer's output until the backward pass). A mask
that matched none of the activations with token dimensions that the hooks saw is a mistake
(a transposed mask, the mask of another batch) and raises a ``ValueError`` when its scope ends.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch

__all__ = ["TokenMask", "TokenMaskError", "active_mask", "masking", "token_mask", "token_rows"]

_ACTIVE: contextvars.ContextVar["TokenMask | None"] = contextvars.ContextVar("token_mask", default=None)


class TokenMaskError(ValueError):
    """A token mask that does not fit the activations it was meant for."""


@dataclass
class TokenMask:
    """An active ``(N, T)`` token mask and what it met: how many activations it selected rows
    of, and the shapes of those with token dimensions that it did not fit."""

    mask: torch.Tensor
    argument: str
    complete: bool
    selected: int = 0
    unfitted: list = field(default_factory=list)

    @classmethod
    def of(cls, mask, argument: str) -> "TokenMask":
        """``mask`` checked (a tensor of 0/1 or bools, one dimension at least) and made boolean;
        ``argument`` names it in the errors."""
        if not isinstance(mask, torch.Tensor) or mask.dim() == 0:
            raise TokenMaskError(f"{argument}: expected a tensor of shape (batch, tokens), 1 for a token "
                                 f"and 0 for padding, got {_described(mask)}.")
        flags = mask.bool()
        if not torch.equal(flags.to(mask.dtype), mask):
            raise TokenMaskError(f"{argument}: a token mask holds 1 for a token and 0 for padding, got "
                                 f"other values (an additive or 4-d attention mask?); give the (batch, "
                                 f"tokens) mask of 0 and 1.")
        return cls(flags, argument, bool(flags.all()))

    def fits(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` (channels last) has the mask's token dimensions first: ``(N, T, ...)``
        or ``(1, T, ...)``, with at least one dimension after them."""
        k = self.mask.dim()
        if tensor.dim() <= k:
            return False
        shared = k > 1 and tensor.shape[0] == 1
        fitting = (shared or tensor.shape[0] == self.mask.shape[0]) and tensor.shape[1:k] == self.mask.shape[1:]
        if not fitting:
            self.unfitted.append(tuple(tensor.shape))
        return fitting

    def exact(self, tensor: torch.Tensor) -> "TokenMask | None":
        """This mask if ``tensor``'s leading dimensions are exactly ``(N, T)``, else ``None``: a
        gradient of an activation shared by the batch is summed over it, one row per position."""
        return self if tuple(tensor.shape[:self.mask.dim()]) == tuple(self.mask.shape) else None

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(m, ...)``: the entries of ``tensor`` (which :meth:`fits`) at real tokens."""
        self.selected += 1
        shape = (*self.mask.shape, *tensor.shape[self.mask.dim():])
        if self.complete:
            return tensor.expand(shape).reshape(-1, *shape[self.mask.dim():])
        return tensor.expand(shape)[self.mask.to(tensor.device)]

    def check_met(self) -> None:
        """Raise unless the mask selected rows somewhere, or met no activation with token dims."""
        if self.selected == 0 and self.unfitted:
            shapes = ", ".join(str(s) for s in dict.fromkeys(self.unfitted[:8]))
            raise TokenMaskError(
                f"{self.argument}: the token mask of shape {tuple(self.mask.shape)} fits none of the "
                f"activations the hooks saw (shapes {shapes}); give the (batch, tokens) mask of the "
                "batch the model runs, 1 for a token and 0 for padding. If the analysed layers do not "
                "run on these tokens, calibrate without a mask: a forward_fn that enters "
                "rw.token_mask(None) around its model call.")


@contextlib.contextmanager
def masking(mask, argument: str):
    """:func:`token_mask`, with the name its errors give the mask (``"attention_mask"``...)."""
    active = None if mask is None else TokenMask.of(mask, argument)
    token = _ACTIVE.set(active)
    try:
        yield active
    finally:
        _ACTIVE.reset(token)
    if active is not None:
        active.check_met()


def token_mask(mask: torch.Tensor):
    """Context manager: padding positions of the calls inside it never enter rankwise's statistics.

    For a ``forward_fn`` whose batches are not dicts carrying ``attention_mask`` (a dict batch's
    mask is applied without it, whatever the ``forward_fn``); see :mod:`rankwise.masks` for the
    rule::

        with rw.token_mask(attention_mask):
            outputs = model(input_ids, attention_mask=attention_mask)

    Parameters
    ----------
    mask : torch.Tensor or None
        ``(N, T)``, ``1`` (or ``True``) for a token and ``0`` for padding, on any device;
        ``None``: no mask inside the block (every position counts, the batch's mask aside).

    Raises
    ------
    ValueError
        When ``mask`` is not a tensor of 0 and 1, or (when the scope ends) fits none of the
        activations with token dimensions that the hooks saw.
    """
    return masking(mask, "mask")


def active_mask() -> TokenMask | None:
    """The innermost active token mask, ``None`` outside every :func:`token_mask`."""
    return _ACTIVE.get()


def token_rows(tensor: torch.Tensor, mask: TokenMask | None) -> torch.Tensor:
    """``tensor`` (channels last) at the real tokens of ``mask`` as ``(m, ...)``, or whole.

    The rows ``x[mask]`` of the module docstring when ``tensor`` has the mask's token
    dimensions first; ``tensor`` itself otherwise (no mask, or no token dimensions).
    """
    return mask.rows(tensor) if mask is not None and mask.fits(tensor) else tensor


def _described(value) -> str:
    return f"a {value.dim()}-d tensor" if isinstance(value, torch.Tensor) else type(value).__name__


def channel_rows(tensor: torch.Tensor, layer, mask: TokenMask | None = None) -> torch.Tensor:
    """``(rows, channels)``: the channel vectors of an activation (or gradient) of ``layer``.

    A ``Linear`` (2-d weight) has its channels last and every leading position is a row, but
    for the padding positions of ``mask`` (:func:`rankwise.masks.token_rows`); a convolution has
    them on axis 1 (axis 0 unbatched) and every spatial position is a row (a mask is not read).
    """
    if layer.weight.dim() == 2:
        return token_rows(tensor, mask).reshape(-1, tensor.shape[-1])
    channel_dim = 1 if tensor.dim() == layer.weight.dim() else 0  # batched or unbatched
    return tensor.movedim(channel_dim, -1).reshape(-1, tensor.shape[channel_dim])

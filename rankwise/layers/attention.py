"""ProjectedMultiheadAttention: an ``nn.MultiheadAttention`` whose key, value and output
projections act in principal subspaces, called exactly as the attention it replaces.

An ``nn.MultiheadAttention`` of width ``E`` with ``h`` heads computes, from a query ``x_q``, a key
``x_k`` and a value ``x_v``,

    q = W_q x_q + b_q,   k = W_k x_k + b_k,   v = W_v x_v + b_v,
    z = concat_heads softmax(q_h k_h^T / sqrt(E / h) + mask) v_h,   y = W_o z + b_o.

Each of the key, value and output maps is a ``Linear`` map ``x -> W x + b`` projected on its
output side (:class:`~rankwise.layers.ProjectedLinear`): with ``P`` (``E x r``) the leading
principal directions of its output and ``mu`` its mean,

    W x + b  ~  P (P^T W x + P^T (b - mu)) + mu,

a reduction ``x -> r`` (weight ``P^T W``) then an expansion ``r -> E`` (weight ``P``, bias
``mu + P P^T (b - mu)``, the reduction's bias folded into it). The wrapper feeds the reduced
key and value ``P_k^T W_k x_k`` (``r_k`` wide) to ``F.multi_head_attention_forward`` as keys and
values of width ``r_k`` / ``r_v`` with the expansions as their projection weights (its ``kdim``
/ ``vdim`` path), and gives it ``P_o^T W_o`` as the output weight, expanding the ``r_o``-wide
result afterwards: the same function, with ``2 r E + r + E`` instead of ``E^2 + E`` learnables
per projected map (fewer when ``r < E / 2``). The query map stays dense:
``F.multi_head_attention_forward`` reads a query ``E`` wide. At full rank every form computes
the original attention (masks, ``need_weights``, ``batch_first`` alike).

:meth:`ProjectedMultiheadAttention.unpack` gives the ``nn.MultiheadAttention`` whose weights are
the products of the factors (``W_k' = P_k P_k^T W_k``, ...): the same outputs as plain torch,
with the original's learnables.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.forms import SPEC_ATTRIBUTE
from rankwise.layers.base import ProjectedLayer
from rankwise.layers.linear import ProjectedLinear

PARTS = ("key", "value", "out")
"""The projected maps of an attention layer, in the order of their ranks."""
MAPS = ("query", *PARTS)
"""The four maps of an attention layer, as the wrapper's ``core`` holds them."""


class ProjectedMultiheadAttention(ProjectedLayer):
    """An ``nn.MultiheadAttention`` with projected key, value and output maps (module docstring).

    Called like ``nn.MultiheadAttention``: ``layer(query, key, value, key_padding_mask=None,
    need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False)`` returns
    ``(output, weights)``.

    Parameters
    ----------
    core : torch.nn.ModuleDict
        ``query``, ``key``, ``value`` and ``out``: each an ``nn.Linear`` (dense) or a
        :class:`~rankwise.layers.ProjectedLinear` projected on its output side.
    embed_dim, num_heads, dropout, batch_first
        As for ``nn.MultiheadAttention``.
    """

    _qkv_same_embed_dim = False
    """Read by ``nn.TransformerEncoderLayer``: it then calls this module instead of its fused path."""

    def __init__(self, core: nn.ModuleDict, *, embed_dim: int, num_heads: int, dropout: float = 0.0,
                 batch_first: bool = False):
        super().__init__(None, core, None)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.dropout, self.batch_first = float(dropout), batch_first

    @property
    def kdim(self) -> int:
        return _product(self.core["key"]).in_features

    @property
    def vdim(self) -> int:
        return _product(self.core["value"]).in_features

    @property
    def in_proj_weight(self):
        """Refused: there is no packed ``[W_q; W_k; W_v]`` (see the message)."""
        raise ValueError("model: a ProjectedMultiheadAttention has no packed in_proj_weight. "
                         "nn.TransformerEncoder reads it on its nested-tensor path (eval mode, batch_first, "
                         "a src_key_padding_mask, enable_nested_tensor=True); set encoder.use_nested_tensor "
                         "= False on the compressed model, or unpack it (rw.unpack_projected_layers).")

    @property
    def in_proj_bias(self) -> torch.Tensor:
        """``[b_q, b_k, b_v]`` as the attention function takes them (the expansions' biases)."""
        return torch.cat([_factors(self.core[part])[2] for part in ("query", "key", "value")])

    @property
    def side(self) -> str:
        return "output"

    @property
    def rank_in(self) -> None:
        return None

    @property
    def rank_out(self) -> tuple:
        """``(r_k, r_v, r_o)``, ``None`` for a map kept dense."""
        return tuple(None if isinstance(self.core[part], nn.Linear) else self.core[part].rank_out
                     for part in PARTS)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        (_, query_weight, _), (reduce_key, key_weight, _), (reduce_value, value_weight, _) = (
            _factors(self.core[part]) for part in ("query", "key", "value"))
        reduce_out, out_weight, out_bias = _factors(self.core["out"])
        projected_out = reduce_out is not None
        output, weights = F.multi_head_attention_forward(
            query, _applied(reduce_key, key), _applied(reduce_value, value), self.embed_dim, self.num_heads,
            None, self.in_proj_bias, None, None, False, self.dropout,
            reduce_out.weight if projected_out else out_weight, None if projected_out else out_bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, use_separate_proj_weight=True, q_proj_weight=query_weight,
            k_proj_weight=key_weight, v_proj_weight=value_weight, average_attn_weights=average_attn_weights,
            is_causal=is_causal)
        if projected_out:
            output = self.core["out"].out_proj(output)
        if self.batch_first and batched:
            output = output.transpose(1, 0)
        return output, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                f"rank_out(key/value/out)={self.rank_out}")

    # The protocol ----------------------------------------------------------------------------
    def spec(self) -> dict:
        """``{"type", "rank_in": None, "rank_out": [r_k, r_v, r_o]}`` (``None`` for a dense map)."""
        return {"type": type(self).__name__, "rank_in": None, "rank_out": list(self.rank_out)}

    @classmethod
    def from_spec(cls, layer: nn.MultiheadAttention, spec: dict) -> "ProjectedMultiheadAttention":
        """A wrapper of the structure in ``spec`` for ``layer``, with placeholder weights (the
        first columns of the identity as bases): load the saved state dict into it."""
        cls.check_spec_type(spec)
        ranks = spec["rank_out"]
        if not isinstance(ranks, list) or len(ranks) != len(PARTS):
            raise ValueError(f"spec: 'rank_out' must list {len(PARTS)} ranks ({', '.join(PARTS)}), got {ranks!r}.")
        return cls.from_dense(layer, output_basis={part: torch.eye(layer.embed_dim, dtype=torch.float64)[:, :rank]
                                                   for part, rank in zip(PARTS, ranks) if rank is not None})

    def unpack(self) -> nn.MultiheadAttention:
        """The ``nn.MultiheadAttention`` whose maps are the products of the factors.

        ``W' = P P^T W`` and ``b' = P (P^T (b - mu)) + mu`` for each projected map: the same
        outputs, with the dense attention's learnables (no plain torch layer holds the factors).
        It carries this wrapper's :meth:`spec` as ``rankwise_spec``.
        """
        like = self.core["query"].weight
        dense = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout, kdim=self.kdim,
                                      vdim=self.vdim, batch_first=self.batch_first, device=like.device,
                                      dtype=like.dtype)
        with torch.no_grad():
            for part in MAPS:
                weight, bias = part_weights(dense, part)
                product = _product(self.core[part])
                weight.copy_(product.weight)
                bias.copy_(product.bias)
        dense.requires_grad_(like.requires_grad).train(self.training)
        setattr(dense, SPEC_ATTRIBUTE, self.spec())
        return dense

    @classmethod
    def from_dense(cls, layer: nn.MultiheadAttention, input_basis=None, input_mean=None, output_basis=None,
                   output_mean=None) -> "ProjectedMultiheadAttention":
        """Project the key, value and output maps of ``layer`` onto the given orthonormal bases.

        Parameters
        ----------
        layer : torch.nn.MultiheadAttention
            Without ``add_bias_kv`` or ``add_zero_attn``, with biases (see
            :mod:`rankwise.kinds`). It is not modified.
        input_basis, input_mean : None
            Not used (no map is projected on its input side); accepted for the common call.
        output_basis : dict of str to torch.Tensor
            ``P`` (``E x r``, orthonormal columns) of each map to project, keyed by ``"key"``,
            ``"value"`` or ``"out"``; the maps not given stay dense.
        output_mean : dict of str to torch.Tensor, optional
            ``mu`` (``E``) of those maps; zero when omitted.

        Returns
        -------
        ProjectedMultiheadAttention
        """
        output_basis, output_mean = output_basis or {}, output_mean or {}
        unknown = sorted(set(output_basis) - set(PARTS))
        if unknown or input_basis:
            raise ValueError(f"output_basis: an attention layer projects its maps {', '.join(PARTS)} on their "
                             f"output side only (got {', '.join(map(repr, unknown)) or 'an input_basis'}).")
        core = nn.ModuleDict()
        for part in MAPS:
            linear = _linear(layer, part)
            core[part] = (linear if output_basis.get(part) is None else
                          ProjectedLinear.from_dense(linear, output_basis=output_basis[part],
                                                     output_mean=output_mean.get(part)))
        projected = cls(core, embed_dim=layer.embed_dim, num_heads=layer.num_heads, dropout=layer.dropout,
                        batch_first=layer.batch_first)
        return projected.train(layer.training)


def part_weights(layer: nn.MultiheadAttention, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, b)`` of a projection of ``layer``: ``"query"``, ``"key"``, ``"value"`` or ``"out"``
    (views of the packed ``in_proj_weight`` / ``in_proj_bias`` where the widths agree)."""
    if part == "out":
        return layer.out_proj.weight, layer.out_proj.bias
    index = ("query", "key", "value").index(part)
    e = layer.embed_dim
    weight = (layer.in_proj_weight[index * e:(index + 1) * e] if layer._qkv_same_embed_dim
              else getattr(layer, f"{part[0]}_proj_weight"))
    return weight, layer.in_proj_bias[index * e:(index + 1) * e]


def _linear(layer: nn.MultiheadAttention, part: str) -> nn.Linear:
    """Map ``part`` of ``layer`` as a new ``nn.Linear`` (a copy of its weight and bias)."""
    weight, bias = part_weights(layer, part)
    linear = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return linear.requires_grad_(weight.requires_grad)


def _factors(map_: nn.Module):
    """``(reduction or None, expansion weight, expansion bias)`` of a dense or projected map."""
    if isinstance(map_, nn.Linear):
        return None, map_.weight, map_.bias
    return map_.core, map_.out_proj.weight, map_.out_proj.bias


def _applied(reduction: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if reduction is None else reduction(x)


def _product(map_: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing a dense or projected map (``P (P^T W x) + b'``)."""
    if isinstance(map_, nn.Linear):
        return map_
    reduction, expansion = map_.core, map_.out_proj
    product = nn.Linear(reduction.in_features, expansion.out_features, device=expansion.weight.device,
                        dtype=expansion.weight.dtype)
    with torch.no_grad():
        product.weight.copy_(expansion.weight @ reduction.weight)
        product.bias.copy_(expansion.bias)
    return product

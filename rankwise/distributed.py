"""Statistics summed over a ``torch.distributed`` process group.

Every moment rankwise gathers is a sum over observations (:class:`~rankwise.moments.Moments`:
``count``, ``sum``, ``square_sum``, ``outer``), so the statistics of a calibration set sharded
over the ranks of a process group are the sums of the ranks' statistics. :func:`all_reduce_moments`
sums them in place: the float64 tensors are flattened into buckets of at most
:data:`BUCKET_ELEMENTS` elements, each bucket is summed with one ``all_reduce`` call (not one
call per layer), and the sums are copied back. Every rank ends with the same tensors, so the
decisions taken from them, and the compressed models, are identical on every rank.

gloo runs on the CPU, nccl on CUDA; the buckets live on the device of the moments.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

BUCKET_ELEMENTS = 1 << 25  # 32 Mi float64 = 256 MiB per all_reduce call


def active_group(process_group=None):
    """The process group to sum over, or ``None`` when ``torch.distributed`` is not initialised
    (or has one rank): then nothing is reduced."""
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError("process_group: torch.distributed is not initialised; call "
                             "torch.distributed.init_process_group first (torchrun does it for you).")
        return None
    if dist.get_world_size(process_group) == 1:
        return None
    return process_group if process_group is not None else dist.group.WORLD


def all_reduce_tensors(tensors: list[torch.Tensor], process_group=None) -> None:
    """Sum ``tensors`` over the group, in place, in buckets of flattened float64 tensors.

    Parameters
    ----------
    tensors : list of torch.Tensor
        Float64 tensors on one device, in the same order and with the same shapes on every rank.
    process_group : ProcessGroup, optional
        The default group when ``None``. Nothing happens outside an initialised group.
    """
    group = active_group(process_group)
    if group is None or not tensors:
        return
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_count(count: int, process_group=None) -> int:
    """``count`` summed over the group (``count`` itself outside one)."""
    group = active_group(process_group)
    if group is None:
        return count
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    total = torch.tensor([count], dtype=torch.float64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return int(total.item())


def broadcast_from_first(objects: list, process_group=None) -> list:
    """``objects`` (picklable, e.g. lists of CPU tensors) as the group's first rank holds them;
    ``objects`` itself outside an initialised group. For what is a sample, not a sum (the
    reservoir of a recurrent layer's calibration sequences), so that every rank decides alike."""
    group = active_group(process_group)
    if group is None:
        return objects
    message = [objects]
    dist.broadcast_object_list(message, src=dist.get_global_rank(group, 0), group=group)
    return message[0]


def _buckets(tensors: list[torch.Tensor]):
    bucket, size = [], 0
    for t in tensors:
        if bucket and size + t.numel() > BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket

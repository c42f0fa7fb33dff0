"""Statistics summed over a ``torch.distributed`` process group.

Every moment rankwise gathers is a sum over observations (:class:`~rankwise.moments.Moments`:
``count``, ``sum``, ``square_sum``, ``outer``), so the statistics of a calibration set sharded
over the ranks of a process group are the sums of the ranks' statistics. :func:`all_reduce_moments`
sums them in place: the float64 tensors are flattened into buckets of at most
:data:`BUCKET_ELEMENTS` elements, each bucket is summed with one ``all_reduce`` call (not one
call per layer), and the sums are copied back. Every rank ends with the same tensors, so the
decisions taken from them, and the compressed models, are identical on every rank.

Two rules keep a group of ranks from waiting on each other forever: a rank whose shard holds no
batch takes part in the sums with zero moments (:func:`all_gather_count` tells every rank which
ranks saw data), and a rank that fails reports it in :func:`raise_on_every_rank`, which every
rank calls before the sums, so that all of them raise instead of the others waiting in an
``all_reduce`` until the group's timeout.

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
    return sum(all_gather_count(count, process_group))


def all_gather_count(count: int, process_group=None) -> list[int]:
    """Every rank's ``count``, in the order of the ranks in the group (``[count]`` outside one)."""
    group = active_group(process_group)
    if group is None:
        return [count]
    counts = torch.zeros(dist.get_world_size(group), dtype=torch.float64, device=_collective_device(group))
    counts[dist.get_rank(group)] = count
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return [int(c) for c in counts.tolist()]


def raise_on_every_rank(failure: Exception | None, process_group=None) -> None:
    """Raise on every rank of the group when one of them failed, instead of leaving the others
    waiting in the next collective until the group's timeout.

    Every rank calls it at the same point with what it raised there (``None`` when it did not).
    One ``all_gather_object`` of a short message per rank tells each rank what happened on the
    others: the rank that failed raises its own error; the others raise the first failing rank's
    message, as a ``ValueError`` when the original was one, else a ``RuntimeError``. Outside a
    group, ``failure`` is raised when given.

    Parameters
    ----------
    failure : Exception or None
        What this rank raised.
    process_group : ProcessGroup, optional
        The default group when ``None``.
    """
    group = active_group(process_group)
    if group is None:
        if failure is not None:
            raise failure
        return
    reports = [None] * dist.get_world_size(group)
    report = None if failure is None else (isinstance(failure, ValueError), type(failure).__name__, str(failure))
    dist.all_gather_object(reports, report, group=group)
    if failure is not None:
        raise failure
    failed = [(rank, r) for rank, r in enumerate(reports) if r is not None]
    if failed:
        rank, (is_value_error, kind, message) = failed[0]
        where = f"raised on rank {rank} of {len(reports)}, so every rank stops"
        if is_value_error:
            raise ValueError(f"{message} ({where})")
        raise RuntimeError(f"{kind}: {message} ({where})")


def broadcast_from_first(objects: list, process_group=None, source: int = 0) -> list:
    """``objects`` (picklable, e.g. lists of CPU tensors) as rank ``source`` of the group (its
    first by default) holds them; ``objects`` itself outside an initialised group. For what is a
    sample, not a sum (the reservoir of a recurrent layer's calibration sequences), so that every
    rank decides alike."""
    group = active_group(process_group)
    if group is None:
        return objects
    message = [objects]
    dist.broadcast_object_list(message, src=dist.get_global_rank(group, source), group=group)
    return message[0]


def _collective_device(group) -> torch.device:
    """Where a group's small tensors live: the current CUDA device under nccl, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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

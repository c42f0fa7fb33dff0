"""Statistics summed over a torch.distributed group (gloo, two processes on the CPU)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rankwise import distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sum_in_buckets(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        distributed.BUCKET_ELEMENTS = 5  # force several buckets
        tensors = [torch.full((2, 2), float(rank + 1), dtype=torch.float64),
                   torch.arange(3, dtype=torch.float64) * (rank + 1), torch.tensor(1.0 + rank, dtype=torch.float64)]
        distributed.all_reduce_tensors(tensors)
        results[rank] = ([t.clone() for t in tensors], distributed.all_reduce_count(10 + rank))
    finally:
        dist.destroy_process_group()


def test_tensors_are_summed_over_the_group_in_buckets():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_sum_in_buckets, args=(2, _free_port(), results), nprocs=2, join=True)
    for rank in range(2):
        tensors, count = results[rank]
        torch.testing.assert_close(tensors[0], torch.full((2, 2), 3.0, dtype=torch.float64))
        torch.testing.assert_close(tensors[1], torch.arange(3, dtype=torch.float64) * 3)
        torch.testing.assert_close(tensors[2], torch.tensor(3.0, dtype=torch.float64))
        assert count == 21


def test_outside_a_group_nothing_is_reduced_and_a_named_group_is_refused():
    tensors = [torch.ones(3, dtype=torch.float64)]
    distributed.all_reduce_tensors(tensors)
    assert torch.equal(tensors[0], torch.ones(3, dtype=torch.float64))
    assert distributed.all_reduce_count(4) == 4
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialised"):
        distributed.active_group(object())

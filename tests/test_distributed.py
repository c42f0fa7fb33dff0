"""Statistics summed over a torch.distributed group (gloo, two processes on the CPU)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import rankwise as rw

from rankwise import distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))


def _data():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(4, 2, 6, 6, generator=generator) for _ in range(4)]


def _in_group(rank, world, port, results, job):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results[rank] = job(rank, world)
    finally:
        dist.destroy_process_group()


def _on_two_ranks(job):
    """``{rank: job(rank, world)}`` over a gloo group of two processes."""
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_in_group, args=(2, _free_port(), results, job), nprocs=2, join=True)
    return dict(results)


def _summed_statistics(rank, world):
    distributed.BUCKET_ELEMENTS = 5  # force several buckets
    tensors = [torch.full((2, 2), float(rank + 1), dtype=torch.float64),
               torch.arange(3, dtype=torch.float64) * (rank + 1), torch.tensor(1.0 + rank, dtype=torch.float64)]
    distributed.all_reduce_tensors(tensors)
    distributed.BUCKET_ELEMENTS = 1 << 25
    shard = _data()[rank::world]  # what a DistributedSampler would give this rank
    npca = rw.NeuronPCA(_model(), shard, verbosity="off", loss_fn="kl")
    net, info = rw.compress_network_using_projection(_model(), npca, learnables_reduction_goal=0.4,
                                                     verbosity="off")
    return ([t.clone() for t in tensors], distributed.all_reduce_count(10 + rank),
            {name: (npca.statistics(name).output.outer, npca.statistics(name).input.sum)
             for name in npca.layer_names}, npca.fisher("3"), npca.num_batches, net.state_dict())


def test_statistics_are_summed_over_the_group_and_every_rank_builds_the_same_model():
    results = _on_two_ranks(_summed_statistics)
    whole = rw.NeuronPCA(_model(), _data(), verbosity="off", loss_fn="kl")
    for rank in range(2):
        tensors, count, stats, fisher, batches, _ = results[rank]
        torch.testing.assert_close(tensors[0], torch.full((2, 2), 3.0, dtype=torch.float64))
        torch.testing.assert_close(tensors[1], torch.arange(3, dtype=torch.float64) * 3)
        torch.testing.assert_close(tensors[2], torch.tensor(3.0, dtype=torch.float64))
        assert count == 21 and batches == 4
        for name, (outer, total) in stats.items():  # the moments of all the data, on every rank
            torch.testing.assert_close(outer, whole.statistics(name).output.outer, rtol=1e-12, atol=1e-10)
            torch.testing.assert_close(total, whole.statistics(name).input.sum, rtol=1e-12, atol=1e-10)
        assert fisher.shape == (5, 5)
    first, second = results[0][5], results[1][5]
    assert all(torch.equal(first[key], second[key]) for key in first)  # bit-identical models


def test_outside_a_group_nothing_is_reduced_and_a_named_group_is_refused():
    tensors = [torch.ones(3, dtype=torch.float64)]
    distributed.all_reduce_tensors(tensors)
    assert torch.equal(tensors[0], torch.ones(3, dtype=torch.float64))
    assert distributed.all_reduce_count(4) == 4
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialised"):
        distributed.active_group(object())


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn, self.head = nn.GRU(3, 8, batch_first=True), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def _sequences():
    generator = torch.Generator().manual_seed(2)
    return [torch.randn(2, 9, 3, generator=generator) for _ in range(4)]


def _recurrent_choices(rank, world):
    npca = rw.NeuronPCA(_Recurrent(), _sequences()[rank::world], verbosity="off")
    net, _ = rw.compress_network_using_projection(_Recurrent(), npca, explained_variance_goal=0.9,
                                                  verbosity="off")
    return npca.statistics("rnn").reservoir, net.state_dict()


def test_every_rank_measures_recurrent_layers_on_the_first_ranks_sequences():
    """The reservoir is a sample, not a sum: every rank takes the first rank's, so all decide alike."""
    results = _on_two_ranks(_recurrent_choices)
    first_shard = [sequence for batch in _sequences()[0::2] for sequence in batch]
    for rank in range(2):
        reservoir, _ = results[rank]
        assert len(reservoir) == len(first_shard)
        assert all(torch.equal(a, b) for a, b in zip(reservoir, first_shard))
    first, second = results[0][1], results[1][1]
    assert all(torch.equal(first[key], second[key]) for key in first)

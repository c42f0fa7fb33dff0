"""Statistics summed over a torch.distributed group (gloo, two or three processes on the CPU), and
the command line under torchrun."""

import contextlib
import datetime
import functools
import io
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

import rankwise as rw

from rankwise import distributed
from rankwise.statistics.calibration import NO_BATCH

GROUP_TIMEOUT = datetime.timedelta(seconds=60)  # a rank left waiting fails within this, never hangs


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


def _in_group(rank, world, port, results, job, launched):
    """``job(rank, world)`` in a gloo group of ``world`` processes: joined here, or, when
    ``launched``, left to the job with the environment torchrun sets."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if launched:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        results[rank] = job(rank, world)
        return
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=GROUP_TIMEOUT)
    try:
        results[rank] = job(rank, world)
    finally:
        dist.destroy_process_group()


def _on_ranks(job, world=2, launched=False):
    """``{rank: job(rank, world)}`` over a gloo group of ``world`` processes."""
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_in_group, args=(world, _free_port(), results, job, launched), nprocs=world, join=True)
    return dict(results)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _same_state(first: dict, second: dict) -> bool:
    return set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


def _squared_outputs(outputs, batch):
    """A loss without sampling, so that its gradient statistics do not depend on the sharding
    (``"kl"`` and ``"mse"`` draw their targets from a generator each rank seeds alike)."""
    return outputs.square().sum()


def _summed_statistics(rank, world):
    distributed.BUCKET_ELEMENTS = 5  # force several buckets
    tensors = [torch.full((2, 2), float(rank + 1), dtype=torch.float64),
               torch.arange(3, dtype=torch.float64) * (rank + 1), torch.tensor(1.0 + rank, dtype=torch.float64)]
    distributed.all_reduce_tensors(tensors)
    distributed.BUCKET_ELEMENTS = 1 << 25
    shard = _data()[rank::world]  # what a DistributedSampler would give this rank
    npca = rw.NeuronPCA(_model(), shard, verbosity="off", loss_fn=_squared_outputs)
    net, _ = rw.compress_network_using_projection(_model(), npca, learnables_reduction_goal=0.4, verbosity="off",
                                                  criterion="loss", allocation="global")
    return ([t.clone() for t in tensors], distributed.all_reduce_count(10 + rank),
            distributed.all_gather_count(rank * rank),
            {name: (npca.statistics(name).output.outer, npca.statistics(name).input.sum)
             for name in npca.layer_names}, npca.fisher("3"), npca.num_batches, net.state_dict())


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_sum_to_the_statistics_and_the_model_of_one_process(world):
    """Three ranks get 2, 1 and 1 of the 4 batches. Each batch's products are float32, summed in
    float64: exact for a few batches, so even the compressed model is the one-process model."""
    results = _on_ranks(_summed_statistics, world)
    whole = rw.NeuronPCA(_model(), _data(), verbosity="off", loss_fn=_squared_outputs, validation=None)
    single, _ = rw.compress_network_using_projection(_model(), whole, learnables_reduction_goal=0.4,
                                                     verbosity="off", criterion="loss", allocation="global")
    total = world * (world + 1) / 2
    for rank in range(world):
        tensors, count, gathered, stats, fisher, batches, model = results[rank]
        torch.testing.assert_close(tensors[0], torch.full((2, 2), total, dtype=torch.float64))
        torch.testing.assert_close(tensors[1], torch.arange(3, dtype=torch.float64) * total)
        torch.testing.assert_close(tensors[2], torch.tensor(total, dtype=torch.float64))
        assert count == 10 * world + world * (world - 1) // 2 and batches == 4
        assert gathered == [r * r for r in range(world)]
        for name, (outer, total_input) in stats.items():  # the moments of all the data, on every rank
            assert _relative(outer, whole.statistics(name).output.outer) <= 1e-12
            assert _relative(total_input, whole.statistics(name).input.sum) <= 1e-12
        assert _relative(fisher, whole.fisher("3")) <= 1e-12
        assert _same_state(model, single.state_dict())


def test_outside_a_group_nothing_is_reduced_and_a_named_group_is_refused():
    tensors = [torch.ones(3, dtype=torch.float64)]
    distributed.all_reduce_tensors(tensors)
    assert torch.equal(tensors[0], torch.ones(3, dtype=torch.float64))
    assert distributed.all_reduce_count(4) == 4 and distributed.all_gather_count(4) == [4]
    distributed.raise_on_every_rank(None)
    with pytest.raises(KeyError, match="mine"):
        distributed.raise_on_every_rank(KeyError("mine"))
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


def _recurrent_choices(rank, world, shards):
    sequences = _sequences()
    npca = rw.NeuronPCA(_Recurrent(), [sequences[i] for i in shards[rank]], verbosity="off",
                        loss_fn=_squared_outputs)
    net, _ = rw.compress_network_using_projection(_Recurrent(), npca, explained_variance_goal=0.9,
                                                  verbosity="off")
    return (npca.statistics("rnn").reservoir, npca.statistics("head").output.outer, npca.fisher("head"),
            npca.num_batches, net.state_dict())


@pytest.mark.parametrize("shards", [[[0, 2], [1, 3]], [[], [0, 1, 2], [3]]], ids=["even", "first_rank_empty"])
def test_every_rank_measures_recurrent_layers_on_the_first_full_ranks_sequences(shards):
    """The reservoir is a sample, not a sum: every rank takes that of the first rank that saw a
    batch, so all decide alike; a rank with no batch at all adds nothing and breaks nothing."""
    results = _on_ranks(functools.partial(_recurrent_choices, shards=shards), len(shards))
    whole = rw.NeuronPCA(_Recurrent(), _sequences(), verbosity="off", loss_fn=_squared_outputs)
    first_full = next(shard for shard in shards if shard)
    first_sequences = [sequence for i in first_full for sequence in _sequences()[i]]
    for rank in range(len(shards)):
        reservoir, outer, fisher, batches, model = results[rank]
        assert len(reservoir) == len(first_sequences)
        assert all(torch.equal(a, b) for a, b in zip(reservoir, first_sequences))
        assert _relative(outer, whole.statistics("head").output.outer) <= 1e-12
        assert _relative(fisher, whole.fisher("head")) <= 1e-12 and batches == 4
        assert _same_state(model, results[0][4])


def _failing_forward(model, batch):
    if dist.get_rank() == 1:
        raise RuntimeError("out of memory on this rank")
    return model(batch)


def _failures(rank, world):
    """What each rank raises when rank 1's forward fails, then when no rank has a batch."""
    outcomes = []
    for data, forward_fn in ((_data()[rank::world], _failing_forward), ([], None)):
        try:
            rw.NeuronPCA(_model(), data, verbosity="off", forward_fn=forward_fn)
            outcomes.append(None)
        except Exception as error:
            outcomes.append((type(error).__name__, str(error)))
    return outcomes


def test_a_rank_that_fails_stops_every_rank_instead_of_hanging():
    results = _on_ranks(_failures, 3)
    own = "data: the model rejected batch 0 (RuntimeError: out of memory on this rank)"
    assert results[1][0][0] == "ValueError" and results[1][0][1].startswith(own)
    for rank in (0, 2):
        kind, message = results[rank][0]
        assert kind == "ValueError" and message.startswith(own)
        assert message.endswith("(raised on rank 1 of 3, so every rank stops)")
    assert all(results[rank][1] == ("ValueError", NO_BATCH) for rank in range(3))


# The command line under torchrun ------------------------------------------------------------

def _command(rank, world, folder, output, ports):
    """``rankwise compress`` as each rank of ``torchrun --nproc-per-node world`` runs it, then
    once more with an output folder that does not exist (rank 0 alone checks it)."""
    from rankwise.cli import main

    printed = []
    for port, target in zip(ports, (output, folder / "missing" / "out.rw")):
        os.environ["MASTER_PORT"] = str(port)
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = main(["compress", str(folder / "bert"), "--data", str(folder / "sentences.txt"),
                           "--learnables-reduction", "0.2", "--batch-size", "8", "--criterion", "variance",
                           "--allocation", "global", "--output", str(target)])
        printed.append((status, stdout.getvalue(), stderr.getvalue(), dist.is_initialized()))
    return printed


def test_the_command_under_torchrun_writes_the_one_process_model_from_rank_0(tmp_path):
    pytest.importorskip("transformers")
    from test_cli_hf import write_sentences, write_tiny_bert
    from rankwise.cli import main

    write_tiny_bert(tmp_path / "bert")
    write_sentences(tmp_path / "sentences.txt", count=40)  # 5 batches of 8: ranks get 3 and 2
    assert main(["compress", str(tmp_path / "bert"), "--data", str(tmp_path / "sentences.txt"),
                 "--learnables-reduction", "0.2", "--batch-size", "8", "--criterion", "variance",
                 "--allocation", "global", "--output", str(tmp_path / "single.rw"), "--quiet"]) == 0
    job = functools.partial(_command, folder=tmp_path, output=tmp_path / "ranks.rw",
                            ports=(_free_port(), _free_port()))
    results = _on_ranks(job, 2, launched=True)
    (status, out, err, grouped), (failed, _, failure, still_grouped) = results[0]
    assert status == 0 and "wrote" in out and not grouped and not still_grouped
    assert failed == 2 and "--output: the folder" in failure
    assert results[1] == [(0, "", "", False), (2, "", "", False)]  # the other rank stays quiet
    assert _same_state(load_file(tmp_path / "ranks.rw"), load_file(tmp_path / "single.rw"))
    assert rw.io.read_spec(tmp_path / "ranks.rw") == rw.io.read_spec(tmp_path / "single.rw")

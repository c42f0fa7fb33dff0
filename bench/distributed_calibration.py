"""Distributed calibration: NeuronPCA of a BERT-base-sized model over 1, 2 and 4 processes (gloo, CPU).

The model is ``BertModel(BertConfig())`` (the defaults: 12 layers of width 768, 110M learnables)
with random weights, which is enough for cost. The calibration set is fixed: ``--sentences``
sentences of ``--tokens`` random token ids each (no padding), in batches of ``--batch``
sentences; with ``P`` processes, rank ``r`` takes batches ``r, r + P, ...`` (what a
``DistributedSampler`` gives) and ``rw.NeuronPCA`` sums the moments over the gloo group.

For every process count it records:

- the wall time of ``rw.NeuronPCA(model, shard)`` on each rank (the calibration pass, the
  ``all_reduce`` of the float64 moments and the eigen-free rest of the constructor), and of a
  plain forward pass over the same shard (``model(**batch)`` under ``torch.no_grad()``);
- the peak resident memory of each process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``),
  read before anything is compared;
- on rank 0, the largest difference between its moments and those of the one-process run,
  tensor by tensor, relative to the largest entry of the one-process tensor, and how many
  tensors are bit-identical. Every rank's moments are also compared with rank 0's.

Each process runs ``--threads`` torch threads (1 by default, so that P processes use P cores).

Run from the repository root: ``python bench/distributed_calibration.py``.
Writes ``bench/results/distributed_calibration.md``.
"""

import argparse
import datetime
import os
import resource
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rankwise as rw
from environment import write_result
from rankwise.statistics import moment_tensors

RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "distributed_calibration.md")


def bert_base():
    """``BertModel(BertConfig())`` with seeded random weights, in eval mode."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig()).eval()


def calibration_batches(sentences: int, tokens: int, batch: int, vocab: int) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (sentences, tokens), generator=generator)
    return [{"input_ids": part, "attention_mask": torch.ones_like(part), "token_type_ids": torch.zeros_like(part)}
            for part in ids.split(batch)]


def moments_of(npca) -> dict[str, torch.Tensor]:
    """Every summed tensor of the statistics, by ``layer/index``."""
    return {f"{name}/{i}": t for name in npca.layer_names
            for i, t in enumerate(moment_tensors(npca.statistics(name)))}


def forward_seconds(model, shard) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for batch in shard:
            model(**batch)
    return time.perf_counter() - start


def worker(rank, processes, port, options, reference, results):
    torch.set_num_threads(options.threads)
    if processes > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=processes,
                                timeout=datetime.timedelta(minutes=30))
    model = bert_base()
    shard = calibration_batches(options.sentences, options.tokens, options.batch,
                                model.config.vocab_size)[rank::processes]
    with torch.no_grad():
        model(**shard[0])  # warm-up, untimed
    forward = forward_seconds(model, shard)
    start = time.perf_counter()
    npca = rw.NeuronPCA(model, shard, verbosity="off")
    calibration = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
    moments = moments_of(npca)
    outcome = {"batches": len(shard), "forward_s": forward, "calibration_s": calibration,
               "peak_rss_gib": peak_gib, "elements": sum(t.numel() for t in moments.values())}
    if processes == 1:
        torch.save(moments, reference)
    else:
        outcome["same_as_rank_0"] = _same_on_every_rank(moments)
        if rank == 0:
            outcome.update(_compared(moments, torch.load(reference, mmap=True, weights_only=True)))
        dist.destroy_process_group()
    results[rank] = outcome


def _same_on_every_rank(moments: dict) -> bool:
    """Whether this rank's moments are bit-identical to rank 0's (one broadcast per tensor)."""
    same = True
    for tensor in moments.values():
        first = tensor.clone()
        dist.broadcast(first, src=0)
        same &= torch.equal(first, tensor)
    return same


def _compared(moments: dict, reference: dict) -> dict:
    """Largest ``max|a - b| / max|b|`` over the tensors, and how many are bit-identical."""
    worst, identical = 0.0, 0
    for key, tensor in moments.items():
        expected = reference[key]
        scale = expected.abs().max().item()
        worst = max(worst, (tensor - expected).abs().max().item() / scale if scale else 0.0)
        identical += torch.equal(tensor, expected)
    return {"max_relative_difference": worst, "identical_tensors": identical, "tensors": len(moments)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, options, reference: str) -> dict:
    results = mp.Manager().dict()
    start = time.perf_counter()
    mp.spawn(worker, args=(processes, free_port(), options, reference, results), nprocs=processes, join=True)
    return {"wall_s": time.perf_counter() - start, "ranks": [results[r] for r in range(processes)]}


def table(runs: dict, options) -> str:
    tokens = options.sentences * options.tokens
    lines = [f"Calibration set: {options.sentences} sentences x {options.tokens} tokens = {tokens} tokens, "
             f"batches of {options.batch} sentences; {options.threads} torch thread(s) per process.", "",
             "| processes | batches per rank | NeuronPCA per rank (s), slowest | forward per rank (s), slowest "
             "| whole run incl. start (s) | peak RSS per process (GiB), largest | max relative difference "
             "to 1 process | bit-identical tensors | ranks identical |",
             "|---|---|---|---|---|---|---|---|---|"]
    for processes, result in runs.items():
        ranks = result["ranks"]
        first = ranks[0]
        difference = (f"{first['max_relative_difference']:.1e}" if "max_relative_difference" in first
                      else "(reference)")
        identical = (f"{first['identical_tensors']} / {first['tensors']}" if "tensors" in first else "-")
        same = "yes" if all(r.get("same_as_rank_0", True) for r in ranks) else "NO"
        lines.append(f"| {processes} | {', '.join(str(r['batches']) for r in ranks)} "
                     f"| {max(r['calibration_s'] for r in ranks):.1f} | {max(r['forward_s'] for r in ranks):.1f} "
                     f"| {result['wall_s']:.1f} | {max(r['peak_rss_gib'] for r in ranks):.2f} "
                     f"| {difference} | {identical} | {same} |")
    elements = runs[min(runs)]["ranks"][0]["elements"]
    lines += ["", f"Statistics held per process: {elements:,} float64 elements "
              f"({elements * 8 / 2 ** 30:.2f} GiB)."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--sentences", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    if options.processes[0] != 1:
        parser.error("--processes: the first count must be 1, the reference the others are compared to")
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        reference = os.path.join(folder, "one_process_moments.pt")
        for processes in options.processes:
            runs[processes] = run(processes, options, reference)
            print(f"{processes} process(es): {runs[processes]}", flush=True)
    write_result(RESULT, "Distributed calibration (gloo, CPU)", table(runs, options))


if __name__ == "__main__":
    main()

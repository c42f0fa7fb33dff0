"""Per-call cost of a factored Linear at batch 1: the wrapper, its unpacked layers, the products alone.

A ``rw.ProjectedLinear`` of a ``Linear(128, 128)`` at output rank 16 (the top 16 left singular
vectors), timed on one input row: the dense layer, the wrapper, ``wrapper.unpack()`` (an
``nn.Sequential`` of two ``nn.Linear``) and the two ``F.linear`` products alone. Median of 2000
calls after 200 warm-up calls, three rounds, under ``torch.inference_mode()``, 1 torch thread.

    OMP_NUM_THREADS=1 python bench/wrapper_overhead.py
"""

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import rankwise as rw


def median_microseconds(call, x, calls=2000, warmup=200):
    for _ in range(warmup):
        call(x)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dense = nn.Linear(128, 128)
    basis = torch.linalg.svd(dense.weight.detach())[0][:, :16]
    wrapper = rw.ProjectedLinear.from_dense(dense, output_basis=basis).eval()
    unpacked = wrapper.unpack()
    (first, second), x = unpacked, torch.randn(1, 128)
    calls = {"dense": dense, "wrapper": wrapper, "unpacked": unpacked,
             "products alone": lambda x: F.linear(F.linear(x, first.weight, first.bias), second.weight, second.bias)}
    with torch.inference_mode():
        for round_number in range(3):
            print(f"round {round_number}: " + ", ".join(f"{name} {median_microseconds(call, x):.2f} us"
                                                     for name, call in calls.items()))


if __name__ == "__main__":
    main()

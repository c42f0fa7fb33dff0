"""The MNIST CNN and MLP at 25 / 50% of their FLOPs removed, timed at batch 1 (rw.compare_speed).

One NeuronPCA on 2048 training images, ``flops_reduction_goal`` with every other option at its
default, then ``rw.compare_speed(model, net, one test image, repeats=50, max_rounds=8)``. Run with
``PYTHONPATH`` at two checkouts to compare their forward paths (the decisions are the same).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/flops_batch1.py
"""
import warnings

import torch

import rankwise as rw
from rankwise.datasets import load_mnist
from rankwise.examples import pretrained_mnist
print("rankwise from", rw.__file__)
torch.set_num_threads(1)
warnings.simplefilter("ignore")
for name in ("cnn", "mlp"):
    model = pretrained_mnist(name, verbose=False)
    tr, _ = load_mnist("train"); te, _ = load_mnist("test")
    npca = rw.NeuronPCA(model, list(tr[:2048].split(256)), verbosity="off")
    for goal in (0.25, 0.5):
        net, info = rw.compress_network_using_projection(model, npca, flops_reduction_goal=goal, verbosity="off")
        c = rw.compare_speed(model, net, te[:1].contiguous(), repeats=50, max_rounds=8)
        print(name, goal, f"b1 speedup {c.realised_speedup:.2f}x stable={c.stable} {c.seconds_before*1e6:.0f}us -> {c.seconds_after*1e6:.0f}us")

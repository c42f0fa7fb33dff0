"""The MNIST CNN under a FLOPs goal with ``latency_input=`` one test image (the latency-aware path).

One NeuronPCA on 2048 training images; ``flops_reduction_goal`` 0.25 and 0.5 with
``latency_input=test_images[:1]``, every other option at its default; test accuracy on images
5000-9999, the layers kept dense, each layer's form, the FLOPs removed and the unreached-goal
warning.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/latency_aware_cnn.py
"""
import warnings

import torch

import rankwise as rw
from rankwise.datasets import load_mnist
from rankwise.examples import pretrained_mnist, accuracy
torch.set_num_threads(1)
model = pretrained_mnist("cnn", verbose=False)
tr, _ = load_mnist("train"); te, tl = load_mnist("test")
npca = rw.NeuronPCA(model, list(tr[:2048].split(256)), verbosity="off")
for goal in (0.25, 0.5):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        net, info = rw.compress_network_using_projection(model, npca, flops_reduction_goal=goal, latency_input=te[:1].contiguous(), verbosity="off")
    print(goal, accuracy(net, te[5000:], tl[5000:]), info.kept_dense_for_latency, {n:(p.side,p.rank_in,p.rank_out) for n,p in info.layers.items()}, f"{info.flops_reduction:.3f}", [str(x.message)[:160] for x in w if "above" in str(x.message)])

"""Where the MNIST CNN's time goes at batch 256 (eager, NCHW): each layer dense and factored, and the rest.

One NeuronPCA on 2048 training images, ``flops_reduction_goal=0.5`` with every other option at its
default; each analysed layer timed alone on the arguments it receives when the network runs on
256 test images (:func:`rankwise.latency_aware.time_layer`, median of 20 calls), dense and in its
compressed form, and both whole networks (:func:`rankwise.median_latency`). The time outside the
analysed layers (ReLU, max-pooling, flatten) carries no counted FLOPs and does not shrink.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/cnn_time_profile.py
"""

import warnings

import torch

import rankwise as rw
from rankwise.datasets import load_mnist
from rankwise.examples import pretrained_mnist
from rankwise.latency_aware import record_layer_calls, time_layer


def main():
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    model = pretrained_mnist("cnn", verbose=False)
    train_images, _ = load_mnist("train")
    test_images, _ = load_mnist("test")
    npca = rw.NeuronPCA(model, list(train_images[:2048].split(256)), verbosity="off")
    x = test_images[:256].contiguous()
    net, info = rw.compress_network_using_projection(model, npca, flops_reduction_goal=0.5, verbosity="off")
    layers = {name: model.get_submodule(name) for name in info.layers}
    calls = record_layer_calls(model, layers, x)
    dense_total = factored_total = 0.0
    for name, layer in layers.items():
        p = info.layers[name]
        dense, factored = time_layer(layer, calls[name]), time_layer(net.get_submodule(name), calls[name])
        dense_total, factored_total = dense_total + dense, factored_total + factored
        print(f"layer {name}: {p.side} (rank in {p.rank_in}, rank out {p.rank_out}): "
              f"dense {1e3 * dense:.2f} ms, compressed {1e3 * factored:.2f} ms")
    whole = rw.median_latency(model, x), rw.median_latency(net, x)
    print(f"analysed layers: {1e3 * dense_total:.1f} -> {1e3 * factored_total:.1f} ms; whole network "
          f"{1e3 * whole[0]:.1f} -> {1e3 * whole[1]:.1f} ms; outside the analysed layers "
          f"{1e3 * (whole[0] - dense_total):.1f} ms of the original's {1e3 * whole[0]:.1f}")
    print(f"FLOPs {rw.count_flops(model, x):,} -> {rw.count_flops(net, x):,}")


if __name__ == "__main__":
    main()

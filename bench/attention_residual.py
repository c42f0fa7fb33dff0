"""How the attention layer's estimated residual compares with the measured output error.

A random 32-wide ``nn.TransformerEncoderLayer`` (4 heads) with correlated inputs; statistics
on 8 calibration batches, errors measured on 4 held-out batches: the fraction of the attention
output's variance lost, ``sum |y - y'|^2 / sum |y - mean(y)|^2``, next to the estimate
``res_key + res_value + res_out`` (:mod:`rankwise.ranks.frontier`).

Run: ``PYTHONPATH=. python bench/attention_residual.py`` (a few seconds on one CPU core).
"""

import torch
from torch import nn

import rankwise as rw
from rankwise.layers.build import project_layer
from rankwise.ranks import RankChoice, measured_options
from rankwise.ranks.frontier import _residual_curve

WIDTH, PARTS = 32, ("key", "value", "out")
RANKS = [(4, None, None), (None, 4, None), (None, None, 4), (2, 2, 2), (4, 4, 4), (8, 8, 8), (12, 12, 12)]


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.TransformerEncoderLayer(WIDTH, 4, 64, dropout=0.0, batch_first=True).eval()
    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(WIDTH, WIDTH, generator=generator) * torch.logspace(0, -2, WIDTH)[None]
    batches = [torch.randn(8, 10, WIDTH, generator=generator) @ mixing.T for _ in range(12)]
    calibration, held_out = batches[:8], batches[8:]
    npca = rw.NeuronPCA(model, calibration, layer_names="self_attn", verbosity="off")
    options = measured_options(model, npca, {"self_attn": model.self_attn})["self_attn"]
    residuals = {part: _residual_curve(npca.spectrum("self_attn", "output", part).eigenvalues) for part in PARTS}
    print("ranks (key, value, out)   measured   estimated")
    for ranks in RANKS:
        projected = project_layer(model.self_attn, options, RankChoice("output", None, ranks, 0, 0.0, 0.0))
        lost = total = 0.0
        with torch.no_grad():
            for x in held_out:
                y = model.self_attn(x, x, x)[0]
                lost += float((y - projected(x, x, x)[0]).square().sum())
                total += float((y - y.mean((0, 1))).square().sum())
        estimate = sum(residuals[part][rank - 1] for part, rank in zip(PARTS, ranks) if rank)
        print(f"{str(ranks):25} {lost / total:8.3f}   {estimate:9.3f}")


if __name__ == "__main__":
    main()

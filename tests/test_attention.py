"""nn.MultiheadAttention: its out_proj is never analysed as a plain Linear; the rest of a
TransformerEncoderLayer is analysed and compressed normally."""

import copy

import pytest
import torch
from torch import nn

import rankwise as rw

WIDTH, HEADS, LENGTH, BATCH = 16, 2, 7, 4


def _encoder(batch_first: bool, layers: int = 1) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(WIDTH, HEADS, dim_feedforward=48, dropout=0.0, batch_first=batch_first)
    if layers == 1:
        return layer.eval()
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()


def _sequences(batch_first: bool, count: int = 6, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (BATCH, LENGTH, WIDTH) if batch_first else (LENGTH, BATCH, WIDTH)
    return [torch.randn(*shape, generator=generator) for _ in range(count)]


def _out_projs(model: nn.Module) -> list[str]:
    return [f"{name}.out_proj".lstrip(".") for name, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("layers", [1, 2])
def test_an_encoder_calibrates_and_compresses_without_its_attention_out_proj(batch_first, layers):
    model, data = _encoder(batch_first, layers), _sequences(batch_first)
    before = copy.deepcopy(model.state_dict())
    npca = rw.NeuronPCA(model, data, verbosity="off")
    assert not set(_out_projs(model)) & set(npca.layer_names)
    assert {name.rsplit(".", 1)[-1] for name in npca.layer_names} == {"linear1", "linear2"}
    net, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.2,
                                                     verbosity="off")
    assert info.learnables_reduction >= 0.2 and info.learnables_after == rw.count_learnables(net)
    assert info.excluded == _out_projs(model) and "excluded: " in info.table()
    full, _ = rw.compress_network_using_projection(model, npca, explained_variance_goal=1.0, verbosity="off")
    torch.testing.assert_close(full(data[0]), model(data[0]), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_naming_the_out_proj_says_which_module_and_why():
    model = _encoder(batch_first=True)
    with pytest.raises(ValueError, match=r"layer_names: 'self_attn.out_proj' cannot be projected: it is the "
                                         r"out_proj of the nn.MultiheadAttention 'self_attn', which uses its "
                                         r"weight functionally"):
        rw.NeuronPCA(model, _sequences(True), layer_names="self_attn.out_proj", verbosity="off")
    with pytest.raises(ValueError, match=r"layer_names: '\*out_proj' matches no layer that can be projected"):
        rw.NeuronPCA(model, _sequences(True), layer_names="*out_proj", verbosity="off")

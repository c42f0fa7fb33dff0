"""nn.MultiheadAttention as a layer kind: its key, value and output maps projected, called as
the attention it replaces; its out_proj is never analysed as a plain Linear."""


import numpy as np
import pytest
import torch
from torch import nn

import rankwise as rw
from conftest import assert_identical, assert_unchanged, state_of
from rankwise.layers.build import project_layer
from rankwise.ranks import RankChoice, measured_options

WIDTH, HEADS, LENGTH, BATCH = 16, 2, 7, 4
FULL = RankChoice("output", None, (WIDTH, WIDTH, WIDTH), 0, 0.0, 0.0)


def _encoder(batch_first: bool, layers: int = 1, **options) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(WIDTH, HEADS, dim_feedforward=48, dropout=0.0, batch_first=batch_first)
    if layers == 1:
        return layer.eval()
    return nn.TransformerEncoder(layer, layers, **{"enable_nested_tensor": False, **options}).eval()


def _sequences(batch_first: bool, count: int = 6, seed: int = 1, width: int = WIDTH) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (BATCH, LENGTH, width) if batch_first else (LENGTH, BATCH, width)
    return [torch.randn(*shape, generator=generator) for _ in range(count)]


def _full_rank(model: nn.Module, data, name: str = "self_attn"):
    npca = rw.NeuronPCA(model, data, verbosity="off")
    layer = model.get_submodule(name)
    options = measured_options(model, npca, {name: layer})[name]
    return layer, project_layer(layer, options, FULL)


class _Cross(nn.Module):
    """Cross-attention with keys and values of other widths, called with keyword arguments."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.attention = nn.MultiheadAttention(WIDTH, 4, kdim=6, vdim=10, batch_first=True)

    def forward(self, query, memory, values):
        return self.attention(query, key=memory, value=values, need_weights=False)[0]


def _cross_batches(count=6):
    generator = torch.Generator().manual_seed(4)
    return [{"query": torch.randn(BATCH, 5, WIDTH, generator=generator),
             "memory": torch.randn(BATCH, LENGTH, 6, generator=generator),
             "values": torch.randn(BATCH, LENGTH, 10, generator=generator)} for _ in range(count)]


MASKS = {
    "none": {},
    "attn_mask": {"attn_mask": torch.triu(torch.ones(LENGTH, LENGTH, dtype=torch.bool), 1)},
    "float attn_mask": {"attn_mask": torch.randn(LENGTH, LENGTH, generator=torch.Generator().manual_seed(5))},
    "key_padding_mask": {"key_padding_mask": torch.arange(LENGTH).expand(BATCH, -1) >= torch.tensor([[7], [5], [3], [6]])},
    "is_causal": {"attn_mask": nn.Transformer.generate_square_subsequent_mask(LENGTH), "is_causal": True},
    "no weights": {"need_weights": False},
    "per-head weights": {"average_attn_weights": False},
    "is_causal without weights": {"attn_mask": nn.Transformer.generate_square_subsequent_mask(LENGTH),
                                  "is_causal": True, "need_weights": False},
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", list(MASKS))
def test_full_rank_computes_the_original_attention_packed_and_unpacked(batch_first, mask):
    model, data = _encoder(batch_first), _sequences(batch_first)
    original, projected = _full_rank(model, data)
    assert isinstance(projected, rw.ProjectedMultiheadAttention)
    unpacked = projected.unpack()
    assert type(unpacked) is nn.MultiheadAttention and rw.count_learnables(unpacked) == rw.count_learnables(original)
    x = data[0]
    with torch.no_grad():
        expected = original(x, x, x, **MASKS[mask])
        for form in (projected, unpacked):
            output, weights = form(x, x, x, **MASKS[mask])
            torch.testing.assert_close(output, expected[0], rtol=1e-5, atol=1e-5)
            if expected[1] is None:
                assert weights is None
            else:
                torch.testing.assert_close(weights, expected[1], rtol=1e-5, atol=1e-5)


def test_unbatched_inputs_and_cross_attention_with_other_key_and_value_widths():
    model, data = _Cross().eval(), _cross_batches()
    original, projected = _full_rank(model, data, "attention")
    batch = data[0]
    with torch.no_grad():
        for form in (projected, projected.unpack()):
            for index in (slice(None), 0):  # batched, then one unbatched sequence
                inputs = [batch[key][index] for key in ("query", "memory", "values")]
                torch.testing.assert_close(form(*inputs)[0], original(*inputs)[0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(form(*inputs)[1], original(*inputs)[1], rtol=1e-5, atol=1e-5)


def test_statistics_are_the_moments_of_the_key_value_and_output_maps():
    model, data = _Cross().eval(), _cross_batches()
    stats = rw.NeuronPCA(model, data, verbosity="off").statistics("attention")
    attention = model.attention
    rows = {name: torch.cat([b[name].reshape(-1, b[name].shape[-1]) for b in data]).double()
            for name in ("memory", "values")}
    with torch.no_grad():
        outputs = torch.cat([model(**b).reshape(-1, WIDTH) for b in data]).double()
    expected = {"key": rows["memory"] @ attention.k_proj_weight.double().T + attention.in_proj_bias[16:32].double(),
                "value": rows["values"] @ attention.v_proj_weight.double().T + attention.in_proj_bias[32:].double(),
                "out": outputs}
    for part, values in expected.items():
        mean, covariance, count = stats.part_moments(part)
        assert count == len(values)
        torch.testing.assert_close(mean, values.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(covariance, torch.cov(values.T, correction=0), rtol=1e-5, atol=1e-6)


def test_padded_key_positions_enter_no_statistic():
    model = _encoder(batch_first=True)
    lengths = [7, 5, 3, 6]
    generator = torch.Generator().manual_seed(6)
    sequences = [torch.randn(length, WIDTH, generator=generator) for length in lengths]
    padded = nn.utils.rnn.pad_sequence(sequences, batch_first=True)
    padding = torch.arange(LENGTH).expand(len(lengths), -1) >= torch.tensor(lengths)[:, None]

    def forward(m, batch):
        return m(batch, src_key_padding_mask=padding)

    together = rw.NeuronPCA(model, [padded], layer_names="self_attn", forward_fn=forward, verbosity="off")
    apart = rw.NeuronPCA(model, [s[None] for s in sequences], layer_names="self_attn", verbosity="off")
    for part in ("key", "value", "out"):
        for a, b in zip(together.statistics("self_attn").part_moments(part),
                        apart.statistics("self_attn").part_moments(part)):
            torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("layers", [1, 2])
def test_an_encoder_compresses_its_attention_at_a_reduction_goal(batch_first, layers):
    model, data = _encoder(batch_first, layers), _sequences(batch_first)
    snapshot = state_of(model)
    npca = rw.NeuronPCA(model, data, verbosity="off")
    attentions = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    assert set(attentions) <= set(npca.layer_names)
    assert not any(name.endswith("out_proj") for name in npca.layer_names)
    net, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.6, verbosity="off")
    assert info.learnables_reduction >= 0.6 and info.learnables_after == rw.count_learnables(net)
    assert info.excluded == []
    for name in attentions:
        layer = info.layers[name]
        assert layer.kind == "attention" and layer.learnables_after == rw.count_learnables(net.get_submodule(name))
        if layer.side != "dense":
            assert net.get_submodule(name).spec()["rank_out"] == list(layer.rank_out)
    assert any(info.layers[name].side != "dense" for name in attentions)
    with torch.no_grad():
        assert net(data[0]).shape == model(data[0]).shape
        plain = rw.unpack_projected_layers(net)
        torch.testing.assert_close(plain(data[0]), net(data[0]), rtol=1e-5, atol=1e-5)
    assert_unchanged(model, snapshot)


def test_the_explained_variance_goal_bounds_the_attention_residual():
    model, data = _encoder(batch_first=True), _sequences(True)
    npca = rw.NeuronPCA(model, data, verbosity="off")
    options = measured_options(model, npca, {"self_attn": model.self_attn})["self_attn"]
    assert np.all(np.diff(options.learnables) > 0) and np.all(np.diff(options.error) < 0)
    assert np.all(np.diff(options.residual) <= 0) and options.residual[-1] == 0
    for goal in (0.2, 0.5):
        _, info = rw.compress_network_using_projection(model, npca, explained_variance_goal=goal,
                                                       layer_names="self_attn", verbosity="off")
        chosen = info.layers["self_attn"]
        assert chosen.explained_variance >= goal - 1e-9
        assert chosen.learnables_after == options.learnables[options.cheapest_within(1 - goal)]


def test_an_encoder_with_a_padding_mask_runs_after_compression_on_its_nested_tensor_path():
    model = _encoder(batch_first=True, layers=2, enable_nested_tensor=True)
    assert model.use_nested_tensor
    data = _sequences(True)
    net, _ = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.6, verbosity="off")
    padding = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    padding[:, 5:] = True
    with torch.no_grad():
        assert net(data[0], src_key_padding_mask=padding).shape == (BATCH, LENGTH, WIDTH)
    assert model.use_nested_tensor  # the original keeps its fast path


@pytest.mark.parametrize("unpack", [False, True])
def test_save_and_load_are_bit_exact(tmp_path, unpack):
    model, data = _encoder(batch_first=True, layers=2), _sequences(True)
    net, _ = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.6, unpack=unpack,
                                                  verbosity="off")
    net = rw.unpack_projected_layers(net) if unpack else net
    rw.save(net, tmp_path / "net.safetensors")
    architecture = _encoder(batch_first=True, layers=2)
    loaded = rw.load(tmp_path / "net.safetensors", model=architecture)
    assert_identical(loaded.eval(), net.eval(), data[1])


def test_the_statistics_save_load_and_merge(tmp_path):
    model, data = _encoder(batch_first=False), _sequences(False)
    npca = rw.NeuronPCA(model, data, verbosity="off")
    npca.save(tmp_path / "npca.pt")
    loaded = rw.NeuronPCA.load(tmp_path / "npca.pt")
    torch.testing.assert_close(loaded.spectrum("self_attn", "output", "key").eigenvalues,
                               npca.spectrum("self_attn", "output", "key").eigenvalues)
    halves = [rw.NeuronPCA(model, part, verbosity="off") for part in (data[:3], data[3:])]
    merged = halves[0].merge(halves[1]).statistics("self_attn")
    for part in ("key", "value", "out"):
        for a, b in zip(merged.part_moments(part), npca.statistics("self_attn").part_moments(part)):
            torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b))


def test_onnx_export_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, data = _encoder(batch_first=True, layers=2), _sequences(True)
    net, _ = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.6, verbosity="off")
    rw.export_onnx(net, tmp_path / "net.onnx", data[0], verbosity="off")
    session = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    (result,) = session.run(["output"], {"input": data[1].numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(result, net(data[1]).numpy(), rtol=1e-4, atol=1e-4)


REFUSED = {
    "add_bias_kv": ({"add_bias_kv": True}, "it has add_bias_kv=True"),
    "add_zero_attn": ({"add_zero_attn": True}, "it has add_zero_attn=True"),
    "bias": ({"bias": False}, r"it has no biases \(bias=False\)"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_is_not_supported_is_refused_with_the_reason(case):
    options, reason = REFUSED[case]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH))
    model.attention = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True, **options)
    with pytest.raises(ValueError, match=f"layer_names: 'attention' cannot be projected: {reason}"):
        rw.NeuronPCA(model, _sequences(True), layer_names="attention", verbosity="off")
    with pytest.raises(ValueError, match="'attention.out_proj' cannot be projected: it is the out_proj of the "
                                         "nn.MultiheadAttention 'attention'.* the attention layer 'attention' "
                                         f"cannot be projected either: {reason}"):
        rw.NeuronPCA(model, _sequences(True), layer_names="attention.out_proj", verbosity="off")


def test_naming_the_out_proj_says_which_module_and_why():
    model = _encoder(batch_first=True)
    with pytest.raises(ValueError, match=r"layer_names: 'self_attn.out_proj' cannot be projected: it is the "
                                         r"out_proj of the nn.MultiheadAttention 'self_attn', which uses its "
                                         r"weight functionally .* project the attention layer 'self_attn' itself"):
        rw.NeuronPCA(model, _sequences(True), layer_names="self_attn.out_proj", verbosity="off")


def test_an_attention_left_out_lists_its_out_proj_as_excluded():
    model, data = _encoder(batch_first=True), _sequences(True)
    net, info = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.2,
                                                     exclude="self_attn", verbosity="off")
    assert info.excluded == ["self_attn", "self_attn.out_proj"] and "self_attn" not in info.layers
    assert isinstance(net.self_attn, nn.MultiheadAttention)
    with torch.no_grad():
        assert net(data[0]).shape == data[0].shape


def test_the_loss_criterion_refuses_attention_layers():
    model, data = _encoder(batch_first=True), _sequences(True)
    with pytest.raises(ValueError, match="criterion: 'loss' .*'self_attn'"):
        rw.compress_network_using_projection(model, data, criterion="loss", loss_fn="mse",
                                             learnables_reduction_goal=0.2, verbosity="off")


def test_the_wrapper_rebuilds_from_its_spec():
    model, data = _encoder(batch_first=True), _sequences(True)
    npca = rw.NeuronPCA(model, data, verbosity="off")
    options = measured_options(model, npca, {"self_attn": model.self_attn})["self_attn"]
    projected = project_layer(model.self_attn, options, RankChoice("output", None, (3, None, 5), 0, 0.0, 0.0))
    rebuilt = rw.ProjectedMultiheadAttention.from_spec(model.self_attn, projected.spec())
    rebuilt.load_state_dict(projected.state_dict())
    x = data[0]
    with torch.no_grad():
        assert torch.equal(rebuilt(x, x, x)[0], projected(x, x, x)[0])
    assert rw.count_learnables(projected) == 272 * 2 + (16 * 3 * 2 + 16) + (16 * 5 * 2 + 16)
    with pytest.raises(ValueError, match="spec: 'rank_out' must list 3 ranks"):
        rw.ProjectedMultiheadAttention.from_spec(model.self_attn, {**projected.spec(), "rank_out": [3]})


def test_the_analysis_report_counts_the_attention_whole():
    model, data = _encoder(batch_first=True), _sequences(True)
    report = rw.analyze(model, data, learnables_reduction_goals=(0.6,), verbosity="off")
    assert "self_attn.out_proj" not in report.layers
    attention = report.layers["self_attn"]
    assert attention.learnables == rw.count_learnables(model.self_attn) and attention.lossless_reduction == 0.0
    assert report.learnables_reduction_range[0] >= 0.0


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_token_mask_keeps_padding_out_of_the_key_and_value_statistics(batch_first):
    model = _encoder(batch_first)
    lengths = [7, 5, 3, 6]
    generator = torch.Generator().manual_seed(7)
    sequences = [torch.randn(length, WIDTH, generator=generator) for length in lengths]
    padded = nn.utils.rnn.pad_sequence(sequences, batch_first=batch_first)
    tokens = torch.arange(LENGTH).expand(len(lengths), -1) < torch.tensor(lengths)[:, None]

    def forward(m, batch):
        with rw.token_mask(tokens):
            return m(batch)

    together = rw.NeuronPCA(model, [padded], layer_names="self_attn", forward_fn=forward, verbosity="off")
    apart = rw.NeuronPCA(model, [s[None] if batch_first else s[:, None] for s in sequences],
                         layer_names="self_attn", verbosity="off")
    for part in ("key", "value"):
        for a, b in zip(together.statistics("self_attn").part_moments(part),
                        apart.statistics("self_attn").part_moments(part)):
            torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-5, atol=1e-6)

"""Hugging Face models: a BERT, a GPT-2 (``Conv1D``, a head tied to the token embedding) and a
Llama-style decoder (gate/up/down MLP, RMSNorm, rotary positions), built from tiny random
configs (nothing downloaded), compressed, unpacked, saved, loaded and exported."""


import pytest
import torch
from torch import nn

import rankwise as rw
from conftest import assert_goal_met_by_the_built_modules, assert_unchanged, state_of
from rankwise.forms import compressed_forms
from rankwise.goals import Goal
from rankwise.projection import Decisions, build_projected
from rankwise.ranks import RankChoice, measured_options
from rankwise.targets import select_layers
from rankwise.ties import tied_pairs

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:layer '.*' was left dense:UserWarning")  # the tie, tested below

VOCAB = 100
CONFIGS = {
    "bert": lambda: transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64,
                                            max_position_embeddings=32),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                            bos_token_id=0, eos_token_id=0),
    "llama": lambda: transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                              max_position_embeddings=32, bos_token_id=0, eos_token_id=0),
}
AUTO = {"bert": "AutoModel", "gpt2": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM"}
KINDS = {"bert": {"embedding", "linear"}, "gpt2": {"embedding", "gpt2_conv1d"}, "llama": {"embedding", "linear"}}


def build(name, seed=0, **overrides):
    """A fresh model of the tiny config ``name`` (the matching Auto class), in eval mode."""
    config = CONFIGS[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return getattr(transformers, AUTO[name]).from_config(config).eval()


def batches(count=4, size=4, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (size, length), generator=generator),
             "attention_mask": torch.ones(size, length, dtype=torch.long)} for _ in range(count)]


def outputs(model, batch):
    with torch.no_grad():
        result = model(**batch)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def calibrated(request):
    model, data = build(request.param), batches()
    return request.param, model, data, rw.NeuronPCA(model, data, verbosity="off")


def test_every_linear_conv1d_and_embedding_is_analysed(calibrated):
    name, model, _, npca = calibrated
    kinds = {module_name: kind for module_name, kind in
             ((n, rw.targets.layer_kind(model.get_submodule(n))) for n in npca.layer_names)}
    assert set(kinds.values()) == KINDS[name]
    dense = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Embedding)
             or type(m).__name__ == "Conv1D"]
    tied = {"gpt2": {"lm_head"}}.get(name, set())  # compressed with its table, under the table's name
    assert set(npca.layer_names) == set(dense) - tied


def full_rank(model, npca, unpack=False, criterion="variance"):
    """Every analysed layer projected at full rank on the bases NeuronPCA found."""
    layers = select_layers(model, npca.layer_names)
    options = measured_options(model, npca, layers, criterion)
    choices = {n: RankChoice("output", None, options[n].output_basis.shape[1], 0, 0.0, 0.0) for n in layers}
    net, _ = build_projected(model, layers, options, Decisions(Goal("explained_variance", 1.0), choices), unpack=unpack)
    assert set(compressed_forms(net)) == set(layers) | set(tied_pairs(model).values())  # a tied head with its table
    return net


def test_every_kind_is_exact_at_full_rank_packed_and_unpacked(calibrated):
    name, model, data, npca = calibrated
    snapshot = state_of(model)
    packed = full_rank(model, npca)
    unpacked = rw.unpack_projected_layers(packed)
    assert not any(isinstance(m, rw.ProjectedLayer) for m in unpacked.modules())
    for net in (packed, unpacked, full_rank(model, npca, unpack=True)):
        for batch in data[:2]:
            torch.testing.assert_close(outputs(net, batch), outputs(model, batch), atol=2e-5, rtol=1e-4)
    assert_unchanged(model, snapshot)


def test_gpt2_is_exact_at_full_rank_in_the_metric_of_the_loss():
    model, data = build("gpt2"), batches()
    npca = rw.NeuronPCA(model, data, loss_fn="kl", forward_fn=lambda m, batch: m(**batch).logits, verbosity="off")
    net = full_rank(model, npca, criterion="loss")  # bases of the whitened R W, the metric undone after
    torch.testing.assert_close(outputs(net, data[0]), outputs(model, data[0]), atol=2e-5, rtol=1e-4)


def test_gpt2_conv1d_unpacks_to_gpt2_layers():
    model, data = build("gpt2"), batches()
    net, info = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.3, verbosity="off")
    conv1d = type(model.transformer.h[0].attn.c_attn)
    projected = {n: m for n, m in net.named_modules() if isinstance(m, rw.layers.ProjectedConv1D)}
    assert projected and set(projected) == set(info.layer_names) - {"transformer.wte"}  # the tied table: test_tied.py
    for form in projected.values():
        plain = form.unpack()
        assert [type(m) for m in plain] == [nn.Linear, conv1d]  # bias-free projection, then a Conv1D
        assert plain[0].bias is None and tuple(plain[1].weight.shape) == (form.rank_out, plain[1].nf)
        x = torch.randn(3, 5, plain[0].in_features)
        torch.testing.assert_close(plain(x), form(x), atol=0, rtol=0)


@pytest.mark.parametrize("goal", [("explained_variance_goal", 0.9), ("learnables_reduction_goal", 0.3)])
def test_goals_are_honoured_and_the_input_model_is_unchanged(calibrated, goal):
    name, model, data, npca = calibrated
    snapshot = state_of(model)
    net, info = rw.compress_network_using_projection(model, npca, **dict([goal]), verbosity="off")
    assert_unchanged(model, snapshot)
    assert info.layer_names and rw.count_learnables(net) < rw.count_learnables(model)
    if goal[0] == "explained_variance_goal":
        assert all(layer.explained_variance >= goal[1] for layer in info.layers.values())
        assert info.learnables_after == rw.count_learnables(net)
    else:
        assert_goal_met_by_the_built_modules(net, info, goal[1], high=1.0)
    assert outputs(net, data[0]).shape == outputs(model, data[0]).shape


def test_gpt2_compresses_its_tied_table_and_head_as_one_unit_and_never_grows():
    model, data = build("gpt2"), batches()
    assert model.lm_head.weight is model.transformer.wte.weight
    net, info = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.3, verbosity="off",
                                                     criterion="variance", allocation="global")
    ends = [net.lm_head, net.transformer.wte]
    assert ends[0].weight is ends[1].weight if info.layers["transformer.wte"].side == "dense" else ends[0].table is ends[1].table
    assert "lm_head" not in info.layers and not info.excluded and not info.warnings
    assert info.learnables_reduction >= 0.3 and rw.count_learnables(net) == info.learnables_after
    with pytest.raises(ValueError, match="layer_names: 'lm_head' cannot be projected: it is the output head tied "
                                         "to 'transformer.wte'"):
        rw.compress_network_using_projection(model, data, layer_names="lm_head", verbosity="off")


def test_the_analysis_report_gives_the_tie_as_the_reason_and_the_infos_compression_gives():
    model, data = build("gpt2"), batches()
    npca = rw.NeuronPCA(model, data, verbosity="off")
    report = rw.analyze(model, npca, learnables_reduction_goals=[0.3], verbosity="off")
    head = report.layers["lm_head"]
    assert not head.projectable and head.reason.startswith("it is the output head tied to 'transformer.wte'")
    _, built = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.3, verbosity="off",
                                                    criterion="variance", allocation="global")
    assert report.goals["learnables_reduction_goal=0.3"] == built


def test_an_untied_gpt2_head_and_token_table_are_compressed():
    model, data = build("gpt2", tie_word_embeddings=False), batches()
    assert model.lm_head.weight is not model.transformer.wte.weight
    net, info = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.3,
                                                     verbosity="off")
    assert {"transformer.wte", "lm_head"} <= set(info.layers) and not info.excluded
    assert_goal_met_by_the_built_modules(net, info, 0.3, high=1.0)


@pytest.mark.parametrize("unpack", [False, True])
def test_save_then_load_on_a_model_from_config_is_bit_exact(calibrated, tmp_path, unpack):
    name, model, data, npca = calibrated
    net, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.3,
                                                     unpack=unpack, verbosity="off")
    rw.save(net, tmp_path / "model.safetensors", info=info)
    loaded = rw.load(tmp_path / "model.safetensors", model=build(name, seed=1))
    assert repr(loaded) == repr(net)
    ours, theirs = loaded.state_dict(), net.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[key].dtype == value.dtype and torch.equal(ours[key], value) for key, value in theirs.items())
    for batch in data[:2]:
        assert torch.equal(outputs(loaded, batch), outputs(net, batch))
    assert rw.count_learnables(loaded) == rw.count_learnables(net)
    if name == "gpt2":  # the tie comes back as one parameter, not two equal copies
        assert loaded.lm_head.weight is loaded.transformer.wte.weight


class LastHidden(nn.Module):
    """A BERT encoder as ``input_ids -> last_hidden_state`` (one tensor in, one out)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids):
        return self.bert(input_ids=input_ids).last_hidden_state


def test_a_compressed_bert_exported_to_onnx_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, data = LastHidden(build("bert")).eval(), batches()
    net, _ = rw.compress_network_using_projection(model, [batch["input_ids"] for batch in data],
                                                  learnables_reduction_goal=0.3, verbosity="off")
    rw.export_onnx(net, tmp_path / "bert.onnx", data[0]["input_ids"], verbosity="off")
    session = ort.InferenceSession(str(tmp_path / "bert.onnx"), providers=["CPUExecutionProvider"])
    for batch in data[1:3]:
        (output,) = session.run(["output"], {"input": batch["input_ids"].numpy()})
        with torch.no_grad():
            expected = net(batch["input_ids"])
        torch.testing.assert_close(torch.from_numpy(output), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, module, reason", [
    ("bert", "embeddings.LayerNorm", "LayerNorm layers are not supported"),
    ("llama", "model.norm", "LlamaRMSNorm layers are not supported"),
    ("llama", "model.layers.0.self_attn", "LlamaAttention layers are not supported"),
])
def test_unsupported_modules_are_refused_with_the_module_and_the_reason(name, module, reason):
    model = build(name)
    snapshot = state_of(model)
    with pytest.raises(ValueError, match=f"layer_names: '{module}' cannot be projected: {reason}"):
        rw.compress_network_using_projection(model, batches(), layer_names=module, verbosity="off")
    assert_unchanged(model, snapshot)

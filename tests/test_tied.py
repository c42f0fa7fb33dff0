"""A token table tied to its output head, compressed as one unit: one factored table ``E ~ A B``
serving the lookup and the head, exact at full rank, kept tied through save, load and ``generate()``,
judged on both ends, and refused with the reason where the tie cannot hold."""

import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import rankwise as rw
from conftest import assert_unchanged, state_of
from rankwise import hf, latency_aware
from rankwise.cli import main
from rankwise.goals import Goal
from rankwise.layers import TiedEmbedding, TiedHead
from rankwise.layers.build import projected_modules
from rankwise.projection import Decisions, build_projected
from rankwise.ranks import RankChoice, measured_options
from rankwise.ranks.tied import _error_curve
from rankwise.targets import select_layers
from rankwise.ties import tied_pairs

transformers = pytest.importorskip("transformers")

WIDTH = 32
TABLES = {"llama": ("model.embed_tokens", "lm_head"), "gpt2": ("transformer.wte", "lm_head")}


def build(name, vocab=120, seed=0):
    """A tiny random tied causal LM: a Llama with grouped-query attention (4 query heads, 2 key/value
    heads), or a GPT-2."""
    torch.manual_seed(seed)
    if name == "llama":
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=WIDTH, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def batches(vocab=120, count=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (4, 16), generator=generator),
             "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(count)]


def table_at(model, npca, rank, criterion="variance"):
    """``model`` with only its tied table (and so its head) factored at ``rank``, and the options."""
    table, _ = next(iter(tied_pairs(model).items()))
    layers = select_layers(model, table)
    options = measured_options(model, npca, layers, criterion)
    choices = {table: RankChoice("output", None, rank, 0, 0.0, 0.0)}
    net, info = build_projected(model, layers, options, Decisions(Goal("explained_variance", 1.0), choices))
    return net, options[table]


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module", params=sorted(TABLES))
def calibrated(request):
    model, data = build(request.param), batches()
    npca = rw.NeuronPCA(model, data, verbosity="off", forward_fn=lambda m, b: m(**b).logits, loss_fn="kl")
    return request.param, model, data, npca


@pytest.mark.parametrize("criterion", ["variance", "loss"])
def test_full_rank_is_exact_on_both_ends_and_generates_the_same_continuation(calibrated, criterion):
    name, model, data, npca = calibrated
    snapshot = state_of(model)
    net, options = table_at(model, npca, WIDTH, criterion)
    table, head = TABLES[name]
    assert isinstance(net.get_submodule(table), TiedEmbedding) and isinstance(net.get_submodule(head), TiedHead)
    assert net.get_input_embeddings().table is net.get_output_embeddings().table  # one tensor, both ends
    assert net.get_input_embeddings().basis is net.get_output_embeddings().basis
    assert rw.count_learnables(net) == rw.count_learnables(model) + WIDTH * WIDTH  # V d + d d at r = d
    torch.testing.assert_close(logits(net, data[0]), logits(model, data[0]), atol=1e-5, rtol=1e-4)
    prompt = torch.tensor([[5, 9, 12, 7]])
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(net.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0),
                       expected)
    assert_unchanged(model, snapshot)


def test_save_and_load_keep_one_tensor_serving_both_ends(calibrated, tmp_path, capsys):
    name, model, data, npca = calibrated
    net, _ = table_at(model, npca, 7)
    rw.save(net, tmp_path / "tied.safetensors", metadata=hf.hf_metadata(model))
    assert main(["info", str(tmp_path / "tied.safetensors")]) == 0
    assert re.search(r"TiedHead +wrapper +projection \(output\) +in -, out 7", capsys.readouterr().out)
    for loaded in (rw.load(tmp_path / "tied.safetensors", model=build(name, seed=1)),
                   hf.load_compressed(tmp_path / "tied.safetensors")):
        embeddings, head = loaded.get_input_embeddings(), loaded.get_output_embeddings()
        assert isinstance(embeddings, TiedEmbedding) and embeddings.rank == 7
        assert head.table is embeddings.table and head.basis is embeddings.basis
        assert rw.count_learnables(loaded) == rw.count_learnables(net)  # the table counted once
        torch.testing.assert_close(logits(loaded, data[1]), logits(net, data[1]), atol=0, rtol=0)
        prompt = torch.tensor([[3, 4, 5]])
        assert torch.equal(loaded.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0),
                           net.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0))


def test_the_variance_error_is_the_measured_error_of_both_ends(calibrated):
    """The variance criterion's error of a rank is the fraction of the looked-up rows' energy lost
    plus the fraction of the logits' energy lost, measured on the calibration batches."""
    name, model, data, npca = calibrated
    table, head = TABLES[name]
    _, options = table_at(model, npca, 1)
    index = len(options.rank_out) // 2
    net, _ = table_at(model, npca, int(options.rank_out[index]))
    inputs = []
    hook = model.get_submodule(head).register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
    for batch in data:
        logits(model, batch)
    hook.remove()
    x = torch.cat(inputs).reshape(-1, WIDTH).double()
    tokens = torch.cat([b["input_ids"] for b in data]).reshape(-1)
    dense, factored = model.get_submodule(table).weight.double(), net.get_submodule(table)
    compressed = (factored.table @ factored.basis).double()
    lookup = ((dense - compressed)[tokens].square().sum() / dense[tokens].square().sum()).item()
    logit = ((x @ (dense - compressed).T).square().sum() / (x @ dense.T).square().sum()).item()
    assert options.error[index] == pytest.approx(lookup + logit, rel=1e-6)
    assert options.residual[index] == pytest.approx((lookup + logit) / 2, rel=1e-6)


def test_the_error_curve_is_the_trace_formula():
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 6, generator=generator, dtype=torch.float64), torch.randn(6, 9, generator=generator,
                                                                                    dtype=torch.float64)
    k, s = a @ a.T, b @ b.T
    basis = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))[0]
    curve = _error_curve(basis, k, s)
    for rank in range(1, 7):
        rest = torch.eye(6, dtype=torch.float64) - basis[:, :rank] @ basis[:, :rank].T
        assert curve[rank - 1] == pytest.approx(float(torch.trace(k @ rest @ s @ rest)), abs=1e-9)


def test_twenty_percent_of_all_learnables_of_a_tied_model_keeps_the_tie():
    """The table is 80% of this model's learnables: the goal cannot be met without it."""
    model, data = build("llama", vocab=2000), batches(vocab=2000, count=8)
    net, info = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.2, verbosity="off")
    assert info.goal_reached and info.learnables_reduction >= 0.2
    assert rw.count_learnables(net) == info.learnables_after <= 0.8 * rw.count_learnables(model)
    assert info.layers["model.embed_tokens"].side == "output" and "lm_head" not in info.layers
    assert net.get_input_embeddings().table is net.get_output_embeddings().table


class _ThreeEnds(nn.Module):
    """A table read by two heads (three modules on one tensor)."""

    def __init__(self):
        super().__init__()
        self.emb, self.body = nn.Embedding(40, 8), nn.Linear(8, 8)
        self.head, self.other = nn.Linear(8, 40, bias=False), nn.Linear(8, 40, bias=False)
        self.head.weight = self.other.weight = self.emb.weight

    def forward(self, ids):
        hidden = torch.tanh(self.body(self.emb(ids)))
        return self.head(hidden) + self.other(hidden)


def test_a_tie_that_cannot_hold_is_left_dense_with_the_reason():
    model, data = _ThreeEnds(), [torch.randint(0, 40, (4, 10)) for _ in range(4)]
    assert tied_pairs(model) == {}
    with pytest.warns(UserWarning, match="'emb' was left dense: .*3 modules share the tensor"):
        net, info = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.1, verbosity="off",
                                                         criterion="variance", allocation="global")
    assert net.head.weight is net.emb.weight is net.other.weight and info.layer_names == ["body"]
    model.emb.max_norm, model.other = 1.0, None  # now a pair, but a renormalising table
    model.forward = lambda ids: model.head(torch.tanh(model.body(model.emb(ids))))
    with pytest.raises(ValueError, match="'head' cannot be projected: .*the table cannot be projected: it "
                                         "renormalises"):
        rw.NeuronPCA(model, data, layer_names="head", verbosity="off")


def test_excluding_one_end_leaves_the_pair_dense_or_is_refused_and_the_model_untouched():
    model, data = build("gpt2"), batches()
    snapshot = state_of(model)
    with pytest.warns(UserWarning, match="'transformer.wte' was left dense: its tied head 'lm_head' was excluded"):
        net, info = rw.compress_network_using_projection(model, data, exclude="lm_head", learnables_reduction_goal=0.2,
                                                         verbosity="off", criterion="variance", allocation="global")
    assert "transformer.wte" in info.excluded and net.lm_head.weight is net.transformer.wte.weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # excluding the table itself: the pair stays dense, nothing to warn of
        net, info = rw.compress_network_using_projection(model, data, exclude="transformer.wte", verbosity="off",
                                                         learnables_reduction_goal=0.2, criterion="variance",
                                                         allocation="global")
    assert info.excluded == ["transformer.wte"] and net.lm_head.weight is net.transformer.wte.weight
    with pytest.raises(ValueError, match="exclude: 'lm_head' is the output head tied to 'transformer.wte', which "
                                         "layer_names names"):
        rw.compress_network_using_projection(model, data, layer_names=["transformer.wte", "transformer.h.*"],
                                             exclude="lm_head", verbosity="off")
    with pytest.raises(ValueError, match="correction: the sequential correction .*'transformer.wte' is a token table"):
        rw.compress_network_using_projection(model, data, correction="sequential", verbosity="off")
    assert_unchanged(model, snapshot)


def test_the_factored_ends_export_as_dense_layers():
    model, data = build("gpt2"), batches()
    net, _ = table_at(model, rw.NeuronPCA(model, data, verbosity="off"), 5)
    embeddings, head = net.get_input_embeddings(), net.get_output_embeddings()
    ids, x = data[0]["input_ids"], torch.randn(3, WIDTH)
    torch.testing.assert_close(embeddings.to_dense()(ids), embeddings(ids), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(head.to_dense()(x), head(x), atol=1e-5, rtol=1e-5)
    assert np.isclose(rw.count_learnables(net), rw.count_learnables(model) - 120 * WIDTH + 5 * (120 + WIDTH))


def test_a_tied_table_is_timed_at_both_ends(calibrated, monkeypatch):
    name, model, data, npca = calibrated
    table, head = TABLES[name]
    monkeypatch.setattr(latency_aware, "time_layer", lambda module, call: float(rw.count_learnables(module)))
    layers = {table: model.get_submodule(table)}
    calls = latency_aware.record_layer_calls(model, layers, data[0])
    assert set(calls) == {table, head}
    options = measured_options(model, npca, layers)[table]
    dense, factored = options.choice(options.dense_index), options.choice(0)
    assert latency_aware.form_seconds(model, table, layers[table], options, dense, calls) == (
        rw.count_learnables(layers[table]) + rw.count_learnables(model.get_submodule(head)))
    ends = projected_modules(model, table, layers[table], options, factored)
    assert set(ends) == {table, head}
    assert latency_aware.form_seconds(model, table, layers[table], options, factored, calls) == sum(
        rw.count_learnables(module) for module in ends.values())

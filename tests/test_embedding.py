"""nn.Embedding as a layer kind: a Linear on one-hot tokens; tied weights are refused."""

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.layers.build import project_layer
from rankwise.ranks import RankChoice


class _Bag(nn.Module):
    def __init__(self, vocabulary=60, dim=16):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc = nn.Embedding(vocabulary, dim, padding_idx=0), nn.Linear(dim, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))


def _tokens(count=4, vocabulary=60):
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocabulary, (8, 12), generator=generator) for _ in range(count)]


def test_statistics_are_those_of_a_linear_layer_on_one_hot_tokens():
    model, data = _Bag(), _tokens()
    linear = nn.Linear(60, 16, bias=False)
    with torch.no_grad():
        linear.weight.copy_(model.emb.weight.T)
    one_hot = [nn.functional.one_hot(ids, 60).float() for ids in data]
    table = rw.NeuronPCA(model, data, layer_names="emb", verbosity="off").statistics("emb")
    dense = rw.NeuronPCA(nn.Sequential(linear), one_hot, verbosity="off").statistics("0")
    for field in ("count", "sum", "square_sum"):
        torch.testing.assert_close(getattr(table.input, field), getattr(dense.input, field))
    torch.testing.assert_close(table.output.outer, dense.output.outer)
    torch.testing.assert_close(table.weight_gram_output, dense.weight_gram_output)


def test_the_projected_table_is_exact_at_full_rank_and_counts_its_learnables():
    model, data = _Bag(), _tokens()
    npca = rw.NeuronPCA(model, data, verbosity="off")
    options = rw.ranks.measured_options(model, npca, {"emb": model.emb})["emb"]
    full = project_layer(model.emb, options, RankChoice("output", None, 16, 0, 0.0, 0.0))
    torch.testing.assert_close(full(data[0]), model.emb(data[0]))
    net, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.3,
                                                     verbosity="off")
    assert isinstance(net.emb, rw.ProjectedEmbedding) and info.layers["emb"].kind == "embedding"
    rank = info.layers["emb"].rank_out
    assert info.layers["emb"].learnables_after == 60 * rank + 16 * (rank + 1) == rw.count_learnables(net.emb)
    assert info.learnables_after == rw.count_learnables(net)
    plain = rw.unpack_projected_layers(net)
    torch.testing.assert_close(plain(data[1]), net(data[1]))


def test_an_embedding_that_renormalises_its_rows_is_refused():
    model = _Bag()
    model.emb.max_norm = 1.0
    with pytest.raises(ValueError, match="layer_names: 'emb' cannot be projected: it renormalises"):
        rw.NeuronPCA(model, _tokens(), layer_names="emb", verbosity="off")


class _TiedLanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.emb, self.body = nn.Embedding(60, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 60, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.emb(ids))))


def test_a_tied_embedding_and_head_are_one_candidate_named_by_the_table():
    model = _TiedLanguageModel()
    npca = rw.NeuronPCA(model, _tokens(), verbosity="off")
    assert npca.layer_names == ["emb", "body"]  # the head goes with its table (tests/test_tied.py)
    net, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.3,
                                                     verbosity="off", criterion="variance", allocation="global")
    assert rw.count_learnables(net) <= rw.count_learnables(model) and info.learnables_reduction >= 0.3
    with pytest.raises(ValueError, match="'head' cannot be projected: it is the output head tied to 'emb'"):
        rw.compress_network_using_projection(model, npca, layer_names="head", verbosity="off")


def test_save_load_and_onnx_of_a_projected_table(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model, data = _Bag(), _tokens()
    net, info = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.3, verbosity="off")
    rw.save(net, tmp_path / "bag.safetensors", info=info)
    loaded = rw.load(tmp_path / "bag.safetensors", model=_Bag())
    assert isinstance(loaded.emb, rw.ProjectedEmbedding)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())
    torch.testing.assert_close(loaded(data[0]), net(data[0]), rtol=0, atol=0)
    rw.export_onnx(net, tmp_path / "bag.onnx", data[0], verbosity="off")
    session = onnxruntime.InferenceSession(str(tmp_path / "bag.onnx"))
    (output,) = session.run(None, {"input": data[1].numpy()})
    torch.testing.assert_close(torch.from_numpy(output), net(data[1]).detach(), atol=1e-5, rtol=1e-4)


def test_the_loss_criterion_judges_a_table_in_its_fisher_metric():
    model, data = _Bag(), _tokens()
    npca = rw.NeuronPCA(model, data, verbosity="off", loss_fn="kl")
    net, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.3,
                                                     criterion="loss", verbosity="off")
    assert info.layers["emb"].space == "fisher" and info.learnables_after == rw.count_learnables(net)
    options = rw.ranks.measured_options(model, npca, {"emb": model.emb}, criterion="loss")["emb"]
    full = project_layer(model.emb, options, RankChoice("output", None, 16, 0, 0.0, 0.0))
    torch.testing.assert_close(full(data[0]), model.emb(data[0]), atol=1e-5, rtol=1e-5)

"""Padded batches: padding positions never enter a statistic (rankwise.masks).

A tiny random float64 BERT, built locally, calibrated on one padded batch of 32 sentences of
varied lengths gathers the same moments as on the same sentences one at a time.
"""

import copy

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.correction import paired_moments
from rankwise.masks import active_mask, token_rows
from rankwise.statistics.dense import channel_rows

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::rankwise.ThinDataWarning")

SHARED_BY_THE_BATCH = "embeddings.position_embeddings"  # looked up once as (1, T) for a whole batch


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    return transformers.BertModel(config).double().eval()


@pytest.fixture(scope="module")
def sentences():
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 19, (32,), generator=generator).tolist()
    return [torch.randint(1, 100, (n,), generator=generator) for n in lengths]


def padded(sentences):
    """``(input_ids, attention_mask)`` of ``sentences`` padded with token 0 to the longest."""
    ids = torch.zeros(len(sentences), max(len(s) for s in sentences), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, sentence in enumerate(sentences):
        ids[i, :len(sentence)] = sentence
        mask[i, :len(sentence)] = 1
    return ids, mask


def one_at_a_time(sentences):
    return [{"input_ids": s[None]} for s in sentences]


@pytest.fixture(scope="module")
def expected(bert, sentences):
    """The statistics of the sentences one at a time, unpadded, gradients of "mse" included."""
    return rw.NeuronPCA(bert, one_at_a_time(sentences), verbosity="off", loss_fn="mse", validation=None)


def as_dict_batch(sentences):
    ids, mask = padded(sentences)
    return [{"input_ids": ids, "attention_mask": mask}]


def assert_same_moments(got, expected, what):
    """Every moment equal to 1e-10 relative: ``count``, ``square_sum`` and ``outer`` to their own
    size, ``sum`` to its bound ``sqrt(count * square_sum)`` (Cauchy-Schwarz; the sum of a key's
    gradients over the tokens is zero up to round-off, softmax being shift-invariant)."""
    scale = (expected.count * expected.square_sum).sqrt()
    pairs = {"count": (got.count, expected.count, expected.count),
             "square_sum": (got.square_sum, expected.square_sum, expected.square_sum),
             "sum": (got.sum, expected.sum, scale)}
    if expected.outer is not None:
        pairs["outer"] = (got.outer, expected.outer, expected.outer.norm())
    for name, (a, b, size) in pairs.items():
        assert float((a - b).norm()) <= 1e-10 * float(size), f"{what}: {name}"


def assert_same_statistics(got, expected):
    assert got.layer_names == expected.layer_names
    for name in expected.layer_names:
        for side in ("input", "output"):
            assert_same_moments(got._stats[name].moments(side), expected._stats[name].moments(side), f"{name} {side}")


def test_padded_batch_gathers_the_statistics_of_the_sentences_one_at_a_time(bert, sentences, expected):
    got = rw.NeuronPCA(bert, as_dict_batch(sentences), verbosity="off")
    assert len(expected.layer_names) == 16  # 3 embeddings, 6 Linear layers per block, the pooler
    assert_same_statistics(got, expected)
    tokens = sum(len(s) for s in sentences)
    words = got._stats["embeddings.word_embeddings"].input
    assert int(words.count) == tokens
    torch.testing.assert_close(words.sum, torch.bincount(torch.cat(sentences), minlength=100).double())
    positions = got._stats[SHARED_BY_THE_BATCH].input.sum  # once per sentence reaching a position
    reaching = torch.tensor([sum(len(s) > t for s in sentences) for t in range(512)]).double()
    torch.testing.assert_close(positions, reaching)
    assert int(got._stats["pooler.dense"].input.count) == len(sentences)  # (N, D): taken whole


def test_padded_batch_gathers_the_gradient_statistics_of_the_sentences_one_at_a_time(bert, sentences, expected):
    # The "mse" probe draws its noise for the real tokens only, in reading order; with 32 channels
    # (a multiple of the 16 normal draws torch's CPU generator makes at a time) the padded batch
    # therefore draws exactly the noise of the sentences one at a time.
    got = rw.NeuronPCA(bert, as_dict_batch(sentences), verbosity="off", loss_fn="mse")
    assert got.gradient_samples == expected.gradient_samples == len(sentences)
    assert_same_statistics(got, expected)
    per_token = [name for name in expected.layer_names if name != SHARED_BY_THE_BATCH]
    for name in per_token:
        assert_same_moments(got._gradients[name], expected._gradients[name], f"{name} gradient")
    # a table shared by the batch has one gradient per position: the sum of its sentences'
    assert int(got._gradients[SHARED_BY_THE_BATCH].count) == max(len(s) for s in sentences)


def test_forward_fn_with_token_mask_gathers_the_same_statistics(bert, sentences, expected):
    def forward_fn(model, batch):
        ids, mask = batch
        with rw.token_mask(mask):
            return model(input_ids=ids, attention_mask=mask)

    got = rw.NeuronPCA(bert, [padded(sentences)], verbosity="off", forward_fn=forward_fn, loss_fn="mse")
    assert_same_statistics(got, expected)
    for name in expected.layer_names:
        if name != SHARED_BY_THE_BATCH:
            assert_same_moments(got._gradients[name], expected._gradients[name], f"{name} gradient")


def test_sequential_correction_pairs_the_rows_of_real_tokens_only(bert, sentences):
    compressed = copy.deepcopy(bert)
    with torch.no_grad():
        compressed.encoder.layer[0].intermediate.dense.weight.mul_(0.5)
    name = "encoder.layer.1.attention.self.query"
    expected = paired_moments(bert, compressed, name, one_at_a_time(sentences))
    got = paired_moments(bert, compressed, name, as_dict_batch(sentences))
    assert got.count == expected.count == sum(len(s) for s in sentences)
    for a, b in ((got.cross, expected.cross), (got.gram, expected.gram)):
        assert float((a - b).norm()) <= 1e-10 * float(b.norm())


def test_a_mask_of_the_wrong_shape_is_refused_with_the_fix(bert, sentences):
    ids, mask = padded(sentences[:4])

    def transposed(model, batch):
        with rw.token_mask(mask.T):
            return model(input_ids=ids, attention_mask=mask)

    hooks = len(bert.embeddings.word_embeddings._forward_hooks)
    with pytest.raises(ValueError, match=r"mask: the token mask of shape \(\d+, 4\) fits none .*give the "
                                         r"\(batch, tokens\) mask"):
        rw.NeuronPCA(bert, [None], verbosity="off", forward_fn=transposed)
    assert len(bert.embeddings.word_embeddings._forward_hooks) == hooks and not bert.training
    encoder = nn.Linear(6, 2)  # reads the batch's features, not its mask
    batch = {"input": torch.randn(4, 7, 6), "attention_mask": mask[:, :5]}
    with pytest.raises(ValueError, match=r"data: batch 0: attention_mask: the token mask of shape \(4, 5\) "
                                         r"fits none of the activations the hooks saw \(shapes \(4, 7, 6\)"):
        rw.NeuronPCA(encoder, [batch], verbosity="off", forward_fn=lambda model, b: model(b["input"]))
    def unmasked(model, b):
        with rw.token_mask(None):
            return model(b["input"])

    npca = rw.NeuronPCA(encoder, [batch], verbosity="off", forward_fn=unmasked)  # the fix: no mask
    assert int(npca._stats[""].output.count) == 4 * 7
    with pytest.raises(ValueError, match="mask: a token mask holds 1 for a token and 0 for padding"):
        with rw.token_mask(mask * 2.5):
            pass
    with pytest.raises(ValueError, match=r"mask: expected a tensor of shape \(batch, tokens\)"):
        with rw.token_mask([[1, 0]]):
            pass


class Tagger(nn.Module):
    """Token features (N, T, 6) -> a Linear per token, a Conv1d over time, a pooled head."""

    def __init__(self):
        super().__init__()
        self.token = nn.Linear(6, 5)
        self.mix = nn.Conv1d(5, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, features, attention_mask):
        h = self.token(features)                                      # (N, T, 5)
        h = self.mix(h.transpose(1, 2))                                # (N, 4, T)
        weights = attention_mask[:, None, :].to(h.dtype)
        return self.head((h * weights).sum(-1) / weights.sum(-1))     # (N, 4) -> (N, 3)


def test_activations_without_token_dimensions_are_taken_whole():
    torch.manual_seed(0)
    model = Tagger()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    batch = {"features": torch.randn(3, 5, 6), "attention_mask": mask}
    npca = rw.NeuronPCA(model, [batch], verbosity="off")
    assert int(npca._stats["token"].output.count) == int(mask.sum())  # (N, T, D): real tokens only
    assert int(npca._stats["mix"].output.count) == mask.numel()        # a convolution: whole
    assert int(npca._stats["head"].output.count) == len(mask)          # pooled (N, D): whole
    real = batch["features"][mask.bool()]
    torch.testing.assert_close(npca._stats["token"].output.sum,
                               model.token(real).sum(0).double().detach())


def test_token_rows_selects_leading_token_dimensions_and_leaves_the_rest_whole():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    with rw.token_mask(mask) as active:
        x = torch.arange(2 * 3 * 4.).reshape(2, 3, 4)
        torch.testing.assert_close(token_rows(x, active), x[mask.bool()])
        shared = torch.arange(3 * 4.).reshape(1, 3, 4)                  # (1, T, d): once per sentence
        torch.testing.assert_close(token_rows(shared, active), shared[0, [0, 1, 0]])
        for whole in (torch.ones(2, 4), torch.ones(2, 7, 4), torch.ones(2, 1, 4)):
            assert token_rows(whole, active) is whole
        conv = nn.Conv1d(4, 4, 1)
        assert channel_rows(torch.ones(2, 4, 3), conv, active).shape == (6, 4)
    assert active_mask() is None

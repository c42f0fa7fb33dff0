"""Block-by-block calibration: the moments of a whole-model pass, the model untouched, refusals."""

import threading
from dataclasses import fields

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

import rankwise as rw
from conftest import assert_unchanged, make_batches, state_of
from rankwise.moments import Moments

VOCAB = 50
pytestmark = pytest.mark.filterwarnings("ignore::rankwise.ThinDataWarning")  # tiny calibration sets


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32)
    return BertModel(config).double().eval()


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32,
                         use_cache=False)  # a key/value cache cannot move between devices
    return LlamaModel(config).double().eval()


def token_batches(count=5, seed=0):
    """Hugging Face batches whose attention masks pad some sequences (the kwargs matter)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        mask = torch.ones(3, 12, dtype=torch.long)
        mask[1, 8:] = 0
        batches.append({"input_ids": torch.randint(0, VOCAB, (3, 12), generator=generator),
                        "attention_mask": mask})
    return batches


class Block(nn.Module):
    """A residual MLP block whose forward takes a keyword argument."""

    def __init__(self, width=8):
        super().__init__()
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x, scale=1.0):
        return x + scale * self.down(torch.tanh(self.up(x)))


class Stack(nn.Module):
    """Embedding, blocks called with a different keyword each and code between them, a head."""

    def __init__(self, depth=3):
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        for index, block in enumerate(self.blocks):
            h = torch.relu(block(h, scale=0.5 + index)) * 1.5
        return self.head(h)


def stack():
    torch.manual_seed(0)
    return Stack().double().eval()


def sequential():
    torch.manual_seed(0)
    return nn.Sequential(*(Block() for _ in range(4))).double().eval()


def double_batches(shape):
    return [batch.double() for batch in make_batches(shape, count=4)]


def moment_pairs(first, second):
    """Every tensor of every Moments (and weight Gram) of two NeuronPCA, pair by pair."""
    assert first.layer_names == second.layer_names
    for name in first.layer_names:
        a, b = first.statistics(name), second.statistics(name)
        for field in fields(a):
            left, right = getattr(a, field.name), getattr(b, field.name)
            if isinstance(left, Moments):
                yield from ((f"{name}.{field.name}.{t}", getattr(left, t), getattr(right, t))
                            for t in ("count", "sum", "square_sum", "outer") if getattr(left, t) is not None)
            elif isinstance(left, torch.Tensor):
                yield f"{name}.{field.name}", left, right


def assert_same_moments(first, second):
    pairs = list(moment_pairs(first, second))
    assert pairs
    for key, left, right in pairs:
        assert left.dtype == torch.float64 and left.device == right.device == torch.device("cpu")
        torch.testing.assert_close(right, left, rtol=1e-10, atol=1e-10 * float(left.abs().max()), msg=key)


CASES = {
    "bert": (tiny_bert, token_batches, "auto"),
    "llama": (tiny_llama, token_batches, "auto"),
    "stack": (stack, lambda: double_batches((6, 5)), "blocks.*"),
    "sequential": (sequential, lambda: double_batches((6, 8)), ["0", "1", "2", "3"]),
}


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: blocks moving between devices")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_blockwise_moments_equal_whole_model(case, device):
    factory, data_factory, blocks = CASES[case]
    model, data = factory(), data_factory()
    snapshot = state_of(model)
    whole = rw.NeuronPCA(model, data, verbosity="off")
    blockwise = rw.NeuronPCA(model, data, verbosity="off", blocks=blocks, device=device)
    assert blockwise.num_batches == whole.num_batches == len(data)
    assert_same_moments(whole, blockwise)
    assert_unchanged(model, snapshot)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not model.training


@pytest.mark.parametrize("case", ["bert", "llama"])
def test_compressed_models_identical(case):
    factory, data_factory, blocks = CASES[case]
    model, data = factory(), data_factory()
    compressed = [rw.compress_network_using_projection(
        model, rw.NeuronPCA(model, data, verbosity="off", blocks=choice), explained_variance_goal=0.9,
        verbosity="off")[0] for choice in (None, blocks)]
    first, second = (c.state_dict() for c in compressed)
    assert repr(compressed[0]) == repr(compressed[1])
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_auto_finds_the_transformer_layers():
    from rankwise.blockwise import resolve_blocks

    assert list(resolve_blocks(tiny_bert(), "auto")) == [f"encoder.layer.{i}" for i in range(3)]
    assert list(resolve_blocks(tiny_llama(), "auto")) == [f"layers.{i}" for i in range(3)]
    assert list(resolve_blocks(sequential(), "auto")) == ["0", "1", "2", "3"]
    # a pattern keeps the outermost modules it matches
    assert list(resolve_blocks(stack(), "blocks.*")) == ["blocks.0", "blocks.1", "blocks.2"]


def test_head_and_embeddings_are_calibrated():
    model, data = stack(), double_batches((6, 5))
    npca = rw.NeuronPCA(model, data, verbosity="off", blocks="auto")
    assert {"embed", "head"} <= set(npca.layer_names)
    assert int(npca.statistics("head").output.count) == 4 * 6


def test_max_batches_and_layer_selection():
    model, data = stack(), double_batches((6, 5))
    whole = rw.NeuronPCA(model, data, verbosity="off", max_batches=2, layer_names="blocks.1.*")
    blockwise = rw.NeuronPCA(model, data, verbosity="off", max_batches=2, layer_names="blocks.1.*",
                             blocks="auto")
    assert blockwise.num_batches == 2
    assert_same_moments(whole, blockwise)


class Shared(nn.Module):
    """One block called twice per forward."""

    def __init__(self):
        super().__init__()
        self.first, self.second = Block(), Block()

    def forward(self, x):
        return self.second(self.first(self.first(x)))


class Reversed(nn.Module):
    """Blocks called in the reverse of their order in the model."""

    def __init__(self):
        super().__init__()
        self.late, self.early = Block(), Block()

    def forward(self, x):
        return self.late(self.early(x))


class Skipping(nn.Module):
    """The second block is never called."""

    def __init__(self):
        super().__init__()
        self.first, self.unused = Block(), Block()

    def forward(self, x):
        return self.first(x)


@pytest.mark.parametrize("model, blocks, message", [
    (Shared(), ["first", "second"], "was called where block 'second' was expected"),
    (Reversed(), ["early", "late"], "'early' was called where block 'late' was expected"),
    (Skipping(), ["first", "unused"], "block 'unused' was not called"),
])
def test_blocks_out_of_order_are_refused_and_the_model_left_as_it_was(model, blocks, message):
    model = model.double().eval().train()
    snapshot, threads = state_of(model), threading.active_count()
    with pytest.raises(ValueError, match=f"blocks: .*{message}"):
        rw.NeuronPCA(model, double_batches((6, 8)), verbosity="off", blocks=blocks)
    assert_unchanged(model, snapshot)
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert threading.active_count() == threads


def test_a_failing_batch_names_data_and_leaves_no_thread():
    model, threads = sequential(), threading.active_count()
    data = double_batches((6, 8)) + [torch.zeros(6, 3, dtype=torch.float64)]
    with pytest.raises(ValueError, match="data: the model rejected batch 4"):
        rw.NeuronPCA(model, data, verbosity="off", blocks="auto")
    assert threading.active_count() == threads
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_non_finite_activations_are_reported():
    model = sequential()
    data = double_batches((6, 8))
    data[2][0, 0] = float("nan")
    with pytest.raises(rw.NonFiniteActivationError, match="batch 2"):
        rw.NeuronPCA(model, data, verbosity="off", blocks="auto")


@pytest.mark.parametrize("kwargs, message", [
    (dict(blocks="auto", loss_fn="mse"), "blocks: block-by-block calibration cannot gather"),
    (dict(device="cpu"), "device: .*pass blocks='auto'"),
    (dict(blocks="auto", device="nowhere"), "device: 'nowhere' is not a torch device"),
    (dict(blocks="missing.*"), "blocks: 'missing.\\*' matches no layer"),
    (dict(blocks="nothing"), "blocks: 'nothing' is not a layer of the model"),
])
def test_refusals(kwargs, message):
    model = stack()
    snapshot = state_of(model)
    with pytest.raises(ValueError, match=message):
        rw.NeuronPCA(model, double_batches((6, 5)), verbosity="off", **kwargs)
    assert_unchanged(model, snapshot)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(ValueError, match="device: CUDA is not available"):
        rw.NeuronPCA(stack(), double_batches((6, 5)), verbosity="off", blocks="auto", device="cuda")


def test_a_model_without_weights_is_refused():
    with torch.device("meta"):
        model = Stack()
    with pytest.raises(ValueError, match="blocks: block 'blocks.0' is on the meta device"):
        rw.NeuronPCA(model, [torch.zeros(6, 5, device="meta")], verbosity="off", blocks="auto")


def test_auto_without_a_stack_is_refused():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match="blocks: 'auto' found no nn.ModuleList"):
        rw.NeuronPCA(model, make_batches((6, 4)), verbosity="off", blocks="auto")


def test_empty_data_is_refused():
    with pytest.raises(ValueError, match="data: the iterable yielded no batch"):
        rw.NeuronPCA(stack(), [], verbosity="off", blocks="auto")


@NEEDS_CUDA
def test_a_cache_is_refused_on_another_device():
    model = tiny_llama()
    with pytest.raises(ValueError, match="use_cache=False"):
        rw.NeuronPCA(model, [{**b, "use_cache": True} for b in token_batches(2)], verbosity="off",
                     blocks="auto", device="cuda")

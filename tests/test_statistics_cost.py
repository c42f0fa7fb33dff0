"""The cheaper statistics: a Linear layer's output moments derived from its input's Gram, one
Gram for layers sharing an input, small calls' rows buffered into larger products, the
float32-per-batch precision, copy-free convolution Grams."""

import pytest
import torch
from torch import nn

import rankwise as rw
import rankwise.moments
from rankwise.moments import Moments
from rankwise.statistics import from_plain, moment_tensors, statistics_for, to_plain
from rankwise.statistics.dense import SharedInputs, sharing_inputs

ONE_PASS = dict(verbosity="off", validation=None, loss_fn=None)
"""One calibration pass, nothing held out and no gradients: the pass these tests count."""

UNIT_ROUNDOFF = 2.0 ** -24


class Siblings(nn.Module):
    """q, k and v read the same tensor; a wide layer reads their sum; out narrows it again."""

    def __init__(self, width=6, wide=14, separate=False, modify_between=False):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.wide = nn.Linear(width, wide)
        self.out = nn.Linear(wide, 3, bias=False)
        self.separate, self.modify_between = separate, modify_between

    def forward(self, x):
        read = (lambda t: t.clone()) if self.separate else (lambda t: t)
        q = self.q(read(x))
        if self.modify_between:
            x.mul_(2.0)
        k, v = self.k(read(x)), self.v(read(x))
        return self.out(torch.tanh(self.wide(q + k * v)))


def batches(width=6, count=3, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(9, 4, width, generator=generator, dtype=dtype) + 0.5 for _ in range(count)]


def gathered(model, data, name):
    """The rows the layer ``name`` saw, as float64 ``(inputs, outputs)``."""
    seen = {"input": [], "output": []}

    def record(module, args, output):
        seen["input"].append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        seen["output"].append(output.detach().reshape(-1, output.shape[-1]).double())

    handle = model.get_submodule(name).register_forward_hook(record)
    with torch.no_grad():
        for batch in data:
            model(batch.clone())
    handle.remove()
    return torch.cat(seen["input"]), torch.cat(seen["output"])


def assert_moments_close(got: Moments, rows: torch.Tensor, rtol=1e-10):
    scale = float(rows.square().sum())
    assert int(got.count) == rows.shape[0]
    torch.testing.assert_close(got.sum, rows.sum(0), rtol=rtol, atol=rtol * scale ** 0.5)
    torch.testing.assert_close(got.outer, rows.T @ rows, rtol=rtol, atol=rtol * scale)
    torch.testing.assert_close(got.square_sum, rows.square().sum(), rtol=rtol, atol=0)


def test_only_the_smaller_side_of_a_linear_layer_is_gathered():
    model = Siblings().double()
    npca = rw.NeuronPCA(model, batches(), **ONE_PASS)
    fresh = npca._stats
    for name in ("q", "wide"):  # d_in <= d_out: the input's Gram, the output derived
        assert fresh[name].output is None and fresh[name].input.outer.shape == (6, 6)
    assert fresh["out"].input.outer is None and fresh["out"].output.outer.shape == (3, 3)


@pytest.mark.parametrize("name", ["q", "k", "wide", "out"])
def test_derived_output_moments_equal_the_gathered_ones(name):
    model, data = Siblings().double(), batches()
    npca = rw.NeuronPCA(model, data, **ONE_PASS)
    inputs, outputs = gathered(model, data, name)
    stats = npca.statistics(name)
    assert_moments_close(stats.output, outputs)
    if stats.input.outer is not None:
        assert_moments_close(stats.input, inputs)


def test_a_subclass_with_its_own_forward_has_its_output_gathered():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Scaled(4, 7)).double()
    data = [torch.randn(16, 4, dtype=torch.float64)]
    npca = rw.NeuronPCA(model, data, **ONE_PASS)
    assert npca._stats["0"].output is not None
    outputs = model(data[0]).detach()
    assert_moments_close(npca.statistics("0").output, outputs)


@pytest.fixture(autouse=True)
def buffering_every_width(monkeypatch):
    """These layers are narrow (width 3 to 14): buffer them as wide ones are."""
    monkeypatch.setattr(rankwise.moments, "BUFFERED_WIDTH", 1)


def counting_grams(monkeypatch) -> list:
    """Patch the one Gram routine so that the row counts and widths of its products are recorded."""
    calls, gram = [], rankwise.moments._gram
    monkeypatch.setattr(rankwise.moments, "_gram", lambda rows: calls.append(tuple(rows.shape)) or gram(rows))
    return calls


@pytest.mark.parametrize("rows_per_product", [0, 256])  # 0: every call its own product
def test_siblings_share_one_gram_and_get_the_statistics_of_separate_ones(monkeypatch, rows_per_product):
    monkeypatch.setattr(rankwise.moments, "ROWS_PER_PRODUCT", rows_per_product)
    data = batches()
    torch.manual_seed(0)
    shared_model = Siblings().double()
    separate_model = Siblings(separate=True).double()
    separate_model.load_state_dict(shared_model.state_dict())
    calls = counting_grams(monkeypatch)
    shared = rw.NeuronPCA(shared_model, data, **ONE_PASS)
    shared_calls, calls[:] = list(calls), []
    separate = rw.NeuronPCA(separate_model, data, **ONE_PASS)
    # width 6: one Gram for q, k and v (against three) and one for wide's input, per batch of
    # 36 rows unbuffered, or once for the 3 x 36 rows of the pass buffered
    rows, products = (36, len(data)) if rows_per_product == 0 else (3 * 36, 1)
    assert shared_calls.count((rows, 6)) == 2 * products and calls.count((rows, 6)) == 4 * products
    for name in shared.layer_names:
        for side in ("input", "output"):
            assert torch.equal(shared.statistics(name).moments(side).sum,
                               separate.statistics(name).moments(side).sum)
        torch.testing.assert_close(shared.statistics(name).output.outer,
                                   separate.statistics(name).output.outer, rtol=1e-14, atol=0)


def masked_forward(model, batch):
    """Siblings on a batch with its last tokens masked out (a different count per sequence)."""
    mask = (torch.arange(batch.shape[1]) < torch.arange(batch.shape[0])[:, None] % 4 + 1).long()
    with rw.token_mask(mask):
        return model(batch)


def calibrated(monkeypatch, rows_per_product, model, data, **kwargs):
    monkeypatch.setattr(rankwise.moments, "ROWS_PER_PRODUCT", rows_per_product)
    return rw.NeuronPCA(model, data, **ONE_PASS, **kwargs)


def assert_same_statistics(got, want, rtol):
    for name in want.layer_names:
        for side in ("input", "output"):
            mine, theirs = got.statistics(name).moments(side), want.statistics(name).moments(side)
            assert torch.equal(mine.count, theirs.count)
            for field in ("sum", "square_sum", "outer"):
                expected = getattr(theirs, field)
                if expected is not None:
                    scale = float(expected.abs().max())
                    torch.testing.assert_close(getattr(mine, field), expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("rows_per_product", [40, 80, 256])  # a call (36 rows) is 1/2 or 1/7 of a product
@pytest.mark.parametrize("masked", [False, True])
def test_buffered_statistics_equal_the_unbuffered_ones_in_float64(monkeypatch, rows_per_product, masked):
    """Linear layers gathering their output, their input (output derived), siblings sharing an
    input, padded batches; products of one call, of several calls, and flushed mid-pass."""
    model, data = Siblings().double(), batches(count=5)
    forward_fn = masked_forward if masked else None
    unbuffered = calibrated(monkeypatch, 0, model, data, forward_fn=forward_fn)
    calls = counting_grams(monkeypatch)
    buffered = calibrated(monkeypatch, rows_per_product, model, data, forward_fn=forward_fn)
    assert len(calls) <= 3 * len(data) and (rows_per_product < 72 or len(calls) < 3 * len(data))
    assert all(rows <= rows_per_product for rows, _ in calls)
    assert_same_statistics(buffered, unbuffered, rtol=1e-12)


class Embedded(nn.Module):
    """An embedding table feeding the siblings."""

    def __init__(self):
        super().__init__()
        self.table, self.siblings = nn.Embedding(11, 6), Siblings()

    def forward(self, tokens):
        return self.siblings(self.table(tokens))


def test_buffered_embedding_statistics_equal_the_unbuffered_ones(monkeypatch):
    model = Embedded().double()
    generator = torch.Generator().manual_seed(4)
    data = [torch.randint(0, 11, (3, 5), generator=generator) for _ in range(6)]
    unbuffered = calibrated(monkeypatch, 0, model, data, forward_fn=masked_forward)
    buffered = calibrated(monkeypatch, 256, model, data, forward_fn=masked_forward)
    assert_same_statistics(buffered, unbuffered, rtol=1e-12)


def test_merged_and_saved_buffered_statistics_equal_the_whole_unbuffered_ones(monkeypatch, tmp_path):
    """What a process group sums and merge adds: the flushed moments of each shard."""
    model, data = Siblings().double(), batches(count=6)
    whole = calibrated(monkeypatch, 0, model, data)
    halves = [calibrated(monkeypatch, 256, model, part) for part in (data[:3], data[3:])]
    halves[0].save(tmp_path / "half.pt")
    merged = rw.NeuronPCA.load(tmp_path / "half.pt").merge(halves[1])
    assert_same_statistics(merged, whole, rtol=1e-12)


def test_buffered_float32_rows_are_multiplied_in_float64(monkeypatch):
    """Small calls' float32 rows are copied exactly into float64 products of at most
    ROWS_PER_PRODUCT rows: |fl(S)_ij - S_ij| <= gamma_256^(64) |X_i| |X_j| (RowBuffer), where a
    float32 product of the same rows may be off by gamma_256 |X_i| |X_j|."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(160, 200))  # d_in <= d_out: its input's Gram
    generator = torch.Generator().manual_seed(3)
    data = [torch.randn(13, 160, generator=generator) * torch.linspace(0.1, 10, 160) + 3 for _ in range(60)]
    calls = counting_grams(monkeypatch)
    npca = rw.NeuronPCA(model, data, **ONE_PASS)
    assert max(rows for rows, _ in calls) > 13 and len(calls) < len(data)  # buffered
    rows = torch.cat(data).double()
    norms = rows.norm(dim=0)
    error = (npca.statistics("0").input.outer - rows.T @ rows).abs()
    products = rankwise.moments.ROWS_PER_PRODUCT
    gamma = products * 2.0 ** -53 / (1 - products * 2.0 ** -53)
    assert bool((error <= gamma * torch.outer(norms, norms)).all())


def test_a_nan_in_a_buffered_call_names_the_layer_and_its_batch():
    model, data = Siblings().double(), batches(count=4)
    data[2][1, 3, 0] = float("nan")
    with pytest.raises(rw.NonFiniteActivationError, match=r"data: batch 2: layer 'q' has NaN or Inf in its input"):
        rw.NeuronPCA(model, data, **ONE_PASS)


def test_buffered_rows_reach_the_moments_when_the_pass_ends(monkeypatch):
    model, data = Siblings().double(), batches(count=2)
    stats = {name: statistics_for(model.get_submodule(name)) for name in ("q", "out")}
    handles = [model.get_submodule(name).register_forward_hook(s.hook(name, model.get_submodule(name)),
                                                                with_kwargs=True)
               for name, s in stats.items()]
    with sharing_inputs() as shared, torch.no_grad():
        for batch in data:
            shared.clear()
            model(batch)
        assert int(stats["q"].input.count) == 72 and not stats["q"].input.outer.any()  # pending
        assert not stats["out"].output.outer.any()
    for handle in handles:
        handle.remove()
    inputs = gathered(model, data, "q")[0]
    assert_moments_close(stats["q"].input, inputs)
    assert_moments_close(stats["out"].output, gathered(model, data, "out")[1])
    whole = rw.NeuronPCA(model, data, **ONE_PASS)  # and so does NeuronPCA's own pass
    assert_moments_close(whole.statistics("q").input, inputs)


def test_a_tensor_changed_in_place_between_readers_is_not_shared():
    model, data = Siblings(modify_between=True).double(), batches()
    npca = rw.NeuronPCA(model, [batch.clone() for batch in data], **ONE_PASS)  # x.mul_ in forward
    q_inputs, _ = gathered(Siblings().double(), data, "q")  # before the change
    k_inputs, _ = gathered(model, data, "k")  # after it (the hook sees the doubled tensor)
    assert_moments_close(npca.statistics("q").input, q_inputs)
    assert_moments_close(npca.statistics("k").input, k_inputs)
    torch.testing.assert_close(k_inputs, 2 * q_inputs)


def test_the_cache_keeps_its_tensors_alive_and_forgets_them_when_cleared():
    cache, layer = SharedInputs(), nn.Linear(3, 4)
    tensor = torch.randn(5, 3)
    first, second = Moments.zeros(3), Moments.zeros(3)
    cache.add(first, tensor, layer, shared=True)
    cache.add(second, tensor.view(5, 3), layer, shared=True)
    assert cache.computed == 1 and len(cache._entries) == 1
    assert next(iter(cache._entries.values()))[0] is tensor
    cache.clear()
    assert not cache._entries
    cache.add(first, tensor, layer, shared=True)
    assert cache.computed == 2
    cache.flush()
    assert_moments_close(second, tensor.double(), rtol=1e-6)
    assert_moments_close(first, torch.cat([tensor, tensor]).double(), rtol=1e-6)
    with sharing_inputs() as active:
        assert isinstance(active, SharedInputs)


@pytest.mark.parametrize("rows, dtype", [(64, torch.float32), (1024, torch.float32),
                                         (333, torch.bfloat16), (4096, torch.float16)])
def test_float32_per_batch_accumulation_stays_within_the_stated_bound(rows, dtype):
    """|fl(S)_ij - S_ij| <= sum_b gamma_m |X_i^b| |X_j^b|, gamma_m = m u / (1 - m u) (Moments)."""
    generator = torch.Generator().manual_seed(rows)
    data = [(torch.randn(rows, 160, generator=generator) * torch.linspace(0.1, 10, 160) + 3).to(dtype)
            for _ in range(4)]
    low, exact = Moments.zeros(160), Moments.zeros(160)
    bound = torch.zeros(160, 160, dtype=torch.float64)
    gamma = rows * UNIT_ROUNDOFF / (1 - rows * UNIT_ROUNDOFF)
    for batch in data:
        low.update(batch)  # products in float32 (half precisions upcast exactly)
        exact.update(batch.double())
        norms = batch.double().norm(dim=0)
        bound += gamma * torch.outer(norms, norms)
    error = (low.outer - exact.outer).abs()
    assert bool((error <= bound).all())
    assert float(error.max()) > 0  # the float32 products did round: the bound is not vacuous
    typical = 4 * rows ** 0.5 * UNIT_ROUNDOFF * bound / gamma
    assert bool((error <= typical).all())  # and they stay below the sqrt(m) u estimate
    torch.testing.assert_close(low.sum, exact.sum, rtol=1e-5, atol=1e-3)


def test_a_bfloat16_model_gets_float64_statistics_of_its_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4)).to(torch.bfloat16)
    data = [torch.randn(64, 6).to(torch.bfloat16) for _ in range(2)]
    npca = rw.NeuronPCA(model, data, **ONE_PASS)
    wide = npca.statistics("0")
    assert wide.output.outer.dtype == torch.float64
    inputs = torch.cat(data).double()
    assert_moments_close(wide.input, inputs, rtol=1e-6)
    weight, bias = model[0].weight.detach().double(), model[0].bias.detach().double()
    assert_moments_close(wide.output, inputs @ weight.T + bias, rtol=1e-6)  # W x + b, exactly
    assert npca.spectrum("2").eigenvalues.dtype == torch.float64


def test_save_load_and_merge_keep_derived_statistics(tmp_path):
    model, data = Siblings().double(), batches(count=4)
    whole = rw.NeuronPCA(model, data, **ONE_PASS)
    first, second = (rw.NeuronPCA(model, part, **ONE_PASS) for part in (data[:2], data[2:]))
    first.statistics("wide")  # one half settled (its output derived), the other not
    merged = first.merge(second)
    assert merged._stats["q"].output is None  # both halves derive q: the merge stays derived
    first.save(tmp_path / "first.pt")
    loaded = rw.NeuronPCA.load(tmp_path / "first.pt")
    for name in whole.layer_names:
        for side in ("input", "output"):
            want, got = whole.statistics(name).moments(side), merged.statistics(name).moments(side)
            torch.testing.assert_close(got.sum, want.sum, rtol=1e-12, atol=1e-12)
            if want.outer is not None:
                torch.testing.assert_close(got.outer, want.outer, rtol=1e-12, atol=1e-12)
        spectrum = whole.spectrum(name)
        torch.testing.assert_close(merged.spectrum(name).eigenvalues, spectrum.eigenvalues,
                                   rtol=1e-10, atol=1e-12)
        assert torch.equal(loaded.spectrum(name).eigenvalues, first.spectrum(name).eigenvalues)


def test_the_process_group_sums_input_moments_and_plain_form_round_trips():
    model = Siblings().double()
    npca = rw.NeuronPCA(model, batches(), **ONE_PASS)
    fresh = npca._stats["wide"]
    summed = moment_tensors(fresh)
    assert any(t is fresh.input.outer for t in summed) and len(summed) == 4  # no output to sum
    restored = from_plain(to_plain(fresh))
    assert restored.output is None and torch.equal(restored.weight_matrix, fresh.weight_matrix)
    torch.testing.assert_close(restored.settled().output.outer, npca.statistics("wide").output.outer,
                               rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(3, 4, 5, 5), (2, 40, 3, 2), (4, 6, 7)])
def test_convolution_grams_without_moving_the_channels(shape):
    generator = torch.Generator().manual_seed(1)
    activation = torch.randn(*shape, generator=generator, dtype=torch.float64)
    channels = activation.reshape(*shape[:2], -1)
    rows = activation.movedim(1, -1).reshape(-1, shape[1])
    assert_moments_close(Moments.of_channels(channels), rows, rtol=1e-12)
    assert_moments_close(Moments.of_rows(rows), rows, rtol=1e-12)

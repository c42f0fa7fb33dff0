"""Measured decisions (rankwise.selection): candidates scored on held-out batches, the best kept.

Every check rebuilds what the library measured by another route: the fitted statistics from the
fitted batches alone, each candidate through the public options, its divergence computed here.
"""

import warnings

import pytest
import torch
import transformers
from torch import nn

import rankwise as rw
from conftest import assert_unchanged, state_of
from rankwise.holdout import HeldOutSplit
from rankwise.selection import Candidate, fallback
from rankwise.statistics import moment_tensors


def branchy_classifier():
    """Two branches summed into the logits, one scaled by 1e-3: its layers' own variance is
    large, their effect on the output negligible."""
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.loud = nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, 6))
            self.quiet = nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, 6))

        def forward(self, x):
            return 1e-3 * self.loud(x) + self.quiet(x)
    return Branchy()


def batchnorm_stack():
    layers = []
    for width_in, width_out in ((3, 16), (16, 16), (16, 16)):
        layers += [nn.Conv2d(width_in, width_out, 3, padding=1), nn.BatchNorm2d(width_out), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # trained-looking running statistics, uneven scales
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) * 4 + 0.05)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) * 3)
    return model


def tiny_causal_lm():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def labelled(shape, count=8, classes=6):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(*shape, generator=generator), torch.randint(0, classes, shape[:1], generator=generator))
            for _ in range(count)]


def token_batches(count=8):
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 64, (2, 16), generator=generator)} for _ in range(count)]


CASES = {  # name -> (model factory, batches, layer_names, goal)
    "branchy": (branchy_classifier, lambda: labelled((32, 12)), None, 0.5),
    "batchnorm": (batchnorm_stack, lambda: labelled((8, 3, 8, 8), classes=10), None, 0.4),
    "causal_lm": (tiny_causal_lm, token_batches, "model.layers.*", 0.3),
}


def kl_on(model, original, batches, forward):
    """The mean KL divergence of ``model``'s logits from ``original``'s over the batches' rows."""
    total, rows = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            p, q = forward(original, batch).double(), forward(model, batch).double()
            p, q = p.reshape(-1, p.shape[-1]).log_softmax(-1), q.reshape(-1, q.shape[-1]).log_softmax(-1)
            total += float((p.exp() * (p - q)).sum())
            rows += len(p)
    return total / rows


def logits_of(model, batch):
    output = model(**batch) if isinstance(batch, dict) else model(batch[0])
    return getattr(output, "logits", output)


@pytest.fixture(params=sorted(CASES))
def case(request):
    torch.manual_seed(0)
    factory, batches, layer_names, goal = CASES[request.param]
    return factory().eval(), batches(), layer_names, goal


def test_the_chosen_candidate_is_the_best_of_the_candidates_measured_again_independently(case):
    model, batches, layer_names, goal = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # thin data on tiny models
        net, info = rw.compress_network_using_projection(model, batches, learnables_reduction_goal=goal,
                                                         layer_names=layer_names, loss_fn="kl", verbosity="off")
        split = HeldOutSplit(batches, "auto")
        fitted_batches = list(split)
        assert [id(b) for b in split.held_out] == [id(b) for i, b in enumerate(batches) if i % 4 == 1]
        fitted = rw.NeuronPCA(model, fitted_batches, layer_names=layer_names, loss_fn="kl", validation=None,
                              verbosity="off")
        scores = {}
        for measured in info.candidates:
            c = measured.candidate
            built, _ = rw.compress_network_using_projection(
                model, fitted.with_regularization(c.regularization), learnables_reduction_goal=goal,
                layer_names=layer_names, criterion=c.criterion, allocation=c.allocation, verbosity="off")
            scores[c] = kl_on(built, model, split.held_out, logits_of)
            assert measured.score == pytest.approx(scores[c], rel=1e-4, abs=1e-9)
    assert len(scores) >= 5  # variance/loss x global/uniform, data-free, the middle shrinkage
    chosen = info.measured.chosen
    assert scores[chosen] == min(scores.values())
    assert info.learnables_reduction >= goal - 1e-9
    assert chosen.label in info.choice and chosen.label in info.table()


def test_full_rank_is_exact_whatever_is_chosen_and_the_input_model_is_untouched(case):
    model, batches, layer_names, _ = case
    before = state_of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net, info = rw.compress_network_using_projection(model, batches, learnables_reduction_goal=0.0,
                                                         layer_names=layer_names, verbosity="off")
    assert info.candidates
    assert_unchanged(model, before)
    with torch.no_grad():
        for batch in batches[:2]:
            torch.testing.assert_close(logits_of(net.eval(), batch), logits_of(model, batch), atol=1e-4, rtol=1e-4)


def test_the_choice_is_deterministic_and_the_two_steps_choose_what_one_step_chooses(tmp_path):
    torch.manual_seed(0)
    model, batches = branchy_classifier().eval(), labelled((32, 12))
    _, first = rw.compress_network_using_projection(model, batches, learnables_reduction_goal=0.5, verbosity="off")
    _, again = rw.compress_network_using_projection(model, batches, learnables_reduction_goal=0.5, verbosity="off")
    npca = rw.NeuronPCA(model, batches, verbosity="off")
    npca.save(tmp_path / "npca.pt")
    loaded = rw.NeuronPCA.load(tmp_path / "npca.pt")
    _, two_steps = rw.compress_network_using_projection(model, loaded, learnables_reduction_goal=0.5,
                                                        verbosity="off")
    assert [s.score for s in first.candidates] == [s.score for s in again.candidates]
    assert first.measured.chosen == again.measured.chosen == two_steps.measured.chosen
    assert [s.score for s in two_steps.candidates] == pytest.approx([s.score for s in first.candidates])
    assert len(loaded.validation_batches) == 2 and loaded.fitted().num_batches == 6


def test_one_batch_warns_and_takes_the_documented_fallback():
    torch.manual_seed(0)
    model, batches = branchy_classifier().eval(), labelled((64, 12), count=1)
    with pytest.warns(UserWarning, match="validation: no calibration batch was held out"):
        _, info = rw.compress_network_using_projection(model, batches, learnables_reduction_goal=0.5,
                                                       verbosity="off")
    assert info.candidates == []
    assert info.measured.chosen == Candidate("loss", "global", "auto") == fallback("auto", "auto", True, "auto")
    assert "fallback" in info.choice


def test_explicit_options_are_kept_and_nothing_is_measured():
    torch.manual_seed(0)
    model, batches = branchy_classifier().eval(), labelled((32, 12))
    _, info = rw.compress_network_using_projection(model, batches, learnables_reduction_goal=0.5,
                                                   criterion="variance", allocation="uniform", verbosity="off")
    assert info.candidates == [] and info.measured is None
    _, info = rw.compress_network_using_projection(model, batches, learnables_reduction_goal=0.5,
                                                   allocation="uniform", verbosity="off")
    assert {s.candidate.allocation for s in info.candidates} == {"uniform"}


def test_separate_validation_batches_and_a_score_fn_are_used():
    torch.manual_seed(0)
    model, batches = branchy_classifier().eval(), labelled((32, 12))
    seen = []

    def score_fn(compressed, original, batch):
        seen.append(batch)
        return float((compressed - original).abs().max())

    _, info = rw.compress_network_using_projection(model, batches[:6], learnables_reduction_goal=0.5,
                                                   validation=batches[6:], score_fn=score_fn, verbosity="off")
    assert info.measured.score_name == "score_fn"
    assert all(any(b is held for held in batches[6:]) for b in seen)
    chosen = min((s for s in info.candidates if s.score is not None), key=lambda s: s.score)
    assert chosen.candidate == info.measured.chosen


def test_bad_validation_and_score_fn_are_refused_and_leave_the_model():
    model, batches = branchy_classifier().eval(), labelled((32, 12))
    before = state_of(model)
    with pytest.raises(ValueError, match="validation: expected 'auto'"):
        rw.NeuronPCA(model, batches, validation=0.9, verbosity="off")
    with pytest.raises(ValueError, match="score_fn: expected one of"):
        rw.compress_network_using_projection(model, batches, learnables_reduction_goal=0.5, score_fn="nope")
    with pytest.raises(ValueError, match="allocation: expected 'auto', 'global' or 'uniform'"):
        rw.compress_network_using_projection(model, batches, learnables_reduction_goal=0.5, allocation="x")
    assert_unchanged(model, before)


def test_a_neuron_pca_saved_before_held_out_batches_loads_and_falls_back(tmp_path):
    torch.manual_seed(0)
    model, batches = branchy_classifier().eval(), labelled((32, 12))
    npca = rw.NeuronPCA(model, batches, verbosity="off", loss_fn=None)
    npca.save(tmp_path / "new.pt")
    state = torch.load(tmp_path / "new.pt", weights_only=True)
    del state["validation"]
    state["format_version"] = 4
    torch.save(state, tmp_path / "old.pt")
    old = rw.NeuronPCA.load(tmp_path / "old.pt")
    assert old.validation_batches == [] and old.num_batches == 8
    with pytest.warns(UserWarning, match="NeuronPCA saved before held-out batches were kept"):
        _, info = rw.compress_network_using_projection(model, old, learnables_reduction_goal=0.5, verbosity="off")
    assert info.measured.chosen == Candidate("variance", "global", "auto")


def test_held_out_and_fitted_statistics_add_up_to_those_of_every_batch():
    torch.manual_seed(0)
    model, batches = branchy_classifier().eval(), labelled((32, 12))
    npca = rw.NeuronPCA(model, batches, verbosity="off", loss_fn=None)
    whole = rw.NeuronPCA(model, batches, verbosity="off", loss_fn=None, validation=None)
    held = rw.NeuronPCA(model, npca.validation_batches, verbosity="off", loss_fn=None, validation=None)
    for name in whole.layer_names:
        parts = zip(moment_tensors(npca.statistics(name)), moment_tensors(npca.fitted().statistics(name)),
                    moment_tensors(held.statistics(name)), moment_tensors(whole.statistics(name)))
        for merged, fitted, held_out, every in parts:
            torch.testing.assert_close(merged, every)
            torch.testing.assert_close(fitted + held_out, every)


def test_a_failing_held_out_batch_is_named_by_its_index_in_the_data():
    model = nn.Sequential(nn.Linear(12, 4))
    batches = [torch.randn(4, 12), torch.randn(4, 13), torch.randn(4, 12)]
    with pytest.raises(ValueError, match="rejected batch 1"):
        rw.NeuronPCA(model, batches, verbosity="off")

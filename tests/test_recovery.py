"""rw.recover and the BatchNorm modes: frozen statistics, never worse, feature distillation,
low-rank corrections merged exactly, clear refusals with the model untouched."""

import copy
import warnings

import pytest
import torch
from torch import nn

import rankwise as rw
from conftest import assert_unchanged, state_of
from rankwise.recovery.lora import attach_corrections, factor_groups, merge_corrections
from rankwise.recovery.objectives import FeatureDistillation


def bn_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
                         nn.Conv2d(12, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()


def images(count=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 6, 6, generator=generator), torch.randint(0, 5, (16,), generator=generator))
            for _ in range(count)]


def mlp_and_compressed(goal=0.6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 6)).eval()
    generator = torch.Generator().manual_seed(1)
    data = [torch.randn(32, 12, generator=generator) for _ in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed, _ = rw.compress_network_using_projection(model, data, learnables_reduction_goal=goal,
                                                             verbosity="off")
    return model, compressed, data


def damaged(compressed, scale=0.3, seed=0):
    """``compressed`` with noise of ``scale`` times each factor's RMS added: layer errors to recover."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for form in [m for m in compressed.modules() if isinstance(m, rw.ProjectedLayer)]:
            for parameter in form.parameters():
                parameter.add_(scale * parameter.square().mean().sqrt()
                               * torch.randn(parameter.shape, generator=generator))
    return compressed


def running_stats(model):
    return [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
            for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def same_stats(a, b):
    return all(torch.equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def test_frozen_batchnorm_keeps_running_statistics_while_the_rest_trains():
    model, data = bn_cnn(), images()
    before, weight = running_stats(model), model[0].weight.clone()
    history = rw.fine_tune(model, data, epochs=1, batchnorm="frozen", progress=False)
    assert history.batchnorm == "frozen"
    assert same_stats(running_stats(model), before)
    assert not torch.equal(model[0].weight, weight)  # the rest did train
    trained = bn_cnn()
    with pytest.warns(rw.SmallBatchNormDataWarning, match="batchnorm='train'"):
        rw.fine_tune(trained, data, epochs=1, batchnorm="train", progress=False)
    assert not same_stats(running_stats(trained), before)  # torch's train mode does move them


def test_auto_batchnorm_is_frozen_for_small_data_and_recover_keeps_frozen_statistics():
    model, data = bn_cnn(), images()
    assert rw.fine_tune(copy.deepcopy(model), data, epochs=1, progress=False).batchnorm == "frozen"
    original = copy.deepcopy(model)
    before = running_stats(model)
    record = rw.recover(model, original, data, method="logits", epochs=1, batchnorm="frozen", progress=False)
    assert record.batchnorm == "frozen"
    assert same_stats(running_stats(model), before)


def test_recover_measures_auto_batchnorm_on_the_held_out_batches():
    original, data = bn_cnn(), images()
    rw.recalibrate_batchnorm(original, data)  # statistics that describe the data
    stale = copy.deepcopy(original)
    with torch.no_grad():
        stale[1].running_var.mul_(25.0)  # statistics that no longer describe what the layer sees
        stale[1].running_mean.add_(3.0)
    record = rw.recover(stale, original, data, method="logits", epochs=1, progress=False)
    assert record.batchnorm == "train" and "(better)" in record.batchnorm_reason
    assert "batchnorm=train" in str(record)


def test_reestimate_recomputes_the_statistics_from_the_training_batches():
    model, data = bn_cnn(), images()
    before = running_stats(model)
    with pytest.warns(rw.SmallBatchNormDataWarning):
        rw.fine_tune(model, data, epochs=1, batchnorm="reestimate", progress=False)
    after = running_stats(model)
    assert not same_stats(after, before) and int(after[0][2]) == len(data)  # cumulative average over the batches


def test_recovery_that_hurts_is_not_kept_and_the_weights_are_put_back():
    model, compressed, data = mlp_and_compressed()
    snapshot = state_of(compressed)
    record = rw.recover(compressed, model, data, method="logits", epochs=1, lr=5.0, progress=False)  # absurd lr
    assert not record.kept and record.best_trained >= record.validation_before
    assert record.validation_after == record.validation_before
    assert min(record.val_score) > record.validation_before
    assert_unchanged(compressed, snapshot)
    assert "NOT kept" in str(record)


@pytest.mark.parametrize("method", ["logits", "features", "lora"])
def test_each_method_improves_the_held_out_score_of_a_compressed_mlp(method):
    model, compressed, data = mlp_and_compressed()
    damaged(compressed)
    learnables = rw.count_learnables(compressed)
    record = rw.recover(compressed, model, data, method=method, epochs=3, progress=False)
    assert record.kept and record.validation_after < record.validation_before
    assert rw.count_learnables(compressed) == learnables
    assert f"method={method}" in str(record)


def test_feature_distillation_reduces_the_layer_output_error():
    model, compressed, data = mlp_and_compressed(goal=0.5)
    damaged(compressed)

    def layer_error(net):
        objective = FeatureDistillation(model, net)
        try:
            with torch.no_grad():
                return float(sum(objective(net, batch) for batch in data))
        finally:
            objective.close()

    before = layer_error(compressed)
    record = rw.recover(compressed, model, data, method="features", epochs=3, validation=data[:2], progress=False)
    assert record.kept and layer_error(compressed) < 0.7 * before


def test_low_rank_corrections_merge_exactly_and_keep_the_learnable_count():
    _, compressed, data = mlp_and_compressed()
    learnables, keys = rw.count_learnables(compressed), set(compressed.state_dict())
    factors = [f for group in factor_groups(compressed) for f in group]
    attach_corrections(factors, rank=3)
    with torch.no_grad():
        for factor in factors:
            factor.parametrizations.weight[0].up.normal_()
        corrected = compressed(data[0])
    assert not torch.allclose(corrected, compressed(data[0]).detach() * 0)  # runs with the corrections
    merge_corrections(factors)
    with torch.no_grad():
        assert torch.equal(compressed(data[0]), corrected)
    assert rw.count_learnables(compressed) == learnables and set(compressed.state_dict()) == keys
    assert all(p.requires_grad for p in compressed.parameters())


def test_lora_heals_a_tiny_causal_lm_with_token_level_kl():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 50, (2, 12), generator=generator),
             "attention_mask": torch.ones(2, 12, dtype=torch.long)} for _ in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed, _ = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.2,
                                                             layer_names="model.layers.*", verbosity="off")
    learnables = rw.count_learnables(compressed)
    record = rw.recover(compressed, model, data, method="lora", epochs=2, progress=False)
    assert record.score == "kl" and record.validation_after <= record.validation_before
    assert rw.count_learnables(compressed) == learnables


@pytest.mark.parametrize("arguments, message", [
    ({"method": "bogus"}, "method: expected one of"),
    ({"epochs": 0}, "epochs: expected a positive integer"),
    ({"lr": -1.0}, "lr: expected a positive number"),
    ({"validation": None}, "validation: recovery keeps"),
    ({"batchnorm": "sometimes"}, "batchnorm: expected one of"),
    ({"lora_rank": 0}, "lora_rank: expected a positive integer"),
])
def test_bad_arguments_are_refused_with_the_model_untouched(arguments, message):
    model, compressed, data = mlp_and_compressed()
    snapshot = state_of(compressed)
    with pytest.raises(ValueError, match=message):
        rw.recover(compressed, model, data, progress=False, **arguments)
    assert_unchanged(compressed, snapshot)


def test_refusals_name_the_fix():
    model, compressed, data = mlp_and_compressed()
    snapshot = state_of(compressed)
    with pytest.raises(ValueError, match="original: it is the compressed model itself"):
        rw.recover(compressed, compressed, data, progress=False)
    with pytest.raises(ValueError, match="data: recovery passes over it several times"):
        rw.recover(compressed, model, iter(data), progress=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(data)), batch_size=32, shuffle=True)
    with pytest.raises(ValueError, match="data: a shuffling DataLoader"):
        rw.recover(compressed, model, loader, progress=False)
    with pytest.raises(ValueError, match="validation: no batch is held out"):
        rw.recover(compressed, model, data[:1], progress=False)
    with pytest.raises(ValueError, match="compressed: it has no compressed layer"):
        rw.recover(copy.deepcopy(model), model, data, method="features", progress=False)
    with pytest.raises(ValueError, match="original: it has no module"):
        rw.recover(compressed, nn.Sequential(nn.Linear(12, 6)), data, method="features", progress=False)
    assert_unchanged(compressed, snapshot)
    with pytest.raises(ValueError, match="batchnorm: expected one of"):
        rw.fine_tune(bn_cnn(), images(), epochs=1, batchnorm="off", progress=False)


def test_incremental_compression_recovers_each_step_the_same_way():
    from conftest import blob_task
    model, train, val, accuracy = blob_task()
    snapshot = state_of(model)
    net, history = rw.compress_incrementally(model, [x for x, _ in train], train_data=train, eval_fn=accuracy,
                                             learnables_reduction_goal=0.5, tolerance=0.05, val_data=val,
                                             recovery="logits", verbosity="off")
    assert history.steps and all(isinstance(s.fine_tune, rw.RecoveryRecord) for s in history.steps)
    assert all(s.fine_tune.validation_after <= s.fine_tune.validation_before for s in history.steps)
    assert history.final_learnables == rw.count_learnables(net)
    assert_unchanged(model, snapshot)
    with pytest.raises(ValueError, match="teacher and recovery are exclusive"):
        rw.compress_incrementally(model, [x for x, _ in train], train_data=train, eval_fn=accuracy,
                                  recovery="logits", teacher=model, verbosity="off")


def test_score_fn_kl_makes_unlabelled_classifier_outputs_logits_for_training_too():
    from rankwise.recovery.recover import _objective
    model, compressed, data = mlp_and_compressed()
    damaged(compressed)
    assert _objective("logits", compressed, model, None, 1.0, "kl").kind == "kl"
    assert _objective("logits", compressed, model, None, 1.0, "relative_error").kind == "mse"
    record = rw.recover(compressed, model, data, method="logits", epochs=2, score_fn="kl", progress=False)
    assert record.score == "kl" and record.kept

"""fine_tune: a well-behaved loop (best weights, early stop on divergence, distillation)."""

import copy

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.train import distillation_loss
from conftest import assert_unchanged, blob_task, state_of


def test_fine_tune_lowers_the_training_loss_and_records_every_epoch():
    model, train, val, _ = blob_task()
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    history = rw.fine_tune(student, train, epochs=4, lr=1e-2, val_data=val, progress=False)
    assert len(history.train_loss) == len(history.val_loss) == 4
    assert history.train_loss[-1] < history.train_loss[0]
    assert not student.training


def test_best_validation_weights_are_restored():
    model, train, val, _ = blob_task()
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    history = rw.fine_tune(student, train, epochs=5, lr=5e-2, val_data=val, patience=5, progress=False)
    best = min([history.initial_val_loss, *history.val_loss])
    assert history.best_epoch >= 1 and history.val_loss[history.best_epoch - 1] == best
    batch_loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    assert rw.train.evaluate_loss(student, val, batch_loss) == pytest.approx(best, rel=1e-6)


def test_stops_early_when_validation_loss_diverges_from_training_loss():
    torch.manual_seed(0)
    inputs = torch.randn(64, 20)
    train = [(inputs, torch.randint(0, 4, (64,)))]           # memorisable noise
    val = [(torch.randn(64, 20), torch.randint(0, 4, (64,)))]  # unrelated labels
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 4))
    history = rw.fine_tune(model, train, epochs=60, lr=1e-2, val_data=val, patience=2, progress=False)
    assert history.stopped_early
    assert len(history.train_loss) < 60
    gaps = [v - t for t, v in zip(history.train_loss, history.val_loss)]
    assert gaps[-1] > gaps[max(history.best_epoch, 1) - 1]


def test_initial_weights_are_kept_when_fine_tuning_only_hurts():
    model, train, val, _ = blob_task()
    snapshot = state_of(model)
    noisy = [(x, torch.randint(0, 4, (len(x),), generator=torch.Generator().manual_seed(i)))
             for i, (x, _) in enumerate(train)]
    history = rw.fine_tune(model, noisy, epochs=3, lr=1e-2, val_data=val, progress=False)
    assert history.best_epoch == 0
    assert all(v > history.initial_val_loss for v in history.val_loss)
    assert_unchanged(model, snapshot)


def test_distillation_needs_no_labels_and_approaches_the_teacher():
    teacher, train, _, accuracy = blob_task()
    unlabelled = [x for x, _ in train]
    torch.manual_seed(2)
    student = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    before = sum(distillation_loss(student(x), teacher(x)).item() for x in unlabelled)
    teacher_state = state_of(teacher)
    rw.fine_tune(student, unlabelled, epochs=30, lr=1e-2, teacher=teacher, progress=False)
    after = sum(distillation_loss(student(x), teacher(x)).item() for x in unlabelled)
    assert after < 0.2 * before
    assert accuracy(student) > 0.9
    assert_unchanged(teacher, teacher_state)


def test_without_teacher_batches_need_targets_and_the_model_is_left_as_it_was():
    model, train, _, _ = blob_task()
    snapshot = state_of(model)
    with pytest.raises(ValueError, match="train_data: batches must be \\(inputs, targets\\)"):
        rw.fine_tune(model, [x for x, _ in train], epochs=1, progress=False)
    assert_unchanged(model, snapshot)


def test_a_diverging_loss_restores_the_weights():
    model, train, _, _ = blob_task()
    snapshot = state_of(model)
    with pytest.raises(FloatingPointError, match="lower lr"):
        rw.fine_tune(model, train, epochs=3, lr=1e30, progress=False)
    assert_unchanged(model, snapshot)


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "epochs: expected a positive integer"),
    ({"epochs": 1, "lr": -1.0}, "lr: expected a positive number"),
    ({"epochs": 1, "patience": 0}, "patience"),
    ({"epochs": 1, "loss_fn": nn.functional.mse_loss, "teacher": nn.Identity()}, "exclusive"),
])
def test_bad_arguments(kwargs, message):
    model, train, _, _ = blob_task()
    with pytest.raises(ValueError, match=message):
        rw.fine_tune(copy.deepcopy(model), train, progress=False, **kwargs)

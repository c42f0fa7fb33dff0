import copy

import pytest
import torch
from torch import nn

from rankwise.batchnorm import fold_batchnorm, recalibrate_batchnorm


def randomise_statistics(model):
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_()
                module.running_var.uniform_(0.2, 3.0)
                if module.affine:
                    module.weight.normal_()
                    module.bias.normal_()
    return model.eval()


def conv_model(affine, bias):
    return randomise_statistics(nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.BatchNorm2d(6, affine=affine), nn.ReLU(),
        nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4, affine=affine)))


def linear_model(affine):
    return randomise_statistics(nn.Sequential(
        nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7, affine=affine), nn.Tanh(), nn.Linear(7, 3)))


def same_state(first, second):
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_folding_conv_batchnorm_is_exact_and_leaves_the_model(affine, bias):
    torch.manual_seed(0)
    model = conv_model(affine, bias)
    before = copy.deepcopy(model)
    folded, mapping = fold_batchnorm(model)
    x = torch.randn(4, 3, 8, 8)
    assert mapping == {"0": "1", "3": "4"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert same_state(model, before)


@pytest.mark.parametrize("affine", [True, False])
def test_folding_linear_batchnorm_is_exact(affine):
    torch.manual_seed(1)
    model = linear_model(affine)
    folded, mapping = fold_batchnorm(model)
    x = torch.randn(9, 5)
    assert mapping == {"0": "1"}
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_batchnorm_not_after_a_layer_is_not_folded():
    model = randomise_statistics(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 2)))
    folded, mapping = fold_batchnorm(model)
    assert mapping == {}
    assert isinstance(folded[1], nn.BatchNorm1d)


def test_recalibration_gives_the_statistics_of_the_data():
    torch.manual_seed(2)
    model = conv_model(affine=True, bias=True)
    batches = [torch.randn(8, 3, 6, 6) * 2 + 1 for _ in range(3)]
    recalibrate_batchnorm(model, batches)
    first = model[0](torch.cat(batches))
    per_batch = [model[0](b) for b in batches]
    expected_mean = torch.stack([o.mean((0, 2, 3)) for o in per_batch]).mean(0)
    expected_var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in per_batch]).mean(0)
    torch.testing.assert_close(model[1].running_mean, expected_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model[1].running_var, expected_var, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model[1].running_mean, first.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    assert not model.training and not model[1].training
    assert model[1].momentum == 0.1


def test_recalibration_uses_forward_fn_and_max_batches():
    torch.manual_seed(3)
    model = linear_model(affine=True)
    batches = [{"x": torch.randn(16, 5)} for _ in range(4)]
    recalibrate_batchnorm(model, batches, forward_fn=lambda m, b: m(b["x"]), max_batches=1)
    torch.testing.assert_close(model[1].running_mean, model[0](batches[0]["x"]).mean(0), atol=1e-5, rtol=1e-5)
    assert int(model[1].num_batches_tracked) == 1


@pytest.mark.parametrize("kwargs, argument", [
    ({"data": torch.randn(4, 5)}, "data"),
    ({"data": [torch.randn(4, 5)], "max_batches": 0}, "max_batches"),
    ({"data": []}, "data"),
])
def test_bad_recalibration_arguments_raise_and_leave_the_model(kwargs, argument):
    model = linear_model(affine=True)
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=argument):
        recalibrate_batchnorm(model, **kwargs)
    assert same_state(model, before)
    assert not model[1].training


def test_recalibration_failing_forward_leaves_the_model():
    model = linear_model(affine=True)
    before = copy.deepcopy(model)
    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(model, [torch.randn(4, 5), torch.randn(4, 6)])
    assert same_state(model, before)


def test_model_without_batchnorm_raises():
    with pytest.raises(ValueError, match="model"):
        recalibrate_batchnorm(nn.Linear(3, 2), [torch.randn(2, 3)])

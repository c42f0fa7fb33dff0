"""Gradient statistics of layer outputs (the Fisher information the loss criterion needs)."""

import pytest
import torch
from torch import nn

from rankwise.statistics.gradients import gradient_moments


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def test_a_linear_loss_gives_its_backpropagated_direction_exactly():
    model = _model()
    c = torch.tensor([1.0, -2.0, 0.5])
    x = torch.randn(6, 5)
    moments, samples, _ = gradient_moments(model, [x[:4], x[4:]], {"0": model[0], "2": model[2]},
                                        loss_fn=lambda out, batch: (out * c).sum())
    assert samples == 6
    torch.testing.assert_close(moments["2"].outer, 6 * torch.outer(c, c).double())
    with torch.no_grad():
        h = model[0](x)
    g = (1 - torch.tanh(h) ** 2) * (c @ model[2].weight)          # gradient at the first layer's output
    torch.testing.assert_close(moments["0"].outer, (g.T @ g).double(), rtol=1e-5, atol=1e-6)


def test_the_model_is_left_as_it_was():
    model = _model()
    model[0].weight.requires_grad_(False)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gradient_moments(model, [torch.randn(8, 5)], {"2": model[2]}, loss_fn="kl")
    assert model.training and not model[0].weight.requires_grad and model[2].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_kl_fisher_of_the_logits_converges_to_diag_p_minus_p_p():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    model = nn.Sequential(nn.Linear(1, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(logits.T)
    moments, samples, _ = gradient_moments(model, [torch.ones(4000, 1)], {"0": model[0]}, loss_fn="kl")
    p = logits.softmax(-1)[0].double()
    torch.testing.assert_close(moments["0"].outer / samples, torch.diag(p) - torch.outer(p, p), atol=0.02, rtol=0)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_mse_masks_padding_positions():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 2)

        def forward(self, inputs, attention_mask):
            return self.proj(inputs)

    model = Encoder()
    batch = {"inputs": torch.randn(2, 4, 3), "attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])}
    grads = {}
    model.proj.register_full_backward_hook(lambda m, gi, go: grads.update(g=go[0]))
    moments, samples, _ = gradient_moments(model, [batch], {"proj": model.proj}, loss_fn="mse")
    assert samples == 2
    # the two padded positions of the first sentence contribute no rows, and no gradient
    assert moments["proj"].count == 6
    torch.testing.assert_close(grads["g"][0, 2:], torch.zeros(2, 2))


def test_bad_loss_fn_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="loss_fn: expected 'kl'"):
        gradient_moments(model, [torch.randn(2, 5)], {"2": model[2]}, loss_fn="hinge")
    with pytest.raises(ValueError, match="loss_fn: the callable must return a scalar"):
        gradient_moments(model, [torch.randn(2, 5)], {"2": model[2]}, loss_fn=lambda out, b: out)


def test_neuron_pca_gathers_gradients_in_the_same_pass_and_keeps_them(tmp_path):
    import rankwise as rw

    model = _model()
    data = [torch.randn(8, 5), torch.randn(8, 5)]
    plain = rw.NeuronPCA(model, data, verbosity="off", loss_fn=None, validation=None)
    npca = rw.NeuronPCA(model, data, verbosity="off", loss_fn="kl", validation=None)
    assert npca.has_gradients and not plain.has_gradients and npca.gradient_samples == 16
    for name in plain.layer_names:  # the activation statistics are those of the plain pass
        torch.testing.assert_close(npca.statistics(name).output.outer, plain.statistics(name).output.outer)
    moments, samples, _ = gradient_moments(model, data, {"0": model[0], "2": model[2]}, loss_fn="kl")
    torch.testing.assert_close(npca.fisher("2"), moments["2"].outer / samples)
    npca.save(tmp_path / "npca.pt")
    loaded = rw.NeuronPCA.load(tmp_path / "npca.pt")
    assert torch.equal(loaded.fisher("0"), npca.fisher("0")) and loaded.gradient_samples == 16
    merged = npca.merge(loaded)
    torch.testing.assert_close(merged.fisher("2"), npca.fisher("2"))
    assert merged.gradient_samples == 32
    with pytest.raises(ValueError, match="criterion: layer '2' has no gradient statistics"):
        plain.fisher("2")
    with pytest.raises(ValueError, match="merge: only one of the two NeuronPCA has gradient"):
        plain.merge(npca)
    with pytest.raises(ValueError, match="loss_fn: expected"):
        rw.NeuronPCA(model, data, verbosity="off", loss_fn="l1")

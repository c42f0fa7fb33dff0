"""Shared helpers of the width-evolution tests (test_evolve_*.py): float64 checks of functions."""

import copy

import torch
from torch import nn


def randomise_batchnorms(model, seed=0):
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            channels = module.num_features
            module.running_mean.copy_(torch.rand(channels, generator=generator) - 0.5)
            module.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(channels, generator=generator))
            module.bias.data.copy_(torch.rand(channels, generator=generator) - 0.5)
    return model


def outputs(model, inputs, train=False):
    """The model's outputs in eval (default) or train mode, without gradients.

    Train mode runs on a copy, so the BatchNorm running statistics of ``model`` stay as they are.
    """
    was_training = model.training
    network = copy.deepcopy(model) if train else model
    network.train(train)
    with torch.no_grad():
        result = network(inputs)
    model.train(was_training)
    return result


def assert_same_function(model, inputs, reference, atol=1e-10):
    torch.testing.assert_close(outputs(model, inputs), reference, rtol=0, atol=atol)


def loss_drops_after_one_step(model, optimizer, inputs, targets):
    """One optimizer step on a fixed batch lowers the loss on that batch."""
    loss_function = nn.functional.cross_entropy
    model.train()
    before = loss_function(model(inputs), targets)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss_function(model(inputs), targets)
    return after.item() < before.item()


def assert_state_matches(optimizer):
    """Every state tensor that is not a scalar has its parameter's shape."""
    for parameter, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                assert value.shape == parameter.shape, key

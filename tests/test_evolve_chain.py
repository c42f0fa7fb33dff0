"""Width evolution on plain chains: Linear/ReLU/BatchNorm stacks, the evolver's API and errors.

Growing every width, shrinking with zero tolerance and removing dead, proportional or rotated
directions exactly are rows of the table in test_cases.py."""

import pytest
import torch
from torch import nn

import rankwise as rw
from conftest import assert_unchanged, state_of
from evolve_helpers import assert_state_matches, loss_drops_after_one_step
from structures import chain, shared_net


def inputs(count=64, seed=1):
    return torch.randn(count, 20, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def evolver(model, **settings):
    return rw.WidthEvolver(model, inputs(1), **{"verbosity": "off", **settings})


def test_the_graph_lists_every_width_and_freezes_the_output():
    ev = evolver(chain())
    assert ev.widths() == {"0": 16, "3": 12, "5": 8}
    assert list(ev.frozen) == ["6"] and "network output" in ev.frozen["6"][0]
    groups = ev.groups
    assert [m.name for m in groups["0"].batchnorms] == ["1"] and groups["0"].folded_batchnorms == {"0": "1"}
    assert [c.name for c in groups["0"].consumers] == ["3"]
    assert not groups["0"].rotatable and not groups["3"].rotatable and groups["5"].rotatable
    assert "frozen" in ev.summary()


def test_new_rows_are_orthogonal_to_the_existing_ones():
    model = chain()
    old_rows = model[3].weight.detach().clone()
    evolver(model).grow("3", 2)
    new_rows = model[3].weight.detach()[12:]
    assert torch.allclose(new_rows @ old_rows.T, torch.zeros(2, 12, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(new_rows @ new_rows.T, torch.diag(new_rows.norm(dim=1) ** 2), atol=1e-10)
    assert torch.count_nonzero(model[5].weight[:, 12:]) == 0


def test_optimizer_state_follows_every_change_and_training_goes_on():
    model, x = chain(), inputs()
    targets = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ev = evolver(model, shrink_tol=0.3)
    ev.attach(optimizer)
    for _ in range(3):
        loss_drops_after_one_step(model, optimizer, x, targets)
    graph_built_before_the_change = model(x).sum()  # noqa: F841 (kept alive on purpose)
    assert ev.shrink(data=[x])
    assert_state_matches(optimizer)
    assert loss_drops_after_one_step(model, optimizer, x, targets)
    ev.grow("3", 4)
    assert_state_matches(optimizer)
    assert loss_drops_after_one_step(model, optimizer, x, targets)
    assert {id(p) for p in model.parameters()} == {id(p) for g in optimizer.param_groups for p in g["params"]}


def test_step_changes_widths_on_schedule_and_records_history(tmp_path):
    model, x = chain(), inputs()
    ev = evolver(model, shrink_tol=0.3, every=3, until=3)
    assert [bool(ev.step(data=[x])) for _ in range(6)] == [False, False, True, False, False, False]
    ev.log(accuracy=0.5)
    assert [e.kind for e in ev.history.events][0] == "start" and ev.history.events[-1].step == 3
    assert ev.history.metrics == {"accuracy": [(6, 0.5)]}
    ev.history.plot(tmp_path / "evolution.png")
    assert (tmp_path / "evolution.png").stat().st_size > 0


def test_saturated_widths_grow_by_the_step_the_evolver_picks():
    model = chain()
    with torch.no_grad():
        model[5].weight[:, 6:] = 0.0                     # fc3 sees 6 of its 12 inputs: rank 7
    ev = evolver(model, shrink_tol=0.01, grow_tol=0.02, max_width=14)
    saturated = {name for name in ev.widths() if ev.spectrum(name)[-1] >= 0.02 * ev.spectrum(name)[0]}
    assert saturated == {"0", "3"}
    assert ev.grow() == {"3": (12, 14)}                  # "0" is already above max_width


@pytest.mark.parametrize("call, message", [
    (lambda ev: ev.grow("nope"), "layer: no width named 'nope'"),
    (lambda ev: ev.grow("6"), "is frozen"),
    (lambda ev: ev.grow("3", 0), "n: expected a positive integer"),
    (lambda ev: ev.shrink(data=[]), "data: the iterable yielded no batch"),
    (lambda ev: ev.attach(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1)), "optimizer: it holds none"),
])
def test_bad_arguments_raise_and_leave_the_model_untouched(call, message):
    model = chain()
    with torch.no_grad():
        model[3].weight[4].zero_()
        model[3].bias[4] = 0.0
    ev = evolver(model, shrink_tol=1e-9, max_width=20)
    snapshot = state_of(model)
    with pytest.raises(ValueError, match=message):
        call(ev)
    assert_unchanged(model, snapshot)


@pytest.mark.parametrize("settings, message", [
    (dict(shrink_tol=0.5, grow_tol=0.5), "grow_tol: must be larger than shrink_tol"),
    (dict(shrink_tol=-1), "shrink_tol: expected a number in"),
    (dict(min_width=0), "min_width"),
    (dict(max_width=0), "max_width"),
    (dict(verbosity="loud"), "verbosity"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        evolver(chain(), **settings)


def test_a_layer_called_twice_is_frozen():
    ev = evolver(shared_net())
    assert ev.widths() == {}
    assert "called more than once" in ev.frozen["fc"][0]


def test_an_untraceable_model_is_refused_with_the_fix():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(20, 3)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(ValueError, match="model: torch.fx cannot trace it"):
        evolver(Branchy())

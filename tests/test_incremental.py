"""compress_incrementally: rollback, tolerance, history; and the sensitivity probe."""

import pytest

import rankwise as rw
from conftest import assert_unchanged, blob_task, state_of


def calibration(train):
    return [x for x, _ in train]


def test_history_is_complete_and_the_goal_is_met():
    model, train, val, accuracy = blob_task()
    net, history = rw.compress_incrementally(model, calibration(train), train_data=train,
                                             eval_fn=accuracy, learnables_reduction_goal=0.5,
                                             tolerance=0.05, val_data=val, verbosity="off")
    assert history.goal_reached and history.learnables_reduction >= 0.5
    assert history.final_learnables == rw.count_learnables(net)
    assert history.original_metric == accuracy(model)
    assert history.steps and history.steps[0].layer == "2"  # the largest layer goes first
    for step in history.steps:
        assert step.side in ("input", "output", "both")
        assert step.layer_learnables_after < step.layer_learnables_before
        assert step.fine_tune.train_loss and step.seconds > 0
        assert 0 <= step.metric_before_fine_tune <= 1 and 0 <= step.metric_after_fine_tune <= 1
    assert str(history).splitlines()[0].startswith("layer")


def test_a_flops_goal_is_counted_on_the_current_network():
    model, train, val, accuracy = blob_task()
    example = calibration(train)[0]
    net, history = rw.compress_incrementally(model, calibration(train), train_data=train, eval_fn=accuracy,
                                             flops_reduction_goal=0.4, tolerance=0.5, val_data=val,
                                             verbosity="off")
    assert (history.flops_before, history.flops_after) == (rw.count_flops(model, example),
                                                           rw.count_flops(net, example))
    assert history.goal_reached and history.flops_after <= 0.6 * history.flops_before
    assert "FLOPs" in history.table() and "flops_reduction_goal=0.4" in history.table()


def test_tolerance_decides_what_is_kept():
    model, train, val, accuracy = blob_task()
    _, history = rw.compress_incrementally(model, calibration(train), train_data=train,
                                           eval_fn=accuracy, learnables_reduction_goal=0.9,
                                           tolerance=0.02, verbosity="off")
    for step in history.steps:
        assert step.kept == (step.metric_after_fine_tune >= history.original_metric - 0.02)


def test_rolled_back_steps_restore_the_exact_weights():
    model, train, _, _ = blob_task()
    snapshot = state_of(model)

    def rejects_projection(m):
        return 0.0 if any(isinstance(x, rw.ProjectedLayer) for x in m.modules()) else 1.0

    net, history = rw.compress_incrementally(model, calibration(train), train_data=train,
                                             eval_fn=rejects_projection, learnables_reduction_goal=0.5,
                                             verbosity="off")
    assert history.steps and not history.projected_layers
    assert history.skipped_layers == [s.layer for s in history.steps]
    assert not history.goal_reached
    assert_unchanged(net, snapshot)      # fine-tuning of rejected steps left no trace
    assert_unchanged(model, snapshot)    # the input model was never touched


def test_a_poorly_projectable_layer_is_skipped_and_others_make_up_for_it():
    model, train, _, accuracy = blob_task()

    def hates_layer_2(m):
        return 0.0 if isinstance(m[2], rw.ProjectedLayer) else accuracy(m)

    net, history = rw.compress_incrementally(model, calibration(train), train_data=train,
                                             eval_fn=hates_layer_2, learnables_reduction_goal=0.15,
                                             tolerance=0.05, verbosity="off")
    assert history.skipped_layers == ["2"]
    assert not isinstance(net[2], rw.ProjectedLayer)
    assert history.goal_reached and history.learnables_reduction >= 0.15


def test_explicit_order_and_plot(tmp_path):
    model, train, _, accuracy = blob_task()
    _, history = rw.compress_incrementally(model, calibration(train), train_data=train, eval_fn=accuracy,
                                           explained_variance_goal=0.9, order=["4", "0"],
                                           tolerance=1.0, verbosity="off")
    assert [s.layer for s in history.steps] == ["4", "0"][:len(history.steps)]
    history.plot(tmp_path / "history.png")
    assert (tmp_path / "history.png").stat().st_size > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"order": "random"}, "order: expected one of"),
    ({"order": ["0", "7"]}, "order: give each of the layers"),
    ({"tolerance": -1}, "tolerance"),
    ({"learnables_reduction_goal": 2.0}, "learnables_reduction_goal"),
    ({"layer_names": ["1"]}, "'1' cannot be projected"),
])
def test_bad_arguments(kwargs, message):
    model, train, _, accuracy = blob_task()
    snapshot = state_of(model)
    with pytest.raises(ValueError, match=message):
        rw.compress_incrementally(model, calibration(train), train_data=train, eval_fn=accuracy,
                                  verbosity="off", **kwargs)
    assert_unchanged(model, snapshot)


def test_sensitivity_probe_projects_one_layer_at_a_time():
    model, train, _, accuracy = blob_task()
    snapshot = state_of(model)
    goals = (0.99, 0.5)
    result = rw.probe_sensitivity(model, calibration(train), accuracy, explained_variance_goals=goals,
                                  verbosity="off")
    assert_unchanged(model, snapshot)
    assert list(result.layers) == ["0", "2", "4"]
    for name, points in result.layers.items():
        assert [p.explained_variance_goal for p in points] == list(goals)
        assert points[1].layer_learnables <= points[0].layer_learnables
        single, _ = rw.compress_network_using_projection(model, calibration(train), layer_names=[name],
                                                         explained_variance_goal=0.5, verbosity="off")
        assert points[1].metric == accuracy(single)
        assert points[0].metric >= result.original_metric - 0.05  # 99% of the variance kept: harmless
    assert max(result.metric_drop(n) for n in result.layers) > 0  # 50% is not harmless everywhere
    assert "ev 0.99" in result.table()


@pytest.mark.parametrize("goal_name, goal", [("explained_variance_goal", 0.9), ("learnables_reduction_goal", 0.5)])
def test_the_first_step_takes_the_one_shot_choice_of_its_layer(goal_name, goal):
    """Step 1 runs on the original network: its layer gets what one-shot compression gives it
    (the allocation's option itself, not one re-derived from its explained variance)."""
    model, train, _, accuracy = blob_task()
    data = calibration(train)
    _, history = rw.compress_incrementally(model, data, train_data=train, eval_fn=accuracy,
                                           tolerance=1.0, fine_tune_epochs=1, verbosity="off",
                                           **{goal_name: goal})
    first = history.steps[0]
    _, one_shot = rw.compress_network_using_projection(
        model, rw.NeuronPCA(model, data, layer_names=["2", "0", "4"], verbosity="off", loss_fn=None, validation=None),
        layer_names=None if goal_name == "learnables_reduction_goal" else [first.layer],
        verbosity="off", criterion="variance", allocation="global", **{goal_name: goal})
    expected = one_shot.layers[first.layer]
    assert (first.side, first.rank_in, first.rank_out, first.layer_learnables_after) == \
        (expected.side, expected.rank_in, expected.rank_out, expected.learnables_after)


def test_excluded_layers_are_never_stepped_on():
    model, train, _, accuracy = blob_task()
    _, history = rw.compress_incrementally(model, calibration(train), train_data=train, eval_fn=accuracy,
                                           learnables_reduction_goal=0.3, tolerance=1.0, exclude="2",
                                           verbosity="off")
    assert history.steps and "2" not in [s.layer for s in history.steps]

"""rw.analyze and its report: per-layer analysis, the network's trade-off curve, table, JSON, HTML."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import rankwise as rw
from conftest import assert_unchanged, make_batches, state_of, tiny_mlp
from rankwise.ranks import layer_options, tradeoff_curve
from rankwise.report import render_html
from rankwise.report.plots import require_matplotlib


def test_side_residuals_cover_each_analysed_side(model_and_data):
    model, data = model_and_data
    npca = rw.NeuronPCA(model, data, verbosity="off")
    for name in npca.layer_names:
        stats, options = npca.statistics(name), layer_options(npca, name)
        expected = {"output"} if stats.kind == "linear" else {"input", "output"}
        assert set(options.side_residuals) == expected
        for side, residual in options.side_residuals.items():
            width = stats.out_channels if side == "output" else stats.in_channels
            assert residual.shape == (width,)
            assert np.all(np.diff(residual) <= 0) and residual[-1] == pytest.approx(0, abs=1e-9)


def test_tradeoff_curve_follows_the_global_allocation(model_and_data):
    model, data = model_and_data
    npca = rw.NeuronPCA(model, data, verbosity="off")
    options = {name: layer_options(npca, name) for name in npca.layer_names}
    reduction, explained = tradeoff_curve(options, npca.network_learnables)
    assert (reduction[0], explained[0]) == (0.0, 1.0)
    assert np.all(np.diff(reduction) > 0) and np.all(np.diff(explained) <= 1e-12)
    assert reduction[-1] == pytest.approx(npca.learnables_reduction_range[1])
    for goal, curve_explained in zip(reduction[1:], explained[1:]):
        _, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=goal,
                                                       verbosity="off", criterion="variance", allocation="global")
        assert info.learnables_reduction >= goal - 1e-12
        assert info.explained_variance >= curve_explained - 1e-9


def mixed_model():
    """Projectable layers beside a grouped convolution, a BatchNorm and an existing wrapper."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 10))
    model[8] = rw.ProjectedLinear.from_dense(model[8], output_basis=torch.eye(10)[:, :4])
    return model.eval()


@pytest.fixture(scope="module")
def mixed():
    model, data = mixed_model(), make_batches((16, 3, 8, 8))
    npca = rw.NeuronPCA(model, data, verbosity="off")
    return model, npca, rw.analyze(model, npca, verbosity="off")


def test_every_layer_is_listed_with_why_it_cannot_be_projected(mixed):
    model, npca, report = mixed
    assert list(report.layers) == ["0", "1", "3", "6", "8"]
    assert report.analysed_layers == ["0", "6"] == npca.layer_names
    assert [report.layers[n].type for n in report.layers] == [
        "Conv2d", "BatchNorm2d", "Conv2d", "Linear", "ProjectedLinear"]
    assert "not supported" in report.layers["1"].reason and not report.layers["1"].projectable
    assert "grouped convolution" in report.layers["3"].reason
    assert report.layers["8"].reason == "it is already compressed (ProjectedLinear)"
    assert report.layers["8"].learnables == rw.count_learnables(model[8])
    assert set(report.layers["0"].sides) == {"input", "output"}
    assert set(report.layers["6"].sides) == {"output"}
    for name in report.analysed_layers:
        layer = report.layers[name]
        assert layer.learnables == rw.count_learnables(model.get_submodule(name))
        assert 0 <= layer.lossless_reduction <= layer.max_reduction < 1
        spectrum = layer.sides["output"]
        assert np.all(np.diff(spectrum.eigenvalues) <= 0)
        assert spectrum.explained_variance[-1] == pytest.approx(1)
    assert report.learnables_reduction_range == pytest.approx(npca.learnables_reduction_range)


def test_goals_give_what_compression_would(mixed):
    model, npca, report = mixed
    assert list(report.goals) == [f"explained_variance_goal={g:g}" for g in (0.9, 0.95, 0.99)] + \
        [f"learnables_reduction_goal={g:g}" for g in (0.5, 0.8, 0.9)]
    for goal, predicted in report.goals.items():
        name, value = goal.split("=")
        _, info = rw.compress_network_using_projection(model, npca, **{name: float(value)}, verbosity="off",
                                                       criterion="variance", allocation="global")
        assert predicted == info  # the analysis predicts the variance criterion's global allocation


def test_analysis_reuses_the_statistics_and_leaves_the_model_untouched(mixed):
    model, npca, _ = mixed
    snapshot = state_of(model)
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        report = rw.analyze(model, npca, verbosity="off", learnables_reduction_goals=[0.3])
    finally:
        handle.remove()
    assert calls == [] and list(report.goals)[-1] == "learnables_reduction_goal=0.3"
    assert_unchanged(model, snapshot)


def test_data_layer_names_and_npca_restrict_the_analysis():
    model, data = mixed_model(), make_batches((16, 3, 8, 8))
    report = rw.analyze(model, data, layer_names=["6"], verbosity="off")
    assert report.analysed_layers == ["6"]
    assert report.layers["0"].projectable and report.layers["0"].reason == "not selected by layer_names"
    partial = rw.NeuronPCA(model, data, layer_names=["0"], verbosity="off")
    report = rw.analyze(model, partial, verbosity="off")
    assert report.analysed_layers == ["0"]
    assert report.layers["6"].reason == "the NeuronPCA holds no statistics of it"


@pytest.mark.parametrize("kwargs, message", [
    ({"explained_variance_goals": [0.9, 1.5]}, "explained_variance_goals: expected a number in \\[0, 1\\]"),
    ({"learnables_reduction_goals": 0.5}, "learnables_reduction_goals: expected a sequence"),
    ({"layer_names": ["1"]}, "layer_names: '1' cannot be projected"),
    ({"verbosity": "loud"}, "verbosity"),
])
def test_bad_arguments_name_the_argument(mixed, kwargs, message):
    model, npca, _ = mixed
    snapshot = state_of(model)
    with pytest.raises(ValueError, match=message):
        rw.analyze(model, npca, **kwargs)
    assert_unchanged(model, snapshot)


def test_statistics_of_another_model_are_refused(mixed):
    _, npca, _ = mixed
    with pytest.raises(ValueError, match="npca_or_data: .*none of the model's projectable layers"):
        rw.analyze(nn.Sequential(nn.Identity(), nn.Linear(3, 3)), npca, verbosity="off")
    other = mixed_model()
    other[0] = nn.Conv2d(3, 5, 3)
    with pytest.raises(ValueError, match="npca_or_data: layer '0' has shape"):
        rw.analyze(other, npca, verbosity="off")


def test_table_lists_goals_layers_and_reasons(mixed, capsys):
    model, npca, report = mixed
    table = report.table()
    for text in ("learnables_reduction_goal=0.8", "var>=0.95", "removed>=90%",
                 "not projectable: it is a grouped convolution", "network: ",
                 "not of a projectable kind, kept as they are: 1 BatchNorm2d (16 learnables)",
                 "var>=X: explained_variance_goal=X", "'in 5 out 15', input projected onto its 5"):
        assert text in " ".join(table.split())  # the legends are wrapped
    assert "ev=" not in table and "lr=" not in table
    assert not any(line.split()[1:2] == ["BatchNorm2d"] for line in table.splitlines())  # no row of its own
    rw.analyze(model, npca, verbosity="summary")
    assert capsys.readouterr().out.strip() == table


def test_json_fields(mixed, tmp_path):
    _, _, report = mixed
    report.to_json(tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())
    assert (data["format"], data["format_version"]) == ("rankwise-analysis", 1)
    network = data["network"]
    assert network["learnables"] == report.network_learnables
    assert network["analysed_layers"] == ["0", "6"]
    assert network["learnables_reduction_range"] == list(report.learnables_reduction_range)
    curve = network["tradeoff"]
    assert len(curve["learnables_reduction"]) == len(curve["explained_variance"]) > 2
    assert [g["goal"] for g in data["goals"]] == list(report.goals)
    goal = data["goals"][3]
    assert (goal["name"], goal["value"]) == ("learnables_reduction_goal", 0.5)
    assert goal["learnables_after"] == report.goals[goal["goal"]].learnables_after
    assert set(goal) == {"goal", "name", "value", "goal_reached", "learnables_after",
                         "learnables_reduction", "explained_variance", "flops_before", "flops_after"}
    assert goal["flops_before"] is None  # counted under a FLOPs goal only
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert list(layers) == list(report.layers)
    conv = layers["0"]
    assert set(conv) == {"name", "type", "learnables", "projectable", "reason", "max_reduction",
                         "lossless_reduction", "min_learnables", "lossless_learnables", "sides", "goals"}
    assert len(conv["sides"]["input"]["explained_variance"]) == 3
    assert len(conv["sides"]["output"]["eigenvalues"]) == 8
    assert set(conv["goals"]) == set(report.goals)
    assert set(conv["goals"]["explained_variance_goal=0.9"]) == {
        "side", "rank_in", "rank_out", "learnables", "explained_variance"}
    assert layers["1"]["max_reduction"] is None and layers["1"]["goals"] == {} and layers["1"]["sides"] == {}


@pytest.fixture(scope="module")
def html_page(mixed, tmp_path_factory):
    """The analysis written by ``to_html``, drawn once for the tests below."""
    _, _, report = mixed
    path = tmp_path_factory.mktemp("html") / "report.html"
    report.to_html(path)
    return path


def test_report_groups_layers_of_no_projectable_kind_and_keeps_refusals():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.LayerNorm(4 * 8 * 8), nn.Linear(4 * 8 * 8, 10))
    report = rw.analyze(model, make_batches((16, 3, 8, 8)), verbosity="off")
    assert list(report.layers) == ["0", "1", "3", "4", "7", "8"]  # the report itself lists all
    table = report.table()
    assert ("not of a projectable kind, kept as they are: 2 BatchNorm2d (16 learnables), "
            "1 LayerNorm (512 learnables)") in table
    rows = [line.split()[:2] for line in table.splitlines()]
    assert ["3", "Conv2d"] in rows and ["1", "BatchNorm2d"] not in rows and ["7", "LayerNorm"] not in rows
    assert "grouped convolution" in table


def test_repr_is_short_and_notebooks_get_the_tables(mixed):
    _, _, report = mixed
    lossless, maximum = report.learnables_reduction_range
    assert repr(report) == (f"<AnalysisReport network: 8,714 learnables, 2 layers analysed; projection "
                            f"removes {lossless:.1%} without losing variance, at most {maximum:.1%}; "
                            "6 goals; print(report) for the tables>")
    fragment = report._repr_html_()
    assert fragment.count("<table") == 2 and "<img" not in fragment
    assert "explained variance \u2265 0.95" in fragment


def test_html_spells_the_goals_out_and_says_how_to_read_each_part(html_page):
    page = re.sub(r'src="data:image/png;base64,[^"]+"', "", html_page.read_text())
    text = re.sub(r"<[^>]+>", " ", page)
    assert "ev=" not in text and "lr=" not in text
    for words in ("explained variance \u2265 0.9", "learnables removed \u2265 50%",
                  "learnables_reduction_goal=0.5",  # the argument, beside its spelled-out form
                  "&#x27;in 5 out 15&#x27;, input projected onto its 5 leading principal directions",
                  "The curve: the explained variance the network keeps", "Per analysed layer: left",
                  "not of a projectable kind, kept as they are: 1 BatchNorm2d (16 learnables)"):
        assert words in text
    assert text.count("BatchNorm2d") == 1
    assert page.count('<p class="legend">') == 6


def test_html_is_self_contained(html_page):
    page = html_page.read_text()
    assert page.count('<table class="layers">') == 1 and page.count('<table class="goals">') == 1
    images = re.findall(r'<img class="plot (\w+)"[^>]* src="data:image/png;base64,([^"]+)"', page)
    assert [kind for kind, _ in images] == ["tradeoff", "learnables", "spectrum", "spectrum"]
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for _, data in images)
    assert not re.search(r'(src|href)="(?!data:)', page) and "<script" not in page


def test_several_reports_share_one_page():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    report = rw.analyze(model, make_batches((16, 4)), verbosity="off", explained_variance_goals=(),
                        learnables_reduction_goals=())
    page = render_html({"first": report, "second <model>": report})
    assert page.count("<section>") == 2 and "second &lt;model&gt;" in page
    assert "<title>first / second &lt;model&gt;</title>" in page


def test_missing_matplotlib_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'rankwise\[report\]'"):
        require_matplotlib()


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                    "(Debian package 'chromium', /usr/bin/chromium)")
def test_html_renders_in_headless_chromium(html_page, tmp_path):
    probe = tmp_path / "probe.html"  # the page, plus a script recording each image's decoded width
    probe.write_text(html_page.read_text().replace(
        "</body>", "<script>window.addEventListener('load', () => { for (const img of document.images) "
        "img.dataset.decodedWidth = img.naturalWidth; });</script></body>"))
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    assert '<table class="layers">' in dom and '<table class="goals">' in dom
    assert "BatchNorm2d" in dom and "learnables_reduction_goal=0.9" in dom
    widths = [int(w) for w in re.findall(r'data-decoded-width="(\d+)"', dom)]
    assert len(widths) == 4 and all(w > 100 for w in widths)


def test_recurrent_layers_of_several_cells_get_ranks_per_cell(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.GRU(6, 12, num_layers=2, bidirectional=True, batch_first=True))
    report = rw.analyze(model, make_batches((8, 9, 6), count=4), verbosity="off")
    gru = report.layers["0"]
    assert gru.analysed and gru.sides == {} and gru.type == "GRU"
    ranks = report.goals["learnables_reduction_goal=0.5"].layers["0"]
    assert len(ranks.rank_out) == 4
    assert re.search(r"(in|out) [-\d]+(/[-\d]+){3}", report.table())
    report.to_json(tmp_path / "gru.json")
    layer = json.loads((tmp_path / "gru.json").read_text())["layers"][0]
    assert len(layer["goals"]["learnables_reduction_goal=0.5"]["rank_out"]) == 4
    report.to_html(tmp_path / "gru.html")  # no spectrum plot for a layer of several cells
    assert (tmp_path / "gru.html").read_text().count('<img class="plot') == 2


def test_the_sensitivity_probe_appears_in_every_form_of_the_report(tmp_path):
    torch.manual_seed(0)
    model, data = tiny_mlp(), make_batches((32, 12))
    probe = torch.randn(64, 12)
    reference = model(probe).argmax(1)

    def agreement(m):
        with torch.no_grad():
            return (m(probe).argmax(1) == reference).float().mean().item()

    report = rw.analyze(model, data, explained_variance_goals=(0.99, 0.5), learnables_reduction_goals=(),
                        eval_fn=agreement, verbosity="off")
    assert report.sensitivity.original_metric == 1.0
    assert list(report.sensitivity.layers) == report.analysed_layers
    assert [p.explained_variance_goal for p in report.sensitivity.layers["0"]] == [0.99, 0.5]
    assert "sensitivity" in report.table() and "ev 0.99" in report.table()
    report.to_json(tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["sensitivity"]["layers"]["2"][1]["explained_variance_goal"] == 0.5
    report.to_html(tmp_path / "r.html")
    assert "<h2>Sensitivity</h2>" in (tmp_path / "r.html").read_text()
    assert rw.analyze(model, data, verbosity="off").sensitivity is None


def test_exclude_leaves_layers_out_of_the_analysis_and_says_so():
    torch.manual_seed(0)
    model, data = tiny_mlp().eval(), make_batches((32, 12))
    report = rw.analyze(model, data, exclude=["2"], verbosity="off")
    assert report.analysed_layers == ["0", "4"]
    assert report.layers["2"].reason == "excluded by exclude" and report.layers["2"].projectable
    for goal, info in report.goals.items():
        name, value = goal.split("=")
        _, built = rw.compress_network_using_projection(model, data, exclude="2", verbosity="off",
                                                        criterion="variance", allocation="global",
                                                        validation=None, **{name: float(value)})
        assert info == built and info.excluded == ["2"]

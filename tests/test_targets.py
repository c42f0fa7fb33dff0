"""One selector: exact names, glob patterns, 're:' regular expressions and exclude=, shared by
projection (select_layers, NeuronPCA) and kernel truncation (select_kernels, truncate_kernels)."""

import re

import pytest
import torch
from torch import nn

import rankwise as rw
from conftest import assert_unchanged, make_batches, state_of, tiny_cnn
from rankwise.decompose.truncatable import select_kernels
from rankwise.targets import select_layers


class Blocks(nn.Module):
    """Two blocks of two convolutions, a grouped convolution and a head: names with dots."""

    def __init__(self):
        super().__init__()
        self.features = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                                     nn.Conv2d(4, 4, 3, padding=1)) for _ in range(2)])
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for block in self.features:
            x = block(x) if block[0].in_channels == x.shape[1] else block(x[:, :3])
        return self.head(self.grouped(x).mean((2, 3)))


PROJECTABLE = ["features.0.0", "features.0.2", "features.1.0", "features.1.2", "head"]

SELECTIONS = {  # case -> (layer_names, exclude, the selected layers)
    "every layer": (None, None, PROJECTABLE),
    "exact names, model order": (["head", "features.0.0"], None, ["features.0.0", "head"]),
    "one exact name as a string": ("head", None, ["head"]),
    "glob over a block": ("features.0.*", None, ["features.0.0", "features.0.2"]),
    "glob with a leading star": ("*.2", None, ["features.0.2", "features.1.2"]),
    "glob that also meets refused layers": ("*", None, PROJECTABLE),
    "glob character class": ("features.[1].0", None, ["features.1.0"]),
    "regular expression": (r"re:features\.\d\.0", None, ["features.0.0", "features.1.0"]),
    "regular expressions match whole names": ("re:features", None, None),
    "exclude a name": (None, "head", PROJECTABLE[:-1]),
    "exclude a glob": (None, ["features.1.*"], ["features.0.0", "features.0.2", "head"]),
    "exclude a regular expression": (None, r"re:.*\.2", ["features.0.0", "features.1.0", "head"]),
    "names and exclude together": ("features.*", "*.0", ["features.0.2", "features.1.2"]),
    "empty exclude": (None, [], PROJECTABLE),
}


@pytest.mark.parametrize("case", list(SELECTIONS))
def test_selection_by_names_globs_regexes_and_exclude(case):
    layer_names, exclude, expected = SELECTIONS[case]
    if expected is None:
        with pytest.raises(ValueError, match="layer_names: 're:features' matches no layer that can be projected"):
            select_layers(Blocks(), layer_names, exclude)
        return
    assert list(select_layers(Blocks(), layer_names, exclude)) == expected


BAD_SELECTIONS = {  # case -> (layer_names, exclude, the start of the message)
    "unknown name": (["head", "tail"], None,
                     "layer_names: 'tail' is not a layer of the model. Projectable layers: " + ", ".join(PROJECTABLE)),
    "glob matching nothing": ("classifier.*", None,
                              "layer_names: 'classifier.*' matches no layer that can be projected. Projectable layers: "),
    "glob matching only refused layers": ("features.*.1", None, "layer_names: 'features.*.1' matches no layer"),
    "refused exact name": ("features.0.1", None,
                           "layer_names: 'features.0.1' cannot be projected: ReLU layers are not supported"),
    "refusal from the kinds table": ("grouped", None,
                                     "layer_names: 'grouped' cannot be projected: it is a grouped convolution (groups=2)"),
    "container": ("features.0", None, "layer_names: 'features.0' cannot be projected: Sequential layers"),
    "invalid regular expression": ("re:(", None, "layer_names: 're:(' is not a valid regular expression"),
    "not a string": ([nn.Linear], None, "layer_names: expected layer names or patterns (strings)"),
    "empty list": ([], None, "layer_names: the list is empty"),
    "unknown exclude": (None, "tail", "exclude: 'tail' is not a layer of the model. Projectable layers: "),
    "exclude glob matching nothing": (None, "*.conv", "exclude: '*.conv' matches no layer that can be projected"),
    "exclude of a refused layer": (None, "grouped", "exclude: 'grouped' cannot be projected: it is a grouped"),
    "exclude everything": ("head", "*", "exclude: it leaves no layer to be projected (it removes "),
}


@pytest.mark.parametrize("case", list(BAD_SELECTIONS))
def test_selection_errors_name_the_argument_and_say_why(case):
    layer_names, exclude, message = BAD_SELECTIONS[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        select_layers(Blocks(), layer_names, exclude)


def test_neuron_pca_takes_patterns_and_exclude_and_leaves_the_model():
    model, data = Blocks(), make_batches((4, 3, 5, 5), count=2)
    snapshot = state_of(model)
    npca = rw.NeuronPCA(model, data, layer_names="features.*", exclude="re:.*1\\.2", verbosity="off")
    assert npca.layer_names == ["features.0.0", "features.0.2", "features.1.0"]
    with pytest.raises(ValueError, match="exclude: 'nope' is not a layer of the model"):
        rw.NeuronPCA(model, data, exclude=["nope"], verbosity="off")
    assert_unchanged(model, snapshot)
    assert all(not m._forward_hooks for m in model.modules())


def test_kernel_selection_is_the_same_algorithm_over_truncatable_layers():
    model = Blocks()
    assert list(select_kernels(model)) == PROJECTABLE[:-1]  # the head is no convolution
    assert list(select_kernels(model, "*.0", exclude="features.1.*")) == ["features.0.0"]
    with pytest.raises(ValueError, match="layer_names: 'head' cannot be truncated: Linear layers"):
        select_kernels(model, "head")
    with pytest.raises(ValueError, match="exclude: 'grouped' cannot be truncated: it is a grouped"):
        select_kernels(model, exclude="grouped")
    with pytest.raises(ValueError, match="ranks: 'x.*' matches no layer that can be truncated. "
                                         "Truncatable layers: features.0.0, "):
        select_kernels(model, ["x.*"], argument="ranks")


def test_truncate_kernels_with_patterns_and_exclude():
    torch.manual_seed(0)
    model = tiny_cnn()
    snapshot = state_of(model)
    _, info = rw.truncate_kernels(model, "cut", ranks=1, layer_names="re:\\d", exclude="2", verbosity="off")
    assert info.layer_names == ["0"]  # the info lists what matched
    _, info = rw.truncate_kernels(model, "cut", ranks={"2": 1}, exclude="0", verbosity="off")
    assert info.layer_names == ["2"] and info.layers["2"].ranks == (1,)
    with pytest.raises(ValueError, match="ranks: '0' is not among the layers to truncate"):
        rw.truncate_kernels(model, "cut", ranks={"0": 1, "2": 1}, exclude="0", verbosity="off")
    with pytest.raises(ValueError, match="exclude: it leaves no layer to be truncated"):
        rw.truncate_kernels(model, "cut", ranks=1, exclude="*", verbosity="off")
    assert_unchanged(model, snapshot)

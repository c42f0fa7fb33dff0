"""One predicate for 'this module is, or is inside, a compressed form', read by every selector and the report."""

import pytest
import torch

import rankwise as rw
from conftest import make_batches, tiny_cnn
from rankwise.forms import compressed_parts


@pytest.fixture(scope="module")
def both():
    """The tiny CNN with its first convolution truncated and its second projected (unpacked)."""
    torch.manual_seed(0)
    data = make_batches((8, 3, 8, 8), count=3)
    truncated, _ = rw.truncate_kernels(tiny_cnn().eval(), "tucker", ranks=(4, 2), layer_names="0", verbosity="off")
    net, _ = rw.compress_network_using_projection(truncated, data, layer_names="2", explained_variance_goal=0.9,
                                                  unpack=True, verbosity="off")
    return net, data


def test_every_module_of_a_form_maps_to_its_outermost_form(both):
    net, _ = both
    assert compressed_parts(net) == {"0": "0", "0.0": "0", "0.1": "0", "0.2": "0",
                                     **{name: "2" for name, _ in net.named_modules() if name.split(".")[0] == "2"}}


def test_a_layer_inside_a_form_is_no_candidate_and_naming_it_says_where_it_lies(both):
    net, data = both
    with pytest.raises(ValueError, match=r"layer_names: '0.1' cannot be projected: it lies inside the compressed "
                                         r"form '0' \(TruncatedConv\)"):
        rw.compress_network_using_projection(net, data, layer_names="0.1", verbosity="off")
    with pytest.raises(ValueError, match=r"layer_names: '2.0' cannot be truncated: it lies inside the compressed "
                                         r"form '2' \(unpacked ProjectedConv\)"):
        rw.truncate_kernels(net, "cut", ranks=1, layer_names="2.0", verbosity="off")
    with pytest.raises(ValueError, match=r"layer_names: '0' cannot be truncated: it is already compressed "
                                         r"\(TruncatedConv\)"):
        rw.truncate_kernels(net, "cut", ranks=1, layer_names="0", verbosity="off")
    with pytest.raises(ValueError, match="model: it has no convolution whose kernel can be truncated"):
        rw.truncate_kernels(net, "cut", ranks=1, verbosity="off")
    assert rw.NeuronPCA(net, data, verbosity="off").layer_names == ["5"]


def test_the_report_lists_each_form_whole(both):
    net, data = both
    report = rw.analyze(net, data, verbosity="off")
    assert list(report.layers) == ["0", "2", "5"]
    assert report.layers["0"].reason == "it is already compressed (TruncatedConv)"
    assert report.layers["2"].reason == "it is already compressed (unpacked ProjectedConv)"
    assert report.layers["0"].learnables == rw.count_learnables(net.get_submodule("0"))

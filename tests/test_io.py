"""rw.save / rw.load: safetensors weights plus a plain spec, bit-exact round trips."""

import base64
import json
import pathlib
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import rankwise as rw
from conftest import assert_identical, assert_unchanged, make_batches, state_of, tiny_cnn
from rankwise import forms
from rankwise import io as rankwise_io
from structures import Recurrent

DENSE_LAYERS = {
    "linear": (lambda: nn.Linear(10, 7), (4, 10)),
    "conv1d": (lambda: nn.Conv1d(6, 8, 3, padding=1), (2, 6, 9)),
    "conv2d": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1, padding_mode="reflect"), (2, 6, 9, 9)),
    "conv3d": (lambda: nn.Conv3d(6, 8, 3, dilation=2), (2, 6, 7, 7, 7)),
}
RANKS = {"output": (None, 3), "input": (2, None), "both": (4, 5)}


def architecture(kind):
    """The uncompressed model: the dense layer, then a nonlinearity."""
    torch.manual_seed(1)
    return nn.Sequential(DENSE_LAYERS[kind][0](), nn.Tanh())


def projected_model(kind, side, unpacked):
    torch.manual_seed(0)
    model = architecture(kind)
    rank_in, rank_out = RANKS[side]
    dense = model[0]
    basis = {}
    if rank_in is not None:
        basis["input_basis"] = torch.linalg.qr(torch.randn(dense.weight.shape[1], rank_in))[0]
        basis["input_mean"] = torch.randn(dense.weight.shape[1])
    if rank_out is not None:
        basis["output_basis"] = torch.linalg.qr(torch.randn(dense.weight.shape[0], rank_out))[0]
        basis["output_mean"] = torch.randn(dense.weight.shape[0])
    cls = rw.ProjectedLinear if kind == "linear" else rw.ProjectedConv
    projected = cls.from_dense(dense, **basis)
    model[0] = projected.unpack() if unpacked else projected
    return model


@pytest.mark.parametrize("kind, side", [(kind, side) for kind in DENSE_LAYERS for side in RANKS])
@pytest.mark.parametrize("unpacked", [False, True], ids=["packed", "unpacked"])
def test_round_trip_is_bit_exact(tmp_path, kind, side, unpacked):
    model = projected_model(kind, side, unpacked)
    x = torch.randn(*DENSE_LAYERS[kind][1])
    path = tmp_path / "model.safetensors"
    rw.save(model, path, include_architecture=True)
    layer_spec = rankwise_io.read_spec(path)["layers"]["0"]
    assert layer_spec == {"type": "ProjectedLinear" if kind == "linear" else "ProjectedConv",
                          "rank_in": RANKS[side][0], "rank_out": RANKS[side][1], "unpacked": unpacked}
    fresh = architecture(kind)
    snapshot = state_of(fresh)
    assert_identical(rw.load(path, model=fresh), model, x)   # rebuilt from the spec
    assert_unchanged(fresh, snapshot)
    assert_identical(rw.load(path, trust_pickle=True), model, x)  # stored architecture (fallback)


def test_compressed_network_round_trip_keeps_dtype_buffers_and_info(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 10)).double().eval()
    data = [x.double() for x in make_batches((16, 3, 8, 8))]
    model(data[0])
    net, info = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.5,
                                                     verbosity="off")
    path = tmp_path / "net.safetensors"
    rw.save(net, path, info=info, include_architecture=True)
    spec = rankwise_io.read_spec(path)
    assert spec["learnables"] == rw.count_learnables(net) and spec["aliases"] == {}
    assert set(spec["layers"]) == set(info.layer_names)
    assert rankwise_io.projection_info(spec) == info
    json.dumps(spec)  # plain JSON throughout
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 10)).double().eval()
    for loaded in (rw.load(path, model=fresh), rw.load(path, trust_pickle=True)):
        assert_identical(loaded, net, data[1])
        assert loaded[1].num_batches_tracked.dtype == torch.int64


class TiedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.encode = nn.Linear(6, 6, bias=False)
        self.decode = nn.Linear(6, 6, bias=False)
        self.decode.weight = self.encode.weight
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)

    def forward(self, x):
        return self.decode(torch.tanh(self.encode(x))) * self.scale


def test_tied_weights_are_stored_once_and_non_persistent_buffers_survive(tmp_path):
    model = TiedModel()
    path = tmp_path / "tied.safetensors"
    rw.save(model, path, include_architecture=True)
    assert rankwise_io.read_spec(path)["aliases"] == {"decode.weight": "encode.weight"}
    assert list(rankwise_io.stored_tensors(path)) == ["encode.weight"]
    x = torch.randn(3, 6)
    for loaded in (rw.load(path, model=TiedModel()), rw.load(path, trust_pickle=True)):
        assert torch.equal(loaded(x), model(x))
        assert loaded.scale == 2.0


def test_new_wrapper_types_plug_into_the_registry():
    class ProjectedToy(rw.ProjectedLinear):
        pass

    registry = forms.form_types()
    assert {"ProjectedLinear", "ProjectedConv", "ProjectedLSTM", "ProjectedGRU", "TruncatedConv",
            "ProjectedToy"} <= set(registry)
    assert registry["ProjectedToy"] is ProjectedToy


def test_unpack_records_the_spec_of_the_wrapper():
    model = projected_model("conv2d", "both", unpacked=False)
    unpacked = rw.unpack_projected_layers(model)
    assert type(unpacked[0]) is nn.Sequential
    assert unpacked[0].rankwise_spec == model[0].spec()
    assert rankwise_io.model_spec(unpacked) == {"0": {**model[0].spec(), "unpacked": True}}


def test_errors_name_the_argument_and_leave_the_model_untouched(tmp_path):
    model = projected_model("conv2d", "output", unpacked=False)
    path = tmp_path / "model.safetensors"
    rw.save(model, path)
    wider = nn.Sequential(nn.Conv2d(6, 9, 3, stride=2, padding=1, padding_mode="reflect"), nn.Tanh())
    assert_identical(rw.load(path, model=wider), model, torch.randn(2, 6, 9, 9))
    wrong = nn.Sequential(nn.Conv2d(6, 8, 5), nn.Tanh())
    snapshot = state_of(wrong)
    with pytest.raises(ValueError, match="model: it does not match the file"):
        rw.load(path, model=wrong)
    assert_unchanged(wrong, snapshot)
    with pytest.raises(ValueError, match="model: its layer '0' is a ReLU, where the file holds a Conv2d"):
        rw.load(path, model=nn.Sequential(nn.ReLU(), nn.Tanh()))
    with pytest.raises(ValueError, match="model: it has no layer '0'"):
        rw.load(path, model=nn.Sequential())
    with pytest.raises(ValueError, match="model: its layer '0' is already compressed"):
        rw.load(path, model=model)
    with pytest.raises(ValueError, match="info: expected the ProjectionInfo"):
        rw.save(model, path, info={"goal": 0.5})

    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="path: .* is not a safetensors file"):
        rw.load(text)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not one written by rankwise.save"):
        rw.load(foreign)
    assert not rankwise_io.is_rankwise_file(foreign) and rankwise_io.is_rankwise_file(path)


def test_unknown_wrapper_type_says_what_to_import(tmp_path):
    spec = {"format": "rankwise-model", "format_version": 1, "rankwise_version": "0", "learnables": 0,
            "layers": {"0": {"type": "ProjectedNothing", "rank_in": None, "rank_out": 2,
                             "unpacked": False}}, "aliases": {}, "projection": None}
    path = tmp_path / "odd.safetensors"
    save_file({"0.weight": torch.zeros(2, 2)}, path, metadata={"rankwise": json.dumps(spec)})
    with pytest.raises(ValueError, match="'ProjectedNothing'.*import the module that defines it"):
        rw.load(path, model=nn.Sequential(nn.Linear(2, 2)))


def test_model_without_stored_architecture_needs_the_original(tmp_path):
    def local_model():  # a class defined here cannot be pickled by reference
        class Local(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = tiny_cnn()

            def forward(self, x):
                return self.body(x)
        return Local()

    model = local_model()
    snapshot = state_of(model)
    path = tmp_path / "local.safetensors"
    with pytest.raises(ValueError, match="include_architecture: the model's structure cannot be pickled"):
        rw.save(model, path, include_architecture=True)
    assert_unchanged(model, snapshot)
    rw.save(model, path)  # no pickle by default
    assert not rankwise_io.has_architecture(path)
    for trust_pickle in (False, True):
        with pytest.raises(ValueError, match="stores no architecture.*pass model="):
            rw.load(path, trust_pickle=trust_pickle)
    x = make_batches((2, 3, 8, 8))[0]
    assert torch.equal(rw.load(path, model=local_model())(x), model(x))


@pytest.mark.parametrize("dense_type, kwargs", [(nn.LSTM, {}),
                                                (nn.GRU, {"num_layers": 2, "bidirectional": True})])
def test_recurrent_round_trip_is_bit_exact(tmp_path, dense_type, kwargs):
    torch.manual_seed(0)
    model = Recurrent(dense_type, **kwargs).eval()
    data = make_batches((8, 9, 6), count=4)
    net, info = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.5,
                                                     unpack=True, verbosity="off")
    assert info.layers["rnn"].side != "dense"
    path = tmp_path / "recurrent.safetensors"
    rw.save(net, path, include_architecture=True)
    spec = rankwise_io.read_spec(path)["layers"]["rnn"]
    assert spec["type"] == f"Projected{dense_type.__name__}" and not spec["unpacked"]
    for loaded in (rw.load(path, model=Recurrent(dense_type, **kwargs)), rw.load(path, trust_pickle=True)):
        assert_identical(loaded.eval(), net, data[1])
    not_recurrent = Recurrent(dense_type, **kwargs)
    not_recurrent.rnn = nn.Linear(6, 12)
    with pytest.raises(ValueError, match=r"model: its layer 'rnn' \(Linear\) cannot become the file's"):
        rw.load(path, model=not_recurrent)


def test_version_1_files_still_load(tmp_path):
    """A file as rankwise 0.1 wrote it: format_version 1, no "shapes"."""
    model = projected_model("linear", "both", unpacked=False)
    spec = {"format": "rankwise-model", "format_version": 1, "rankwise_version": "0.1.0",
            "learnables": rw.count_learnables(model),
            "layers": {"0": {"type": "ProjectedLinear", "rank_in": 4, "rank_out": 5, "unpacked": False}},
            "aliases": {}, "projection": None}
    path = tmp_path / "v1.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path,
              metadata={"rankwise": json.dumps(spec)})
    assert rankwise_io.read_spec(path)["shapes"] == {}
    assert_identical(rw.load(path, model=architecture("linear")), model, torch.randn(4, 10))
    spec["format_version"] = 7
    save_file({"w": torch.zeros(1)}, path, metadata={"rankwise": json.dumps(spec)})
    with pytest.raises(ValueError, match="path: .* version 7; this rankwise reads .* versions 1, 2"):
        rw.load(path)


def test_resized_layers_are_rebuilt_from_the_shape_spec(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 7), nn.BatchNorm1d(7), nn.Linear(7, 3)).eval()
    evolved = nn.Sequential(nn.Linear(10, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).eval()
    path = tmp_path / "evolved.safetensors"
    rw.save(evolved, path)
    assert rankwise_io.read_spec(path)["shapes"]["1"] == {"type": "BatchNorm1d", "num_features": 5}
    snapshot = state_of(model)
    assert_identical(rw.load(path, model=model), evolved, torch.randn(4, 10))
    assert_unchanged(model, snapshot)
    with pytest.raises(ValueError, match="model: its layer '1' is a ReLU, where the file holds a BatchNorm1d"):
        rw.load(path, model=nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3)))


class WritesMarker:
    """Unpickled, it creates the file ``path``: what a crafted file could do (``os.system``)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def crafted_file(folder, model) -> pathlib.Path:
    """A rankwise file of ``model`` whose stored "architecture" is a pickle that writes
    ``folder / "marker"``."""
    path = folder / "crafted.safetensors"
    rw.save(model, path)
    metadata = safe_open_metadata(path)
    metadata[rankwise_io.ARCHITECTURE_KEY] = base64.b64encode(
        pickle.dumps(WritesMarker(folder / "marker"))).decode("ascii")
    save_file(load_file(path), path, metadata=metadata)
    return path


def safe_open_metadata(path) -> dict:
    with safe_open(path, framework="pt") as stream:
        return stream.metadata()


def test_a_crafted_pickle_never_runs_without_trust_pickle(tmp_path):
    model = projected_model("linear", "output", unpacked=False)
    path = crafted_file(tmp_path, model)
    with pytest.raises(ValueError, match="model: .* stores its architecture only as a pickle, and "
                       "unpickling runs code from the file; pass model=.*or trust_pickle=True"):
        rw.load(path)
    assert_identical(rw.load(path, model=architecture("linear")), model, torch.randn(4, 10))
    assert not (tmp_path / "marker").exists()
    with pytest.raises(ValueError, match="path: the architecture stored in .* cannot be unpickled"):
        rw.load(path, trust_pickle=True)  # the crafted pickle is live: trusted, it runs
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("include_architecture", [False, True])
def test_load_returns_the_mode_that_was_saved(tmp_path, include_architecture):
    model = tiny_cnn()
    model.eval()[1].train()  # eval, one module in training mode
    path = tmp_path / "mode.safetensors"
    rw.save(model, path, include_architecture=include_architecture)
    assert rankwise_io.read_spec(path)["training"] is False
    assert rankwise_io.read_spec(path)["training_differs"] == ["1"]
    loaded = [rw.load(path, model=tiny_cnn().train())]
    if include_architecture:
        loaded.append(rw.load(path, trust_pickle=True))
    for net in loaded:
        assert [m.training for m in net.modules()] == [m.training for m in model.modules()]
    rw.save(model.train(), path)
    assert rw.load(path, model=tiny_cnn().eval()).training
    assert all(m.training for m in rw.load(path, model=tiny_cnn().eval()).modules())


def test_files_without_a_recorded_mode_keep_the_mode_of_the_model_given(tmp_path):
    model = tiny_cnn().eval()
    path = tmp_path / "old.safetensors"
    rw.save(model, path)
    metadata = safe_open_metadata(path)
    spec = json.loads(metadata["rankwise"])
    del spec["training"], spec["training_differs"]
    save_file(load_file(path), path, metadata={"rankwise": json.dumps(spec)})
    assert rw.load(path, model=tiny_cnn().train()).training
    assert not rw.load(path, model=tiny_cnn().eval()).training

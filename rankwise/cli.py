"""The ``rankwise`` command: analyse, compress and inspect models from the shell.

::

    rankwise analyze MODEL --data DATA [--html FILE] [--json FILE]
    rankwise compress MODEL --data DATA (--explained-variance X | --learnables-reduction X)
                      [--layers A,B] [--unpack] --output FILE
    rankwise info FILE

MODEL is a Hugging Face model folder (``save_pretrained``: a ``config.json`` beside the
weights, read with ``from_pretrained`` and no download, :mod:`rankwise.hf`), a file written by
``torch.save(model)`` (a whole module) or by :func:`rankwise.save` (as ``rankwise compress``
writes: a Hugging Face model with its config, which rebuilds the structure; any other with its
structure pickled). A pickle runs code from the file when it is read: the command refuses it
unless given ``--trust-pickle`` (as ``torch.load`` defaults to ``weights_only=True``). As
``python -m`` does, the current folder is on the import path, so a model whose class lives in a
module there can be unpickled. DATA holds calibration inputs, read without unpickling anything:
a ``.pt`` file with a tensor or a list/tuple of tensors, or a ``.npy`` / ``.npz`` file, where
every tensor or array is inputs stacked along its first dimension, split into batches of
``--batch-size`` and given to the model as ``model(batch)``; or a ``.txt`` file of one sentence
per line, tokenized with ``--tokenizer`` (by default MODEL's folder) into padded batches given
as ``model(**batch)``, whose ``attention_mask`` keeps the padding out of the statistics.
``--quiet`` hides progress bars and tables. The exit status is 0 on success and 2, with a
one-line message, on bad arguments or unreadable files.

Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` in the environment) ``analyze`` and
``compress`` join the launched process group (gloo on the CPU, nccl with ``--device cuda``,
each rank on its ``LOCAL_RANK`` GPU): rank ``r`` of ``W`` calibrates on batches ``r, r + W,
...`` of DATA, the statistics are summed over the group, and only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import pickle
import sys
import warnings
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rankwise import __version__
from rankwise import hf
from rankwise import io as rankwise_io
from rankwise.checks import first_line
from rankwise.distributed import raise_on_every_rank
from rankwise.projection import compress_network_using_projection
from rankwise.report import analyze
from rankwise.tables import format_ranks
from rankwise.tables import format_table

DEFAULT_BATCH_SIZE = 256
DATA_FORMATS = {".pt": "torch.save of a tensor or a list of tensors",
                ".pth": "torch.save of a tensor or a list of tensors",
                ".npy": "numpy.save of an array", ".npz": "numpy.savez of arrays",
                ".txt": "one sentence per line"}
LIBRARY_ONLY_HINT = ", or pass forward_fn."  # the command line has no forward_fn
CLI_DATA_HINT = " as model(batch), stacked along the first dimension."
LIBRARY_TO_CLI_ARGUMENTS = {  # names in the library's error messages -> the options here
    "layer_names": "--layers", "exclude": "--exclude", "npca_or_data": "--data", "data": "--data", "model": "MODEL",
    "explained_variance_goal": "--explained-variance",
    "learnables_reduction_goal": "--learnables-reduction",
    "criterion": "--criterion", "loss_fn": "--loss", "allocation": "--allocation", "correction": "--correction",
}


class UsageError(ValueError):
    """A mistake the user can fix: reported in one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are :class:`UsageError` (one line, no usage dump)."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> Parser:
    """The ``rankwise`` parser with its ``analyze``, ``compress`` and ``info`` subcommands."""
    parser = Parser(prog="rankwise", description="Compress trained PyTorch networks by projection "
                    "of their layers' activations onto their principal components.")
    parser.add_argument("--version", action="version", version=f"rankwise {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    calibrated = Parser(add_help=False)
    calibrated.add_argument("model", metavar="MODEL",
                            help="Hugging Face model folder (save_pretrained), torch.save(model) file, "
                                 "or rankwise.save file with its Hugging Face config or architecture")
    calibrated.add_argument("--trust-pickle", action="store_true",
                            help="unpickle MODEL's structure: this runs code from the file, so only "
                                 "for files you trust (refused without it)")
    calibrated.add_argument("--data", required=True, metavar="DATA",
                            help="calibration inputs: .pt (tensor or list/tuple of tensors), .npy, .npz, "
                                 "or .txt (one sentence per line, tokenized with --tokenizer)")
    calibrated.add_argument("--tokenizer", metavar="FOLDER",
                            help="folder of the tokenizer for a .txt DATA (tokenizer.save_pretrained; "
                                 "default: MODEL when it is a Hugging Face folder)")
    calibrated.add_argument("--max-length", type=_positive_int, metavar="N",
                            help="truncate sentences to N tokens (default: the most the model takes, "
                                 "config.max_position_embeddings)")
    calibrated.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                            help="where the model runs (default cpu); under torchrun, cuda is the "
                                 "rank's LOCAL_RANK GPU")
    calibrated.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE,
                            metavar="N", help=f"inputs per batch (default {DEFAULT_BATCH_SIZE})")
    calibrated.add_argument("--quiet", action="store_true", help="no progress bars, no tables")
    calibrated.add_argument("--exclude", type=_names, metavar="A,B",
                            help="leave these layers out (names, globs such as 'features.*', or "
                                 "'re:'-prefixed regular expressions)")

    analyse = commands.add_parser("analyze", parents=[calibrated],
                                  help="how far each layer can be compressed, and why not")
    analyse.add_argument("--html", metavar="FILE", help="write the report as one HTML page")
    analyse.add_argument("--json", metavar="FILE", help="write the report as JSON")
    analyse.set_defaults(run=run_analyze)

    compress = commands.add_parser("compress", parents=[calibrated],
                                   help="compress by projection and save with rankwise.save (with the "
                                        "Hugging Face config, or the architecture pickled as MODEL's "
                                        "was, for later commands)")
    goal = compress.add_mutually_exclusive_group(required=True)
    goal.add_argument("--explained-variance", type=_fraction, metavar="X",
                      help="each layer keeps at least this fraction of its output variance")
    goal.add_argument("--learnables-reduction", type=_fraction, metavar="X",
                      help="remove at least this fraction of the network's learnables")
    compress.add_argument("--layers", type=_names, metavar="A,B",
                          help="project only these layers (names, globs or 're:' regular expressions)")
    compress.add_argument("--unpack", action="store_true", help="plain torch layers instead of wrappers")
    compress.add_argument("--criterion", choices=("variance", "loss"), default="variance",
                          help="judge options by each layer's output variance (after a following "
                               "BatchNorm) or by the estimated increase of the loss (default: variance)")
    compress.add_argument("--loss", choices=("kl", "mse"), default="kl",
                          help="with --criterion loss: 'kl' for classifiers' logits, 'mse' for "
                               "embeddings or regression outputs (default: kl)")
    compress.add_argument("--allocation", choices=("global", "uniform"), default="global",
                          help="spread --learnables-reduction by estimated error, or as the same "
                               "fraction of every layer (default: global)")
    compress.add_argument("--correction", choices=("sequential",),
                          help="refit each layer to the original's output given the compressed "
                               "network's input before projecting it")
    compress.add_argument("--output", required=True, metavar="FILE", help="the file to write")
    compress.set_defaults(run=run_compress)

    info = commands.add_parser("info", help="what a file written by rankwise.save holds")
    info.add_argument("file", metavar="FILE")
    info.set_defaults(run=run_info)
    return parser


def run_analyze(args) -> None:
    """``rankwise analyze``: print the report's table, write its HTML and JSON."""
    if args.quiet and not (args.html or args.json):
        raise UsageError("--quiet: with neither --html nor --json, analyze would print and write "
                         "nothing; drop --quiet or give --html FILE or --json FILE.")
    model, batches = _calibration_inputs(args, (("--html", args.html), ("--json", args.json)))
    report = _library(analyze, model, batches, exclude=args.exclude, verbosity=_verbosity(args))
    if args.rank != 0:
        return
    if args.json:
        _write(report.to_json, args.json, "--json")
    if args.html:
        _write(report.to_html, args.html, "--html")
    _say(args, *(f"wrote {path}" for path in (args.json, args.html) if path))


def run_compress(args) -> None:
    """``rankwise compress``: compress by projection, write the result with rankwise.save."""
    if args.correction and args.world > 1:
        raise UsageError("--correction: the sequential correction does not run across processes yet; "
                         "run it in one process (without torchrun), or drop --correction.")
    model, batches = _calibration_inputs(args, (("--output", args.output),))
    net, info = _library(compress_network_using_projection, model, batches,
                         explained_variance_goal=args.explained_variance,
                         learnables_reduction_goal=args.learnables_reduction,
                         layer_names=args.layers, exclude=args.exclude, unpack=args.unpack,
                         criterion=args.criterion, loss_fn=args.loss if args.criterion == "loss" else None,
                         allocation=args.allocation, correction=args.correction,
                         verbosity=_verbosity(args))
    if args.rank != 0:
        return
    metadata = hf.hf_metadata(net)  # a Hugging Face model is rebuilt from its config, not unpickled
    _write(lambda path: rankwise_io.save(net, path, info=info, include_architecture=not metadata,
                                         metadata=metadata),
           args.output, "--output")
    _say(args, f"wrote {args.output}")


def _calibration_inputs(args, outputs) -> tuple[nn.Module, list]:
    """The model (on ``--device``) and this rank's share of the batches; the ``outputs``
    (``(option, path)`` pairs) checked writable on rank 0. In a group, a failure on any rank
    stops every rank with its message, before any of them waits in a collective."""
    failure = model = batches = None
    try:
        if args.tokenizer is not None and pathlib.Path(args.data).suffix.lower() != ".txt":
            raise UsageError(f"--tokenizer: only a .txt DATA (one sentence per line) is tokenized, "
                             f"not {args.data!r}; drop --tokenizer or give sentences.")
        if args.rank == 0:
            for option, path in outputs:
                _check_output(path, option)
        model = read_model(args.model, args.trust_pickle, _verbosity(args) == "off").to(args.device)
        batches = read_data(args.data, model, args.batch_size, _tokenizer_folder(args),
                            args.max_length, (args.rank, args.world))
    except Exception as error:  # every rank must hear of it, whatever it is
        failure = error
    try:
        raise_on_every_rank(failure)
    except UsageError:
        raise
    except ValueError as error:  # another rank's UsageError
        raise UsageError(str(error)) from None
    return model, batches


def _tokenizer_folder(args) -> str | None:
    """``--tokenizer``, else MODEL when it is a Hugging Face folder."""
    if args.tokenizer is not None:
        return args.tokenizer
    return args.model if hf.is_hf_folder(args.model) else None


def run_info(args) -> None:
    """``rankwise info``: the compressed forms, layer sizes, tensors and projection of a rankwise file."""
    spec = _library(rankwise_io.read_spec, _readable(args.file, "FILE"), argument="FILE")
    tensors = rankwise_io.stored_tensors(args.file)
    dtypes = sorted({dtype for dtype, _ in tensors.values()})
    architecture = _architecture(args.file)
    print(f"{args.file}: rankwise model (format {spec['format_version']}, rankwise "
          f"{spec['rankwise_version']})")
    mode = {True: "training", False: "eval"}.get(spec.get("training"), "not recorded")
    print(f"learnables: {spec['learnables']:,} in {len(tensors)} tensors "
          f"({', '.join(dtypes) or '-'}); mode {mode}; architecture {architecture}")
    if spec["layers"]:
        rows = [[name, s["type"], "unpacked" if s["unpacked"] else "wrapper", *_form_details(s)]
                for name, s in spec["layers"].items()]
        print(format_table(["layer", "type", "form", "method", "ranks"], rows))
    else:
        print("no compressed form (no projected or truncated layer)")
    if spec["shapes"]:
        rows = [[name, sizes["type"], ", ".join(f"{k}={v}" for k, v in sizes.items() if k != "type")]
                for name, sizes in spec["shapes"].items()]
        print(format_table(["layer", "type", "sizes"], rows,
                           "layer sizes (evolved widths included): load(model=) resizes to these"))
    info = rankwise_io.projection_info(spec)
    if info is not None:
        print(f"projection ({info.goal}): {info.learnables_before:,} -> {info.learnables_after:,} "
              f"learnables ({info.learnables_reduction:.1%} removed), explained variance "
              f"{info.explained_variance:.4f}")


def _architecture(path: str) -> str:
    """How the file's structure is rebuilt: from a Hugging Face config, a pickle, or ``model=``."""
    kept_config = hf.describe(rankwise_io.read_metadata(path))
    if kept_config is not None:
        return (f"from its Hugging Face config, {kept_config} (load with "
                "rankwise.hf.load_compressed(path); nothing unpickled)")
    if rankwise_io.has_architecture(path):
        return "stored as a pickle (load with model=, or trust_pickle=True / --trust-pickle)"
    return "not stored (load needs model=)"


def _form_details(spec: dict) -> tuple[str, str]:
    """``(method, ranks)`` of a compressed form's spec: a projection's sides and ranks, a
    truncation's method, structure and bond ranks."""
    if "method" in spec:
        return f"{spec['method']} {spec['structure']}", ",".join(map(str, spec["ranks"]))
    ranks = {side: spec[f"rank_{side}"] for side in ("in", "out")}
    projected = [side for side, r in ranks.items()
                 if any(rank is not None for rank in (r if isinstance(r, list) else [r]))]
    side = {("in",): "input", ("out",): "output"}.get(tuple(projected), "both")
    return f"projection ({side})", f"in {format_ranks(ranks['in'])}, out {format_ranks(ranks['out'])}"


def read_model(path: str, trust_pickle: bool, quiet: bool = False) -> nn.Module:
    """The module in ``path``: a Hugging Face folder, a rankwise.save file, else a torch.save
    file; a pickled structure is unpickled only when ``trust_pickle``. ``quiet``: no progress
    bar while transformers reads a folder."""
    if pathlib.Path(path).is_dir():
        if not hf.is_hf_folder(path):
            raise UsageError(f"MODEL: {path!r} is a folder without config.json; give a Hugging Face "
                             "model folder (model.save_pretrained(folder)) or a file written by "
                             "torch.save(model) or rankwise.save.")
        return _library(hf.load_hf_model, path, quiet, argument="MODEL")
    _readable(path, "MODEL")
    if _is_safetensors(path):
        return _rankwise_model(path, trust_pickle)
    if not zipfile.is_zipfile(path):
        raise UsageError(f"MODEL: {path!r} is neither a safetensors file nor a torch.save archive; "
                         "give a file written by torch.save(model) or rankwise.save.")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # it holds more than tensors and containers: a module?
        return _unpickled_model(path, trust_pickle)
    except Exception:
        raise UsageError(f"MODEL: {path!r} is a zip archive but not one written by torch.save; "
                         "give a file written by torch.save(model) or rankwise.save.") from None
    raise UsageError(f"MODEL: {path!r} holds an object of type {type(content).__name__}, not a "
                     "model (a state dict holds weights only); write the whole module with "
                     "torch.save(model, path).")


def _is_safetensors(path: str) -> bool:
    try:
        rankwise_io.read_spec(path)
    except ValueError as error:
        return "not a safetensors file" not in str(error)
    return True


def _rankwise_model(path: str, trust_pickle: bool) -> nn.Module:
    """A safetensors file: a rankwise one that stores its architecture, unpickled if trusted."""
    _library(rankwise_io.read_spec, path, argument="MODEL")  # a rankwise file of a known format
    if hf.CONFIG_KEY in rankwise_io.read_metadata(path):
        return _library(hf.load_compressed, path, argument="MODEL")
    if not rankwise_io.has_architecture(path):
        raise UsageError(f"MODEL: {path!r} stores no architecture, which the command line needs; "
                         "save it with rw.save(..., include_architecture=True), or load it in Python "
                         "with rw.load(path, model=original).")
    if not trust_pickle:
        raise UsageError(f"MODEL: {path!r} stores its architecture as a pickle, and unpickling runs "
                         "code from the file; pass --trust-pickle if you trust it.")
    with _current_folder_importable():
        return _library(rankwise_io.load, path, trust_pickle=True, argument="MODEL")


def _unpickled_model(path: str, trust_pickle: bool) -> nn.Module:
    """A torch.save file that holds more than tensors: unpickled if trusted, and a module."""
    if not trust_pickle:
        raise UsageError(f"MODEL: {path!r} is a torch.save pickle, and unpickling runs code from the "
                         "file; pass --trust-pickle if you trust it.")
    try:
        with _current_folder_importable():
            model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # unpickling raises anything the file's code raises
        raise UsageError(f"MODEL: {path!r} cannot be unpickled "
                         f"({rankwise_io.unpickling_failure(error)}).") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"MODEL: {path!r} holds an object of type {type(model).__name__}, not a "
                         "model; write the whole module with torch.save(model, path).")
    return model


@contextlib.contextmanager
def _current_folder_importable():
    """The current folder first on ``sys.path`` (as ``python -m`` puts it), for unpickling."""
    folder = os.getcwd()
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)


def read_data(path: str, model: nn.Module, batch_size: int, tokenizer: str | None = None,
              max_length: int | None = None, shard: tuple[int, int] = (0, 1)) -> list:
    """Batches of at most ``batch_size`` inputs from a .pt, .npy, .npz or .txt file: this
    rank's share of them, batches ``rank, rank + world, ...`` for ``shard = (rank, world)``.

    Floating-point inputs are cast to the model's floating dtype; others are kept as they are.
    A .txt file holds one sentence per line, tokenized with the tokenizer saved in the folder
    ``tokenizer`` (truncated to ``max_length`` tokens, by default the most the model takes) into
    padded dict batches (:func:`rankwise.hf.tokenized_batches`).
    """
    _readable(path, "--data")
    rank, world = shard
    if pathlib.Path(path).suffix.lower() == ".txt":
        return _sentence_batches(path, model, batch_size, tokenizer, max_length, shard)
    return _tensor_batches(path, model, batch_size)[rank::world]


def _sentence_batches(path: str, model: nn.Module, batch_size: int, tokenizer: str | None,
                      max_length: int | None, shard: tuple[int, int]) -> list[dict]:
    if tokenizer is None:
        raise UsageError(f"--tokenizer: the sentences in {path!r} need a tokenizer; give --tokenizer "
                         "FOLDER (the folder tokenizer.save_pretrained wrote, often the model's).")
    sentences = _library(hf.read_sentences, path, argument="--data")
    loaded = _library(hf.load_tokenizer, tokenizer, argument="--tokenizer")
    if max_length is None:
        max_length = min((n for n in (hf.longest_input(model), loaded.model_max_length) if n), default=None)
    groups = [sentences[start:start + batch_size] for start in range(0, len(sentences), batch_size)]
    rank, world = shard
    return hf.tokenized_batches(groups[rank::world], loaded, max_length)


def _tensor_batches(path: str, model: nn.Module, batch_size: int) -> list[torch.Tensor]:
    arrays = _arrays(path)
    if not arrays:
        raise UsageError(f"--data: {path!r} holds no tensor.")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    batches = []
    for array in arrays:
        tensor = torch.as_tensor(array)
        if tensor.dim() == 0:
            raise UsageError(f"--data: {path!r} holds a scalar; expected inputs stacked along "
                             "a first dimension.")
        batches += list((tensor.to(dtype) if tensor.is_floating_point() else tensor).split(batch_size))
    return batches


def main(argv=None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    args = None
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            args = build_parser().parse_args(argv)
            with _launched_group(args):
                if args.rank != 0:
                    warnings.simplefilter("ignore")  # rank 0 says it once
                args.run(args)
        except UsageError as error:
            if getattr(args, "rank", 0) == 0:  # rank 0 hears of the other ranks' failures too
                print(f"rankwise: error: {error}", file=sys.stderr)
            return 2
    return 0


@contextlib.contextmanager
def _launched_group(args):
    """Under torchrun (``RANK`` and ``WORLD_SIZE`` in the environment), ``analyze`` and
    ``compress`` run in the launched ``torch.distributed`` group: gloo on the CPU, nccl with
    ``--device cuda`` (the ``LOCAL_RANK`` GPU), destroyed at the end unless it was already
    there. Sets ``args.rank`` and ``args.world`` (0 and 1 outside a group)."""
    calibrated, started = args.command != "info", False
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if calibrated and args.device == "cuda":
        _check_cuda(launched)
    if calibrated and launched and not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        except (ValueError, RuntimeError) as error:
            raise UsageError(f"RANK and WORLD_SIZE are set, so the command joins a torch.distributed "
                             f"group, which failed ({first_line(error)}); launch it with torchrun, or "
                             "unset RANK and WORLD_SIZE.") from None
        started = True
    grouped = calibrated and dist.is_available() and dist.is_initialized()
    args.rank, args.world = (dist.get_rank(), dist.get_world_size()) if grouped else (0, 1)
    try:
        yield
    finally:
        if started:
            dist.destroy_process_group()


def _check_cuda(launched: bool) -> None:
    """``--device cuda`` needs CUDA; under torchrun each rank takes its ``LOCAL_RANK`` GPU."""
    if not torch.cuda.is_available():
        raise UsageError("--device: CUDA is not available here; drop --device cuda (the default is cpu).")
    if launched:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


# Helpers ------------------------------------------------------------------------------------

def _arrays(path: str) -> list:
    suffix = pathlib.Path(path).suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            return _tensors(torch.load(path, map_location="cpu", weights_only=True), path)
        if suffix == ".npy":
            return [np.load(path, allow_pickle=False)]
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return [archive[key] for key in archive.files]
    except UsageError:
        raise
    except Exception:
        raise UsageError(f"--data: {path!r} is not a readable {suffix} file of tensors or arrays "
                         f"({DATA_FORMATS[suffix]}); give inputs saved that way.") from None
    raise UsageError(f"--data: expected a .pt, .npy or .npz file, got {path!r}.")


def _tensors(content, path: str) -> list[torch.Tensor]:
    if isinstance(content, torch.Tensor):
        return [content]
    if isinstance(content, list | tuple) and all(isinstance(t, torch.Tensor) for t in content):
        return list(content)
    raise UsageError(f"--data: {path!r} holds an object of type {type(content).__name__}; expected "
                     "a tensor or a list/tuple of tensors.")


def _library(function, *args, argument: str | None = None, **kwargs):
    """Call a rankwise function; its ValueError, OSError or ImportError (a missing optional
    dependency) becomes a UsageError naming the CLI argument (``argument``, else the one the
    library's message names)."""
    try:
        return function(*args, **kwargs)
    except (ValueError, OSError, ImportError) as error:
        raise UsageError(_cli_message(str(error), argument)) from None


def _cli_message(message: str, argument: str | None) -> str:
    """The library's ``"name: ..."`` message with ``name`` spelled as on the command line, and
    its hint to pass ``forward_fn`` (which the command line lacks) replaced."""
    message = message.replace(LIBRARY_ONLY_HINT, CLI_DATA_HINT)
    name, separator, rest = message.partition(": ")
    named = bool(separator) and name.isidentifier()
    if argument is not None:
        return f"{argument}: {rest if named else message}"
    if named and name in LIBRARY_TO_CLI_ARGUMENTS:
        return f"{LIBRARY_TO_CLI_ARGUMENTS[name]}: {rest}"
    return message


def _readable(path: str, argument: str) -> str:
    if not pathlib.Path(path).is_file():
        problem = "is a folder" if pathlib.Path(path).is_dir() else "does not exist"
        raise UsageError(f"{argument}: {path!r} {problem}.")
    return path


def _check_output(path: str | None, option: str) -> None:
    if path is None:
        return
    target = pathlib.Path(path)
    if target.is_dir():
        raise UsageError(f"{option}: {path!r} is a folder; give a file name.")
    if not target.parent.is_dir():
        raise UsageError(f"{option}: the folder {str(target.parent)!r} does not exist; create it first.")
    existed = target.exists()
    try:
        with open(target, "a", encoding="utf-8"):  # nothing written: an existing file is unchanged
            pass
    except OSError as error:
        raise UsageError(f"{option}: cannot write {path!r} ({error.strerror or error}); give a file "
                         "in a folder you can write to.") from None
    if not existed:
        target.unlink()


def _write(write, path: str, option: str) -> None:
    try:
        write(path)
    except OSError as error:
        raise UsageError(f"{option}: cannot write {path!r} ({error.strerror or error}).") from None


def _verbosity(args) -> str:
    """Progress bars and summaries on rank 0 unless ``--quiet``."""
    return "off" if args.quiet or args.rank != 0 else "summary"


def _say(args, *lines: str) -> None:
    if not args.quiet and args.rank == 0:
        for line in lines:
            print(line)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated layer names, got {text!r}")
    return names


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"rankwise: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    run()

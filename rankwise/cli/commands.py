"""The three commands: ``analyze``, ``compress`` and ``info``, each a function of the parsed arguments.

``analyze`` and ``compress`` read MODEL and DATA (:mod:`rankwise.cli.inputs`) on every rank of a
``torchrun`` group (``args.rank`` of ``args.world``, :mod:`rankwise.cli.launch`), call the library
with the options the parser marks as the library's (:func:`rankwise.cli.parser.library_arguments`),
and print and write on rank 0 only.
"""

from __future__ import annotations

import pathlib

from torch import nn

from rankwise import hf
from rankwise import io as rankwise_io
from rankwise.cli.errors import UsageError, library
from rankwise.cli.inputs import read_data, read_model, readable
from rankwise.cli.parser import library_arguments, option_names
from rankwise.distributed import raise_on_every_rank
from rankwise.projection import compress_network_using_projection
from rankwise.ranks import CRITERIA
from rankwise.report import analyze
from rankwise.tables import format_ranks
from rankwise.tables import format_table


def run_analyze(args) -> None:
    """``rankwise analyze``: print the report's table, write its HTML and JSON."""
    if args.quiet and not (args.html or args.json):
        raise UsageError("--quiet: with neither --html nor --json, analyze would print and write "
                         "nothing; drop --quiet or give --html FILE or --json FILE.")
    model, batches = _calibration_inputs(args, (("--html", args.html), ("--json", args.json)))
    report = library(analyze, model, batches, names=option_names(args), verbosity=_verbosity(args),
                     **library_arguments(args))
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
    if args.latency_reduction_goal is not None and args.world > 1:
        raise UsageError("--latency-reduction: each process would time its own machine and decide "
                         "differently; run it in one process (without torchrun).")
    model, batches = _calibration_inputs(args, (("--output", args.output),))
    options = library_arguments(args)
    if args.criterion != "auto" and not CRITERIA[args.criterion].needs_gradients:
        options["loss_fn"] = None  # --loss counts where a criterion that reads gradients may be used
    if options.get("flops_reduction_goal") is not None and batches:
        options["flops_input"] = batches[0]  # FLOPs counted on one calibration batch, as deployed
    if options.get("latency_reduction_goal") is not None and batches:
        options["latency_input"] = batches[0]  # latency measured on one calibration batch, on this machine
    net, info = library(compress_network_using_projection, model, batches, names=option_names(args),
                        verbosity=_verbosity(args), **options)
    if args.rank != 0:
        return
    metadata = hf.hf_metadata(net)  # a Hugging Face model is rebuilt from its config, not unpickled
    _write(lambda path: rankwise_io.save(net, path, info=info, include_architecture=not metadata,
                                         metadata=metadata),
           args.output, "--output")
    _say(args, f"wrote {args.output}")


def run_info(args) -> None:
    """``rankwise info``: the compressed forms, layer sizes, tensors and projection of a rankwise file."""
    spec = library(rankwise_io.read_spec, readable(args.file, "FILE"), argument="FILE")
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
        if info.flops_before is not None:
            print(f"FLOPs on the example batch: {info.flops_before:,} -> {info.flops_after:,} "
                  f"({info.flops_reduction:.1%} removed)")
        if info.latency_before is not None:
            print(f"latency on the example batch (measured when compressed): {info.latency_before * 1e3:.3f} ms -> "
                  f"{info.latency_after * 1e3:.3f} ms ({info.latency_reduction:.1%} removed)")
        if info.choice:
            print(f"decided with {info.choice}")


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


COMMANDS = {"analyze": run_analyze, "compress": run_compress, "info": run_info}
"""The function that runs each command of :func:`rankwise.cli.parser.build_parser`."""

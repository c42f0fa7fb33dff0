"""Running one command line: parse it, join the process group ``torchrun`` launched, run the
command, and end with exit status 0, or 2 and one line on stderr for a :class:`UsageError`.

Warnings are printed as one line each (``rankwise: warning: ...``), by rank 0 only.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch
import torch.distributed as dist

from rankwise.checks import first_line
from rankwise.cli.commands import COMMANDS
from rankwise.cli.errors import UsageError
from rankwise.cli.parser import build_parser


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
                COMMANDS[args.command](args)
        except UsageError as error:
            if getattr(args, "rank", 0) == 0:  # rank 0 hears of the other ranks' failures too
                print(f"rankwise: error: {error}", file=sys.stderr)
            return 2
    return 0


def run() -> None:
    """Console-script entry point (``rankwise`` in ``pyproject.toml``): :func:`main`, then exit."""
    sys.exit(main())


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


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"rankwise: warning: {message}", file=sys.stderr)


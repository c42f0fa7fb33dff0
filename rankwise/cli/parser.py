"""The ``rankwise`` parser: its commands (``analyze``, ``compress``, ``info``) and their options.

An option whose value the command hands to the library is declared once, with
:meth:`Parser.add_library_option`, under the name of the library's argument it sets
(``--layers`` sets ``layer_names``): the command passes every such option on
(:func:`library_arguments`), and the library's errors that name the argument name the option
instead (:func:`option_names`).
"""

from __future__ import annotations

import argparse

from rankwise._version import __version__
from rankwise.cli.errors import UsageError
from rankwise.ranks import CRITERIA

DEFAULT_BATCH_SIZE = 256
CRITERION_CHOICES = ("auto", *CRITERIA)
"""``--criterion``'s choices: ``auto`` (measured, :mod:`rankwise.selection`) and the criteria
:data:`rankwise.ranks.CRITERIA` holds. The one place the parser reads them."""
POSITIONAL_NAMES = {"model": "MODEL", "npca_or_data": "--data", "data": "--data"}
"""The command line's names of the library's arguments that the commands pass by position."""


def _validation(text: str):
    """``--validation``: ``auto``, ``none`` or a fraction in (0, 0.5]."""
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 0.5:
        raise argparse.ArgumentTypeError(f"expected auto, none or a fraction in (0, 0.5], got {text!r}")
    return value


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are :class:`UsageError` (one line, no usage dump)."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")

    def add_library_option(self, *flags: str, keyword: str, group=None, **kwargs) -> None:
        """Add an option that the command passes on as the library's argument ``keyword``.

        Parameters
        ----------
        *flags : str
            The option's names; the first names it in error messages.
        keyword : str
            The library's argument it sets: its value is ``args.<keyword>``, listed in
            ``args.library_options`` (``keyword -> flags[0]``, inherited by the commands that
            take this parser as a parent).
        group : optional
            The mutually exclusive group of this parser to add it to.
        **kwargs
            As for :meth:`argparse.ArgumentParser.add_argument`.
        """
        (group or self).add_argument(*flags, dest=keyword, **kwargs)
        self.set_defaults(library_options={**(self.get_default("library_options") or {}), keyword: flags[0]})


def library_arguments(args) -> dict:
    """The library options of the parsed command (:meth:`Parser.add_library_option`), by keyword."""
    return {keyword: getattr(args, keyword) for keyword in args.library_options}


def option_names(args) -> dict[str, str]:
    """The command line's name of each library argument the parsed command sets (the ``names`` of
    :func:`rankwise.cli.errors.library`)."""
    return {**POSITIONAL_NAMES, **args.library_options}


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
                                 "or .txt (one sentence per line, tokenized with --tokenizer; running "
                                 "text in chunks of --max-length tokens for a causal language model)")
    calibrated.add_argument("--tokenizer", metavar="FOLDER",
                            help="folder of the tokenizer for a .txt DATA (tokenizer.save_pretrained; "
                                 "default: MODEL when it is a Hugging Face folder)")
    calibrated.add_argument("--max-length", type=_positive_int, metavar="N",
                            help="truncate sentences to N tokens (default: the most the model takes, "
                                 "config.max_position_embeddings); a causal language model's chunks "
                                 "of running text (default: 256)")
    calibrated.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                            help="where the model runs (default cpu); under torchrun, cuda is the "
                                 "rank's LOCAL_RANK GPU")
    calibrated.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE,
                            metavar="N", help=f"inputs per batch (default {DEFAULT_BATCH_SIZE})")
    calibrated.add_argument("--quiet", action="store_true", help="no progress bars, no tables")
    calibrated.add_library_option("--exclude", keyword="exclude", type=_names, metavar="A,B",
                                  help="leave these layers out (names, globs such as 'features.*', or "
                                       "'re:'-prefixed regular expressions)")

    analyse = commands.add_parser("analyze", parents=[calibrated],
                                  help="how far each layer can be compressed, and why not")
    analyse.add_argument("--html", metavar="FILE", help="write the report as one HTML page")
    analyse.add_argument("--json", metavar="FILE", help="write the report as JSON")
    analyse.add_library_option("--flops-reductions", keyword="flops_reduction_goals", type=_fractions,
                               default=(), metavar="X,Y",
                               help="also report these FLOPs goals, counted on the first calibration batch "
                                    "(e.g. 0.25,0.5)")

    compress = commands.add_parser("compress", parents=[calibrated],
                                   help="compress by projection and save with rankwise.save (with the "
                                        "Hugging Face config, or the architecture pickled as MODEL's "
                                        "was, for later commands)")
    goal = compress.add_mutually_exclusive_group(required=True)
    compress.add_library_option("--explained-variance", keyword="explained_variance_goal", group=goal,
                                type=_fraction, metavar="X",
                                help="each layer keeps at least this fraction of its output variance")
    compress.add_library_option("--learnables-reduction", keyword="learnables_reduction_goal", group=goal,
                                type=_fraction, metavar="X",
                                help="remove at least this fraction of the network's learnables")
    compress.add_library_option("--flops-reduction", keyword="flops_reduction_goal",
                                group=goal, type=_fraction, metavar="X",
                                help="remove at least this fraction of the network's FLOPs on the first "
                                     "calibration batch (--batch-size inputs)")
    compress.add_library_option("--latency-reduction", keyword="latency_reduction_goal",
                                group=goal, type=_fraction, metavar="X",
                                help="remove at least this fraction of the network's latency on the first "
                                     "calibration batch, measured on this machine at the torch thread count "
                                     "of the run")
    compress.add_library_option("--layers", keyword="layer_names", type=_names, metavar="A,B",
                                help="project only these layers (names, globs or 're:' regular expressions)")
    compress.add_library_option("--unpack", keyword="unpack", action="store_true",
                                help="plain torch layers instead of wrappers")
    compress.add_library_option("--criterion", keyword="criterion", choices=CRITERION_CHOICES,
                                default="auto",
                                help="judge options by each layer's output variance (after a following "
                                     "BatchNorm) or by the estimated increase of the loss; auto: measure "
                                     "both on held-out batches and keep the better (default: auto)")
    compress.add_library_option("--loss", keyword="loss_fn", choices=("auto", "kl", "mse"), default="auto",
                                help="the loss of the gradient statistics: 'kl' for classifiers' logits, "
                                     "'mse' for embeddings or regression outputs; auto: kl for logits, "
                                     "else mse, on every fourth batch (default: auto)")
    compress.add_library_option("--allocation", keyword="allocation", choices=("auto", "global", "uniform"),
                                default="auto",
                                help="spread --learnables-reduction (or --flops-, --latency-reduction) by estimated error, or as the same "
                                     "fraction of every layer; auto: measure both (default: auto)")
    compress.add_library_option("--validation", keyword="validation", type=_validation, default="auto",
                                metavar="X",
                                help="the fraction of calibration batches held out to measure the "
                                     "candidates on, or 'none' (default: auto, every fourth batch)")
    compress.add_library_option("--correction", keyword="correction", choices=("sequential",),
                                help="refit each layer to the original's output given the compressed "
                                     "network's input before projecting it")
    compress.add_argument("--output", required=True, metavar="FILE", help="the file to write")

    info = commands.add_parser("info", help="what a file written by rankwise.save holds")
    info.add_argument("file", metavar="FILE")
    return parser


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _fractions(text: str) -> tuple[float, ...]:
    return tuple(_fraction(part.strip()) for part in text.split(","))


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated layer names, got {text!r}")
    return names

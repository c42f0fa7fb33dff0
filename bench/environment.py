"""Where and how a benchmark ran: machine, versions, date, command (for the results files)."""

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import numpy
import torch

import rankwise


def git_commit():
    """Short hash of the checked-out commit, with ``+dirty`` for uncommitted changes; or ``None``."""
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def environment_markdown():
    """A markdown bullet list describing the run."""
    command = "python " + " ".join(shlex.quote(arg) for arg in sys.argv)
    lines = [
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- command: `{command}` (from the repository root, in the project virtualenv)",
        f"- machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{torch.get_num_threads()} torch threads, no GPU used",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"numpy {numpy.__version__}, rankwise {rankwise.__version__} (commit {git_commit()})",
    ]
    return "\n".join(lines)


def write_result(path, title, body):
    """Write ``# title``, the environment list and `body` (markdown) to `path`; print it too."""
    text = f"# {title}\n\n{environment_markdown()}\n\n{body.rstrip()}\n"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as stream:
        stream.write(text)
    print(text)
    print(f"written to {path}")


def median_seconds(call, repeats):
    """Median wall-clock seconds of `repeats` calls of ``call()``, after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def repeats_to_fill(call, seconds, fewest=5, most=200):
    """How many calls of ``call()`` fill about `seconds` (between `fewest` and `most`).

    One warm-up call, then one timed call sets the estimate.
    """
    call()
    start = time.perf_counter()
    call()
    once = max(time.perf_counter() - start, 1e-6)
    return int(min(most, max(fewest, seconds / once)))


def load_rows(path):
    """The result rows a benchmark wrote to the JSON file `path` (none when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as stream:
        return json.load(stream)

"""How many threads the dense eigensolvers (``eigh``, ``svd``, ``qr``) of the decisions run on.

An eigen-decomposition of a ``d x d`` covariance (the decisions' main cost, ``O(d^3)``) runs in
LAPACK, whose threads wait for each other at every step of its reductions. With every thread on
a core of its own that pays; with a core busy (another process, a data loader, another helper on
a shared machine) each step waits for the slowest thread, and torch's default, one thread per
core, becomes several times slower than one thread (measured on a 2-core machine with the other
core busy: a float64 ``eigh`` of ``1536 x 1536`` 4.4 s with 2 threads against 0.7 s with 1; see
BENCHMARKS.md, "What compression costs").

The policy, :func:`solver_thread_count`:

- ``RANKWISE_SOLVER_THREADS=<n>`` (environment) or :func:`solver_threads` ``(n)`` (a context
  manager, which wins over the environment): exactly ``n`` threads;
- otherwise (``"auto"``, the default): the cores no other process keeps busy,

      threads = max(1, min(torch.get_num_threads(), cores - round(load - own))),

  with ``cores`` the CPUs this process may run on, ``load`` the one-minute load average and
  ``own`` this process's share of it (at most its torch threads, counted as one busy core). An
  idle machine keeps torch's setting; a machine whose other cores are busy gets one thread.
  The load average lags by about a minute: set the number where it matters.

Only the solvers are affected (:func:`solving`), and torch's thread count is restored after
each; the calibration pass's products run on torch's own setting.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch

ENVIRONMENT = "RANKWISE_SOLVER_THREADS"

_OVERRIDE: contextvars.ContextVar[int | str | None] = contextvars.ContextVar("solver_threads", default=None)


def _checked(threads, source: str) -> int:
    """``threads`` as a positive int, or a ValueError naming ``source``."""
    try:
        count = int(threads)
    except (TypeError, ValueError):
        count = 0
    if count < 1 or (isinstance(threads, float) and threads != count):
        raise ValueError(f"{source}: expected a positive whole number of threads or 'auto', got {threads!r}.")
    return count


def solver_thread_count() -> int:
    """The threads the next solver runs on (the module docstring gives the policy).

    Raises
    ------
    ValueError
        When ``RANKWISE_SOLVER_THREADS`` is neither ``"auto"`` nor a positive integer.
    """
    override = _OVERRIDE.get()
    if override is not None:
        return _automatic() if override == "auto" else override
    setting = os.environ.get(ENVIRONMENT, "auto").strip()
    if setting.lower() != "auto":
        return _checked(setting, f"the environment variable {ENVIRONMENT}")
    return _automatic()


def _automatic() -> int:
    """``max(1, min(torch threads, cores - busy cores of other processes)))``."""
    wanted = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform: trust torch's setting
        return wanted
    others = max(0, round(load - 1))  # this process keeps about one core busy itself
    return max(1, min(wanted, cores - others))


@contextlib.contextmanager
def solver_threads(threads):
    """Context manager: the dense eigensolvers inside it run on ``threads`` threads.

    Parameters
    ----------
    threads : int or "auto"
        A positive number of threads, or ``"auto"`` for the policy of :mod:`rankwise.threads`
        (the environment variable ``RANKWISE_SOLVER_THREADS`` is then ignored).

    Examples
    --------
    >>> import rankwise as rw
    >>> with rw.solver_threads(1):                  # doctest: +SKIP
    ...     net, info = rw.compress_network_using_projection(model, npca)
    """
    value = "auto" if threads == "auto" else _checked(threads, "solver_threads")
    token = _OVERRIDE.set(value)
    try:
        yield value
    finally:
        _OVERRIDE.reset(token)


@contextlib.contextmanager
def solving():
    """Context manager around one solver call: torch runs on :func:`solver_thread_count` threads
    inside it, and on its previous setting again after."""
    before = torch.get_num_threads()
    wanted = solver_thread_count()
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)

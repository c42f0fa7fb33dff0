"""A bench-side memory workaround for the measured decisions on many layers (``--lean-candidates``
of :mod:`smollm2`)."""

import contextlib
import gc


@contextlib.contextmanager
def lean_candidate_measurement(enabled=True):
    """Bench-side memory workaround for ``rw-defaults`` on many layers (``--lean-candidates``).

    :func:`rankwise.selection.choose_by_measurement` keeps the options (and the fitted view's
    cached spectra) of every (criterion, shrinkage) pair it has built until the choice is made.
    Its candidates use the pairs one after the other (variance/auto twice, loss/auto twice,
    variance/1 twice, then the best at 1/2) and never come back to an earlier pair, so this
    wraps ``rankwise.selection.measured_options`` to empty the previous pair's options and
    spectra when the next pair is built: the same computations and scores, one pair in memory
    at a time. The library's code is not changed; the wrapper is removed on exit.
    """
    if not enabled:
        yield
        return
    import rankwise.selection as selection
    original, previous = selection.measured_options, {}

    def lean(model, npca, layers, criterion="variance", **kwargs):
        if previous:
            previous["options"].clear()
            previous["npca"]._spectra.clear()
            previous.clear()
            gc.collect()
        options = original(model, npca, layers, criterion, **kwargs)
        previous.update(options=options, npca=npca)
        return options

    selection.measured_options = lean
    try:
        yield
    finally:
        selection.measured_options = original

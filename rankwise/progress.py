"""When a progress bar over lazily computed work appears.

The eigendecompositions behind the statistics (:meth:`rankwise.NeuronPCA.spectrum`) and the
decisions (:func:`rankwise.ranks.measured_options`) are computed on first use: quick on a small
network, a while on a large one. Their bars appear only once the work has taken
:data:`PROGRESS_DELAY_SECONDS`, so quick work prints nothing.
"""

PROGRESS_DELAY_SECONDS = 1.0
"""A bar over lazily computed spectra appears only once computing them has taken this long."""

"""The version of rankwise, in a module of its own: the package and :mod:`rankwise.io` (which
writes it into every file) both read it here, so neither imports the other for it."""

__version__ = "0.1.0"

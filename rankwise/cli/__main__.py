"""``python -m rankwise.cli`` (and ``torchrun -m rankwise.cli``): the ``rankwise`` command."""

from rankwise.cli import run

run()

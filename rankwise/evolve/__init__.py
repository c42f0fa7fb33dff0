"""Evolving layer widths during training: shrink where the spectrum is dead, grow where it is saturated.

Modules, one concept each: :mod:`.graph` (which widths may change, from the torch.fx graph),
:mod:`.widths` (what that analysis finds: widths, their followers, groups of tied widths),
:mod:`.spectrum` (a width's singular values), :mod:`.edits` (planned tensor changes applied
at once), :mod:`.activations` (consumer-input moments for the refits), :mod:`.shrink`,
:mod:`.grow`, :mod:`.optimizer` (optimizer state sync), :mod:`.history`, :mod:`.plots` and
:mod:`.evolver` (:class:`WidthEvolver`, which ties them together).
"""

from rankwise.evolve.evolver import WidthEvolver
from rankwise.evolve.graph import analyze_widths
from rankwise.evolve.widths import WidthGroup
from rankwise.evolve.history import EvolutionEvent, EvolutionHistory

__all__ = ["WidthEvolver", "WidthGroup", "analyze_widths", "EvolutionHistory", "EvolutionEvent"]

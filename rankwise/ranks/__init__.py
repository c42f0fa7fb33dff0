"""Decisions: which side of each layer to project, at which ranks.

- :mod:`rankwise.ranks.options`: what an option is (side, ranks, learnables, residual, error)
  and a layer's frontier of them;
- :mod:`rankwise.ranks.frontier`: every layer's options, their learnables and estimated
  residuals, filtered to the frontier (one enumeration per family of :mod:`rankwise.kinds`);
- :mod:`rankwise.ranks.criterion`: the estimated error of each option that the frontier and
  the allocation compare (variance or loss), measured in the metric where the layer's error
  matters (after a following BatchNorm; the Fisher information of the loss);
- :mod:`rankwise.ranks.allocation`: the goals (per-layer explained variance, global learnables
  or FLOPs reduction), the trade-off curve and the reduction range;
- :mod:`rankwise.ranks.costs`: each option's FLOPs on an example input, and the frontiers
  priced in them for a FLOPs goal;
- :mod:`rankwise.ranks.sequence`: recurrent layers' choices bounded by the explained variance of
  their output sequence, measured on calibration sequences through the recurrence.
"""

from rankwise.ranks.allocation import (Allocation, allocate_learnables_reduction, choose_by_explained_variance,
                                       choose_ranks, most_removable, reduction_range, tradeoff_curve,
                                       unreached_goal)
from rankwise.ranks.costs import FlopBudget, LayerGeometry
from rankwise.ranks.criterion import (CRITERIA, Candidates, Criterion, criterion_named, loss_error, output_metrics,
                                      variance_error)
from rankwise.ranks.frontier import layer_options, measured_options
from rankwise.ranks.options import LOSSLESS, SIDE_NAMES, LayerOptions, RankChoice, RecurrentOptions
from rankwise.ranks.sequence import SequenceBound, sequence_explained_variance

__all__ = ["Allocation", "CRITERIA", "Candidates", "Criterion", "FlopBudget", "LayerGeometry", "LOSSLESS", "LayerOptions", "RankChoice",
           "RecurrentOptions", "SIDE_NAMES", "SequenceBound", "allocate_learnables_reduction", "choose_by_explained_variance",
           "choose_ranks", "criterion_named", "layer_options", "loss_error", "measured_options", "most_removable",
           "output_metrics", "reduction_range", "sequence_explained_variance", "tradeoff_curve", "unreached_goal",
           "variance_error"]

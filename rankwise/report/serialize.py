"""The analysis as plain JSON.

Fields (``format_version`` 1)::

    format, format_version                "rankwise-analysis", 1
    network.learnables                    learnables of the whole network
    network.learnables_reduction_range    [lossless, maximum] fractions removable
    network.analysed_layers               names, in model order
    network.tradeoff                      {"learnables_reduction": [...], "explained_variance": [...]}
    goals[]                               goal ("learnables_reduction_goal=0.9"), name, value,
                                          goal_reached, learnables_after, learnables_reduction,
                                          explained_variance, flops_before, flops_after (null
                                          but under a FLOPs goal)
    layers[]                              name, type, learnables, projectable, reason,
                                          max_reduction, lossless_reduction, min_learnables,
                                          lossless_learnables (null where not analysed),
                                          sides: {side: {eigenvalues, explained_variance}}
                                          (explained_variance[r - 1] at rank r),
                                          goals: {goal: {side, rank_in, rank_out, learnables,
                                          explained_variance}}
"""

from __future__ import annotations

import json


FORMAT = "rankwise-analysis"
FORMAT_VERSION = 1


def report_to_dict(report) -> dict:
    """The fields above, as Python lists, numbers, strings, booleans and ``None``."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "network": {
            "learnables": report.network_learnables,
            "learnables_reduction_range": list(report.learnables_reduction_range),
            "analysed_layers": report.analysed_layers,
            "tradeoff": {"learnables_reduction": report.tradeoff_reduction.tolist(),
                         "explained_variance": report.tradeoff_explained_variance.tolist()},
        },
        "goals": [_goal(goal, info) for goal, info in report.goals.items()],
        "layers": [_layer(layer, report.goals) for layer in report.layers.values()],
        "sensitivity": None if report.sensitivity is None else report.sensitivity.to_dict(),
    }


def write_json(report, path) -> None:
    """Write :func:`report_to_dict` to ``path``, indented."""
    with open(path, "w", encoding="utf-8") as stream:
        json.dump(report_to_dict(report), stream, indent=1)
        stream.write("\n")


def _goal(goal: str, info) -> dict:
    return {"goal": goal, "name": info.goal.argument, "value": info.goal.value, "goal_reached": info.goal_reached,
            "learnables_after": info.learnables_after,
            "learnables_reduction": info.learnables_reduction,
            "explained_variance": info.explained_variance,
            "flops_before": info.flops_before, "flops_after": info.flops_after}


def _layer(layer, goals: dict) -> dict:
    analysed = layer.analysed
    return {
        "name": layer.name, "type": layer.type, "learnables": layer.learnables,
        "projectable": layer.projectable, "reason": layer.reason,
        "max_reduction": layer.max_reduction, "lossless_reduction": layer.lossless_reduction,
        "min_learnables": layer.min_learnables, "lossless_learnables": layer.lossless_learnables,
        "sides": {side: {"eigenvalues": spectrum.eigenvalues.tolist(),
                         "explained_variance": spectrum.explained_variance.tolist()}
                  for side, spectrum in layer.sides.items()},
        "goals": {goal: _choice(info.layers[layer.name]) for goal, info in goals.items()} if analysed else {},
    }


def _choice(projection) -> dict:
    return {"side": projection.side, "rank_in": projection.rank_in, "rank_out": projection.rank_out,
            "learnables": projection.learnables_after,
            "explained_variance": projection.explained_variance}

"""rankwise: compress trained PyTorch networks by finding the low-rank structure inside them."""

from rankwise._version import __version__
from rankwise.batchnorm import fold_batchnorm, recalibrate_batchnorm
from rankwise.batchnorm_modes import SmallBatchNormDataWarning
from rankwise.decompose import LayerTruncation, TruncatedConv, TruncationInfo, truncate_kernels
from rankwise.evolve import EvolutionHistory, WidthEvolver, WidthGroup, analyze_widths
from rankwise.estimate import CostEstimate, estimate_cost
from rankwise.export import export_onnx
from rankwise.incremental import IncrementalHistory, compress_incrementally
from rankwise.io import load, save
from rankwise.kinds import register_kind
from rankwise.flops import count_flops
from rankwise.latency import SpeedComparison, UnstableTimingWarning, compare_speed, median_latency
from rankwise.throughput import GenerationSpeed, compare_generation_speed
from rankwise.layers import (ProjectedConv, ProjectedEmbedding, ProjectedGRU, ProjectedLayer, ProjectedLinear,
                             ProjectedLSTM, ProjectedMultiheadAttention)
from rankwise.learnables import count_learnables
from rankwise.masks import token_mask
from rankwise.pca import NeuronPCA, NonFiniteActivationError, ThinDataWarning
from rankwise.recovery import RecoveryRecord, recover
from rankwise.projection import (LayerProjection, ProjectionInfo, compress_network_using_projection,
                                 unpack_projected_layers)
from rankwise.report import AnalysisReport, LayerReport, analyze
from rankwise.sensitivity import Sensitivity, probe_sensitivity
from rankwise.threads import solver_threads
from rankwise.train import FineTuneHistory, fine_tune

__all__ = [
    "NeuronPCA", "compress_network_using_projection", "unpack_projected_layers",
    "ProjectedLayer", "ProjectedLinear", "ProjectedConv", "count_learnables",
    "ProjectionInfo", "LayerProjection", "ThinDataWarning", "NonFiniteActivationError",
    "fine_tune", "FineTuneHistory", "compress_incrementally", "IncrementalHistory",
    "probe_sensitivity", "Sensitivity",
    "analyze", "AnalysisReport", "LayerReport", "save", "load", "export_onnx",
    "truncate_kernels", "TruncationInfo", "LayerTruncation", "TruncatedConv",
    "WidthEvolver", "EvolutionHistory", "WidthGroup", "analyze_widths",
    "ProjectedLSTM", "ProjectedGRU", "ProjectedEmbedding", "ProjectedMultiheadAttention",
    "fold_batchnorm", "recalibrate_batchnorm",
    "median_latency", "count_flops", "compare_speed", "SpeedComparison", "UnstableTimingWarning",
    "compare_generation_speed", "GenerationSpeed",
    "token_mask", "register_kind", "solver_threads", "estimate_cost", "CostEstimate",
    "recover", "RecoveryRecord", "SmallBatchNormDataWarning",
]

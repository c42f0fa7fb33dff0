"""Recovery after compression: distillation toward the original, BatchNorm on purpose, never worse.

:func:`recover` is the entry point (:mod:`rankwise.recovery.recover`); the objectives, the
learning-rate rule and the low-rank corrections live in their own modules.
"""

from rankwise.recovery.recover import METHODS, RecoveryRecord, recover

__all__ = ["recover", "RecoveryRecord", "METHODS"]

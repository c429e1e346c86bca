"""Optax gradient transformations from the papers: CAME, SAM/ASAM/GSAM, Helen.

Each follows optax: ``scale_by_<name>()`` returns a ``GradientTransformation`` (or
``GradientTransformationExtraArgs`` when it needs extra arguments to ``update``) with a
NamedTuple state, and ``<name>(learning_rate, ...)`` chains it into a full optimizer.
"""

from jaxeff.optim.came import came, scale_by_came
from jaxeff.optim.helen import HelenState, feature_counts, helen, param_path, scale_by_helen
from jaxeff.optim.sam import SAMState, asam, gsam, gsam_rho_schedule, sam

__all__ = [
    "HelenState",
    "SAMState",
    "asam",
    "came",
    "feature_counts",
    "gsam",
    "gsam_rho_schedule",
    "helen",
    "param_path",
    "sam",
    "scale_by_came",
    "scale_by_helen",
]

"""Optax gradient transformations from the papers: CAME, SAM/ASAM/GSAM, Helen.

Each follows optax: ``scale_by_<name>()`` returns a ``GradientTransformation`` (or
``GradientTransformationExtraArgs`` when it needs extra arguments to ``update``) with a
NamedTuple state, and ``<name>(learning_rate, ...)`` chains it into a full optimizer. Import
them from here (``jaxeff.optim.came``, ``jaxeff.optim.scale_by_came``); the modules behind
(``_came``, ``_sam``, ``_helen``) are private and load on first use.
"""

from jaxeff._lazy import attach as _attach

__getattr__, __dir__, __all__ = _attach(
    __name__,
    attrs={
        # CAME (Luo et al., ACL 2023)
        "ScaleByCameState": "_came",
        "came": "_came",
        "scale_by_came": "_came",
        # Helen (Zhu et al., WWW 2024)
        "HelenState": "_helen",
        "feature_counts": "_helen",
        "helen": "_helen",
        "param_path": "_helen",
        "scale_by_helen": "_helen",
        # SAM, ASAM, GSAM (Foret et al. 2021; Kwon et al. 2021; Zhuang et al. 2022)
        "SAMState": "_sam",
        "asam": "_sam",
        "asam_gradient": "_sam",
        "gsam": "_sam",
        "gsam_gradient": "_sam",
        "gsam_rho_schedule": "_sam",
        "masked_grad_fn": "_sam",
        "sam": "_sam",
        "sam_gradient": "_sam",
    },
)

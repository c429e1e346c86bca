"""jaxeff's experiments, one module per paper (installed as ``jaxeff.experiments``).

Each module defines ``EXPERIMENTS = {"cli-name": jaxeff.experiment.Experiment(...)}`` and keeps
jax imports inside ``run`` so that ``jaxeff list`` stays instant. Add new modules to MODULES.
"""

MODULES = (
    "lm",
    "generate_bench",
    "rope_extension",
    "helen_ctr",
    "came",
    "data_efficiency",
    "federated",
    "moe",
    "finetune",
    "sequence_parallel",
    "scale",
    "inference",
    "mod",
    "kernels",
    "videollm_mod",
    "detective",
    "msier",
    "multimodal",
    "prompt_optimization",
)

"""Plots shared by the experiments (matplotlib, Agg backend, imported lazily)."""

from __future__ import annotations


def plot_val_curves(
    curves: dict[str, list[tuple[int, float]]],
    path: str,
    title: str,
    ylabel: str = "validation cross-entropy (nats/token)",
    *,
    styles: dict[str, str] | None = None,
    references: dict[str, float] | None = None,
) -> None:
    """One line per run of ``(step, value)`` points, saved as a PNG at ``path``; ``styles``
    overrides a curve's matplotlib format (default ``"o-"``), ``references`` adds labelled
    dashed horizontal lines (e.g. a baseline's loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        if pts:
            ax.plot(*zip(*pts, strict=True), (styles or {}).get(name, "o-"), label=name)
    for name, value in (references or {}).items():
        ax.axhline(value, color="gray", ls="--", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

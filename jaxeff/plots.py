"""Plots shared by the experiments (matplotlib, imported lazily, never through pyplot)."""

from __future__ import annotations


def subplots(nrows: int = 1, ncols: int = 1, *, figsize=None, dpi=None, **kwargs):
    """``matplotlib.pyplot.subplots`` without pyplot: a `matplotlib.figure.Figure` and its axes.

    The experiments draw and save their PNGs (``fig.savefig``) on such figures, so they never
    switch pyplot's backend: ``matplotlib.use("Agg")`` from a library call closes a notebook's
    figures and keeps every later plot of the session from showing inline. pyplot does not hold
    these figures, so there is nothing to close.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(nrows, ncols, **kwargs)


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
    fig, ax = subplots(figsize=(6, 4))
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

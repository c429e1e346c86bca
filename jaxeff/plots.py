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


def save_figure(fig, path, **savefig_kwargs) -> None:
    """``fig.savefig(path, ...)`` for a local path or a URI of remote storage (``gs://...``):
    the figure is rendered into memory (format from the file extension, as ``savefig`` picks
    it) and written through ``etils.epath``, so a remote run directory never becomes a local
    ``gs:/...`` folder."""
    import io
    import os

    from jaxeff.train.metrics import as_path

    path = as_path(path)
    if "format" not in savefig_kwargs:
        savefig_kwargs["format"] = os.path.splitext(path.name)[1][1:].lower() or None
    buffer = io.BytesIO()
    fig.savefig(buffer, **savefig_kwargs)
    path.write_bytes(buffer.getvalue())


def plot_val_curves(
    curves: dict[str, list[tuple[int, float]]],
    path,
    title: str,
    ylabel: str = "validation cross-entropy (nats/token)",
    *,
    styles: dict[str, str] | None = None,
    references: dict[str, float] | None = None,
) -> None:
    """One line per run of ``(step, value)`` points, saved as a PNG at ``path``; ``styles``
    overrides a curve's matplotlib format (default ``"o-"``), ``references`` adds labelled
    dashed horizontal lines (e.g. a baseline's loss). ``path``: a str or ``epath.Path``, local
    or remote (see `save_figure`)."""
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
    save_figure(fig, path, dpi=100)

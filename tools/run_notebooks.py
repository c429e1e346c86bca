"""Execute the notebooks in place and save them with their outputs (`make notebooks`).

    python tools/run_notebooks.py                      # every notebooks/*.ipynb, in name order
    python tools/run_notebooks.py notebooks/06_*.ipynb --timeout 300

Each notebook runs in a fresh ``python3`` kernel whose working directory is the notebook's
folder (as under ``pytest --nbmake``), with plots embedded as PNG by the inline backend, progress
bars off (``TQDM_DISABLE``) and ``$JAXEFF_CACHE`` defaulting to ``.jaxeff_cache`` in the
repository (as in the tests). The saved notebook keeps sources, outputs and execution counts;
volatile metadata (cell timings, widget state, kernel-run bookkeeping) is stripped so that a
rerun gives a small diff. A notebook that fails or runs past ``--timeout`` seconds is left
unchanged on disk and makes the script exit non-zero (after the remaining notebooks ran).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import sys
import time

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# notebook-level metadata that changes from run to run or from machine to machine
VOLATILE_NOTEBOOK_METADATA = ("widgets", "papermill", "execution", "toc-autonumbering")
VOLATILE_CELL_METADATA = ("execution", "collapsed", "scrolled", "papermill", "ExecuteTime")


def kernel_env() -> None:
    """Environment the kernels inherit."""
    # inline figures (an MPLBACKEND=Agg from the caller's shell would hide every plot)
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    os.environ["TQDM_DISABLE"] = "1"  # no progress bars in saved outputs
    # tqdm.auto warns on import in a kernel without ipywidgets
    quiet = "ignore:IProgress not found"
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), quiet]))
    os.environ.setdefault("JAXEFF_CACHE", os.path.join(ROOT, ".jaxeff_cache"))
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # debugpy's frozen-modules note


def strip_volatile(nb: nbformat.NotebookNode) -> None:
    for key in VOLATILE_NOTEBOOK_METADATA:
        nb.metadata.pop(key, None)
    for cell in nb.cells:
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            out.get("metadata", {}).pop("execution", None)
            # widget views reference state that is not saved
            out.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)


def execute(path: str, timeout: float, kernel: str) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,  # per cell; the whole notebook is bounded below
        kernel_name=kernel,
        record_timing=False,
        resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}},
    )

    async def run():
        await asyncio.wait_for(client.async_execute(), timeout)

    asyncio.run(run())
    strip_volatile(nb)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", help="default: notebooks/*.ipynb")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per notebook")
    parser.add_argument("--kernel", default="python3")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
    kernel_env()
    failed = []
    for path in paths:
        name = os.path.relpath(path)
        start = time.perf_counter()
        try:
            nb = execute(path, args.timeout, args.kernel)
        except Exception as err:  # noqa: BLE001 (TimeoutError included)
            kind = "timed out" if isinstance(err, TimeoutError) else "failed"
            print(f"{name}: {kind} after {time.perf_counter() - start:.1f} s", file=sys.stderr)
            print(f"  {type(err).__name__}: {str(err)[-2000:]}", file=sys.stderr)
            failed.append(name)
            continue
        nbformat.write(nb, path)
        size = os.path.getsize(path)
        print(f"{name}: {time.perf_counter() - start:6.1f} s, {size / 1024:6.1f} kB", flush=True)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

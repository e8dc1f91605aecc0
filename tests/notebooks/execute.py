"""Run a notebook top to bottom in a fresh kernel, with its parameters overridden (papermill's
convention without papermill): the code cell tagged `parameters` keeps its defaults and a cell
assigning the overrides is inserted right after it.

    nb = run_notebook("notebooks/diffusion_math.ipynb", {"SMALL": True}, cwd=tmp_path)

The kernel is this interpreter's (ipykernel), started with this process's environment, so it sees
the test session's CPU devices, offline flags and compilation cache (LDM_JAX_COMPILATION_CACHE).
A failing cell raises nbclient's CellExecutionError, whose message shows the cell and the
traceback. Returns the executed notebook (nbformat node) for assertions on outputs.
"""
from __future__ import annotations

import os
import pathlib

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"


def parameters_index(nb) -> int:
    """Index of the code cell tagged `parameters` (exactly one is required)."""
    found = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", [])]
    if len(found) != 1:
        raise ValueError(f"a notebook needs exactly one code cell tagged 'parameters', found {len(found)}")
    return found[0]


def with_parameters(nb, parameters: dict):
    """A copy of `nb` with a cell setting `parameters` after its `parameters` cell."""
    nb = nbformat.from_dict(nb)  # deep copy
    if parameters:
        source = "# Parameters injected by the test\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
        cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
        nb.cells.insert(parameters_index(nb) + 1, cell)
    return nb


def run_notebook(path, parameters: dict | None = None, *, cwd=None, timeout: int = 600, env: dict | None = None):
    """Execute the notebook at `path` (relative to notebooks/ or absolute) and return it."""
    path = pathlib.Path(path)
    if not path.is_absolute():
        path = NOTEBOOKS / path if (NOTEBOOKS / path).exists() else ROOT / path
    nb = with_parameters(nbformat.read(path, as_version=4), parameters or {})
    kernel_env = dict(os.environ, **(env or {}))
    kernel_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), kernel_env.get("PYTHONPATH")]))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=False)
    client.execute(cwd=str(cwd or path.parent), env=kernel_env)
    return nb


def outputs_text(nb) -> str:
    """Every stream and text/plain output of the executed notebook, joined (for assertions)."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out and "text/plain" in out["data"]:
                parts.append(out["data"]["text/plain"] + "\n")  # a display's repr is not newline-terminated
    return "".join(parts)


def image_outputs(nb) -> int:
    """How many image/png outputs the executed notebook has."""
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))

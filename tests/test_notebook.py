"""notebooks/quickstart.ipynb runs top to bottom, headless, on one CPU device (as on a laptop or
Colab), within its time budget: routing, samples before and after training, training, figures, and upcycling a
dense model."""

import os
import pathlib
import subprocess
import sys
import time

import nbformat
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"
BUDGET_S = 300


def _outputs(nb, kind: str) -> list:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == kind]


def test_quickstart_notebook_runs_headless(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel gets one CPU device, not the 8 simulated ones the other tests use.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", TMPDIR=str(tmp_path))
    start = time.perf_counter()
    NotebookClient(
        nb, timeout=BUDGET_S, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute(env=env)
    assert time.perf_counter() - start < BUDGET_S
    assert not _outputs(nb, "error")
    # Plain prints arrive as streams; the trainer's console lines as rich displays (the progress bar is a widget).
    text = "".join(o.get("text", "") for o in _outputs(nb, "stream")) + "".join(
        o["data"].get("text/plain", "") for o in _outputs(nb, "display_data")
    )
    assert "missing before this cell: nothing" in text  # the install cell is a no-op when installed
    assert "backend cpu: [CpuDevice(id=0)]" in text  # and says what JAX found
    assert "done: 100 steps" in text and text.count("done: 40 steps") == 2  # the dense run and the upcycled one
    assert "max |MoE logits - dense logits|" in text  # the upcycled model computes the dense function
    assert any("application/vnd.jupyter.widget-view+json" in o["data"] for o in _outputs(nb, "display_data"))
    assert text.count("the model's own drop rate") == 2  # before and after training
    assert "sample before training:\ndef " in text and "sample after training:\ndef " in text
    images = [o for o in _outputs(nb, "display_data") + _outputs(nb, "execute_result") if "image/png" in o["data"]]
    assert len(images) == 4  # drop rate, alpha, Max1/Max2 and expert-similarity figures shown inline


def test_install_cell_outside_a_checkout_says_what_to_do(tmp_path):
    """A fresh Colab runtime: nothing installed (python -S hides site-packages) and no checkout around."""
    cell = nbformat.read(NOTEBOOK, as_version=4).cells[1]
    assert cell.cell_type == "code"
    result = subprocess.run(
        [sys.executable, "-S", "-c", cell.source], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"skymoe_jax is not installed and {tmp_path} is not inside a checkout of "
        "skymoe-jax: clone or upload the repository, %cd into it, and run this cell again"
    )

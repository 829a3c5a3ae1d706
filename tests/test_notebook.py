"""notebooks/colab_tpu.ipynb executes top to bottom on the CPU (tiny model, small settings): every cell
runs without raising, the curriculum finishes, and the report, plots, sampled answers and the PEFT
export appear in its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_tpu.ipynb"


def test_notebook_is_valid_and_parametrised():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "MODEL_PATH" in params[0].source and "WORKDIR" in params[0].source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs
    assert "colab.research.google.com/assets/colab-badge.svg" in nb.cells[0].source


@pytest.mark.slow
def test_notebook_executes_on_cpu(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    # papermill-style injected parameters: the run goes to a temporary directory
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(f'WORKDIR = "{tmp_path / "run"}"'))
    monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device, like one chip
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError when a cell raises
    text = json.dumps([c.get("outputs", []) for c in nb.cells if c.cell_type == "code"])
    assert "finished" in text
    assert "LoRA rank 8 on language, vision, merger" in text
    assert (tmp_path / "run" / "report.md").exists() and any((tmp_path / "run" / "plots").glob("*.png"))
    assert "image/png" in text  # plots and the sampled answers' images are displayed
    assert "model: " in text and "answer: " in text
    assert (tmp_path / "run" / "hf" / "adapter" / "adapter_model.safetensors").exists()

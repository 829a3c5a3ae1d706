"""The docs' user-data walkthrough (`scripts/walkthrough.sh`) end to end, from a folder outside
the repository with the installed commands: prepare an EasyR1-style Parquet file, train GRPO + SFT,
evaluate, export, load in transformers. Slow (CI runs it with `-m slow`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_user_data_walkthrough_outside_the_repository(tmp_path):
    if not list(Path(sys.prefix).glob(".installed-*")):
        pytest.skip("needs the venv scripts/env.sh made (bash scripts/test.sh -m slow)")
    folder = tmp_path / "my_project"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VLM_JAX_DATA_DIR")}
    env["VLM_JAX_VENV"] = sys.prefix
    r = subprocess.run(["bash", str(ROOT / "scripts/walkthrough.sh"), str(folder)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "== walkthrough finished" in r.stdout and "transformers loaded run_hf" in r.stdout
    result = json.loads((folder / "eval.json").read_text())["datasets"]["mydata[train]"]
    assert (result["n"], result["rows"]) == (12, 12)
    assert (folder / "home" / "data" / "mydata").is_dir() and (folder / "run_hf" / "model.safetensors").is_file()

"""Prints the max |logit difference| between vlm_jax and transformers (PyTorch, fp32) per case.

    python scripts/check_parity.py [--family qwen2_5_vl|qwen3_vl]

Builds tiny random Qwen2.5-VL or Qwen3-VL checkpoints (every parameter randomised) in a temp dir; no
downloads.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hf_reference import FAMILIES, build_reference, make_batch, reference_logits  # noqa: E402
from vlm_jax import models  # noqa: E402

CASES = {
    "image 6x10 patches (partial windows / odd 3x5 merged grid)": dict(rows=[[(6, 10)]]),
    "two images in one row": dict(rows=[[(6, 10), (4, 4)]]),
    "mixed batch, right padding": dict(rows=[[], [(6, 10)], [(6, 10), (4, 4)]]),
    "mixed batch, left padding": dict(rows=[[], [(6, 10)], [(6, 10), (4, 4)]], padding="left"),
    "text only, left padding": dict(rows=[[], []], padding="left"),
    "tied embeddings": dict(rows=[[], [(6, 10)]], build=dict(tied=True)),
    "bf16 (relative error)": dict(rows=[[], [(6, 10)], [(4, 4), (4, 4)]], dtype=jnp.bfloat16),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="qwen2_5_vl", choices=sorted(FAMILIES))
    family = parser.parse_args(argv).family
    patch = FAMILIES[family][2]
    print(f"{family}: {'case':58s} {'max |diff|':>12s}")
    for name, case in CASES.items():
        with tempfile.TemporaryDirectory() as d:
            ref = build_reference(d, family=family, **case.get("build", {}))
            batch = make_batch(case["rows"], padding=case.get("padding", "right"), patch=patch)
            want = reference_logits(ref, batch)
            with jax.default_matmul_precision("highest"):
                model, params = models.from_pretrained(d, dtype=case.get("dtype", jnp.float32))
                got = np.asarray(models.forward(model, params, batch)).astype(np.float32)
            m = batch["attention_mask"].astype(bool)
            if "dtype" in case:
                value = np.linalg.norm(got[m] - want[m]) / np.linalg.norm(want[m])
            else:
                value = np.abs(got - want)[m].max()
            print(f"{name:70s} {value:12.3e}")


if __name__ == "__main__":
    main()

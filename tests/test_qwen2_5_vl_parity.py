"""Logit parity of the Flax Qwen2.5-VL against transformers (PyTorch, fp32), and HF round trips."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from hf_reference import build_reference, make_batch, reference_logits
from vlm_jax import models

TOL = 1e-4

# Rows are lists of images given as (h, w) patch grids. 6x10 patches -> a 3x5 merged grid, which is
# not a multiple of the 2x2-merged-token window (window_size 56 = 2 merged tokens of 28 px).
MIXED = [[], [(6, 10)], [(6, 10), (4, 4)]]


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    d = tmp_path_factory.mktemp("untied")
    return d, build_reference(d, seed=0)


def max_diff(got, want, mask):
    return float(np.abs(np.asarray(got) - want)[mask.astype(bool)].max())


def jax_logits(path, batch, **kw):
    with jax.default_matmul_precision("highest"):
        model, params = models.from_pretrained(path, **kw)
        return np.asarray(models.forward(model, params, batch))


@pytest.mark.parametrize("padding", ["left", "right"])
def test_mixed_batch_parity(untied, padding):
    path, ref = untied
    batch = make_batch(MIXED, padding=padding, seed=1)
    want = reference_logits(ref, batch)
    assert 1.0 < np.abs(want).max() < 50.0  # logits at a scale where a mapping error would show
    assert max_diff(jax_logits(path, batch), want, batch["attention_mask"]) <= TOL


def test_single_image_partial_windows_and_two_images(untied):
    path, ref = untied
    for rows in ([[(6, 10)]], [[(4, 4), (6, 10)]], [[(10, 6)], [(8, 8)]]):
        batch = make_batch(rows, padding="right", seed=2)
        want = reference_logits(ref, batch)
        assert max_diff(jax_logits(path, batch), want, batch["attention_mask"]) <= TOL, rows


def test_text_only_batch(untied):
    path, ref = untied
    batch = make_batch([[], []], padding="left", seed=3)
    want = reference_logits(ref, batch)
    assert max_diff(jax_logits(path, batch), want, batch["attention_mask"]) <= TOL


def test_tied_embeddings(tmp_path):
    ref = build_reference(tmp_path, seed=4, tied=True)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        assert not any(k.startswith("lm_head") for k in f.keys())  # the file really is tied
    batch = make_batch(MIXED, padding="right", seed=4)
    model, _ = models.from_pretrained(tmp_path)
    assert model.config.tie_word_embeddings
    assert max_diff(jax_logits(tmp_path, batch), reference_logits(ref, batch), batch["attention_mask"]) <= TOL


def _flatten_config(path):
    """Rewrites a transformers-5 nested config.json into the flat layout of hub Qwen2.5-VL files."""
    raw = json.loads((path / "config.json").read_text())
    text = raw.pop("text_config")
    rope = text.pop("rope_parameters")
    for k, v in text.items():
        if k not in ("model_type", "architectures"):
            raw.setdefault(k, v)
    raw["rope_theta"] = rope["rope_theta"]
    raw["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    (path / "config.json").write_text(json.dumps(raw))
    return raw


def test_flat_hub_config(tmp_path):
    build_reference(tmp_path, seed=5, window_size=112, fullatt=(0,), mrope=(4, 2, 2))
    raw = _flatten_config(tmp_path)
    assert "text_config" not in raw and "hidden_size" in raw
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    batch = make_batch(MIXED, padding="left", seed=5)
    assert max_diff(jax_logits(tmp_path, batch), reference_logits(ref, batch), batch["attention_mask"]) <= TOL


def test_window_attention_is_observable(untied, tmp_path):
    """Same weights with every block on full attention change the logits by far more than TOL, so
    the parity tests above do distinguish windowed from full attention."""
    path, _ = untied
    raw = json.loads((path / "config.json").read_text())
    raw["vision_config"]["fullatt_block_indexes"] = [0, 1]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    batch = make_batch([[(6, 10)]], seed=6)
    diff = max_diff(jax_logits(tmp_path, batch), jax_logits(path, batch), batch["attention_mask"])
    assert diff > 100 * TOL


def test_bf16_close_to_fp32_reference(untied):
    path, ref = untied
    batch = make_batch(MIXED, padding="right", seed=7)
    want = reference_logits(ref, batch)
    got = jax_logits(path, batch, dtype=jnp.bfloat16).astype(np.float32)
    m = batch["attention_mask"].astype(bool)
    rel = np.linalg.norm(got[m] - want[m]) / np.linalg.norm(want[m])
    assert rel <= 2e-2, rel


def test_save_pretrained_round_trip(untied, tmp_path):
    path, _ = untied
    batch = make_batch(MIXED, padding="left", seed=8)
    model, params = models.from_pretrained(path)
    models.save_pretrained(model, params, tmp_path / "export", max_shard_bytes=200_000)
    assert (tmp_path / "export" / "model.safetensors.index.json").exists()  # sharded files
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "export", dtype=torch.float32
    ).eval()
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(models.forward(model, params, batch))
    assert max_diff(ours, reference_logits(reloaded, batch), batch["attention_mask"]) <= TOL
    # and back into vlm_jax: bitwise the same parameters
    _, params2 = models.from_pretrained(tmp_path / "export")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_v5_in_memory_names_load(untied, tmp_path):
    """Files written with transformers-5 in-memory names (`model.language_model.*`, `model.visual.*`)."""
    from safetensors.numpy import load_file, save_file

    path, ref = untied
    tensors = load_file(str(path / "model.safetensors"))
    renamed = {}
    for k, v in tensors.items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model."):
            k = "model.language_model." + k[len("model.") :]
        renamed[k] = v
    save_file(renamed, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    batch = make_batch(MIXED, seed=9)
    assert max_diff(jax_logits(tmp_path, batch), reference_logits(ref, batch), batch["attention_mask"]) <= TOL

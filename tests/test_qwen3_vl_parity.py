"""Logit parity of the Flax Qwen3-VL against transformers (PyTorch, fp32) on randomised tiny models,
cases that fail for each porting pitfall, bf16 error, and HF round trips."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration

from hf_reference import build_reference, make_batch, reference_logits
from vlm_jax import models
from vlm_jax.models.qwen2_5_vl import model as q25_model
from vlm_jax.models.qwen3_vl import inputs as q3_inputs
from vlm_jax.models.qwen3_vl import model as q3_model

TOL = 1e-4
PATCH = 16

# Rows are lists of images as (h, w) patch grids. 6x10 patches: a 3x5 merged grid (odd), resampled
# from the 5x5 learned position grid at non-integer source coordinates; 4x4 and 2x2 are other sizes.
MIXED = [[], [(6, 10)], [(6, 10), (4, 4)]]


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    d = tmp_path_factory.mktemp("q3_untied")
    return d, build_reference(d, seed=0, family="qwen3_vl")


def batch_of(rows, padding="right", seed=0):
    return make_batch(rows, padding=padding, seed=seed, patch=PATCH)


def max_diff(got, want, mask):
    return float(np.abs(np.asarray(got) - want)[mask.astype(bool)].max())


def jax_logits(path, batch, **kw):
    with jax.default_matmul_precision("highest"):
        model, params = models.from_pretrained(path, **kw)
        return np.asarray(models.forward(model, params, batch))


def test_registry_picks_qwen3_vl(untied):
    path, _ = untied
    model, params = models.from_pretrained(path)
    assert model.family.MODEL_TYPES == ("qwen3_vl",)
    assert isinstance(model.merge(params), q3_model.Qwen3VL)
    assert model.config.vision.deepstack_visual_indexes == (0, 2) and model.config.text.head_dim == 32


@pytest.mark.parametrize(
    "rows,padding",
    [
        ([[], []], "left"),  # text-only rows
        ([[(6, 10)]], "right"),  # one image
        ([[(4, 4), (6, 10)]], "right"),  # two images of different sizes in one row
        ([[(2, 2)], [(10, 6)]], "left"),
        (MIXED, "left"),  # a batch mixing them
        (MIXED, "right"),
    ],
)
def test_logit_parity(untied, rows, padding):
    path, ref = untied
    batch = batch_of(rows, padding, seed=len(rows))
    want = reference_logits(ref, batch)
    assert 1.0 < np.abs(want).max() < 50.0  # logits at a scale where a mapping error would show
    assert max_diff(jax_logits(path, batch), want, batch["attention_mask"]) <= TOL


def test_tied_embeddings(tmp_path):
    ref = build_reference(tmp_path, seed=4, family="qwen3_vl", tied=True)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        assert not any(k.startswith("lm_head") for k in f.keys())  # the file really is tied
    model, _ = models.from_pretrained(tmp_path)
    assert model.config.tie_word_embeddings
    batch = batch_of(MIXED, "right", seed=4)
    assert max_diff(jax_logits(tmp_path, batch), reference_logits(ref, batch), batch["attention_mask"]) <= TOL


# -- each porting pitfall changes the logits far beyond TOL, so the parity above rules it out --------


def _pitfall_diff(untied, batch, monkeypatch, patch_fn):
    """max |diff| to transformers with `patch_fn` applied (the right code passes: test_logit_parity)."""
    path, ref = untied
    want = reference_logits(ref, batch)
    with monkeypatch.context() as m:
        patch_fn(m, path)
        jax.clear_caches()  # the jitted forward traced the right code for this shape already
        diff = max_diff(jax_logits(path, batch), want, batch["attention_mask"])
    jax.clear_caches()
    return diff


def test_blocked_mrope_would_fail(untied, monkeypatch):
    """Qwen2.5-VL's blocked [T|H|W] frequency layout instead of the interleaved one."""
    batch = batch_of([[(6, 10)]], seed=1)  # the one-image case of test_logit_parity
    diff = _pitfall_diff(
        untied, batch, monkeypatch, lambda m, _: m.setattr(q3_model, "mrope_cos_sin", q25_model.mrope_cos_sin)
    )
    assert diff > 100 * TOL


def test_shifted_deepstack_index_would_fail(untied, tmp_path):
    """DeepStack feature 0 taken after vision block 1 instead of block 0 (an index read 1-based, as
    a count of blocks run): the config's 0-based [0, 2] read as [1, 2]."""
    path, ref = untied
    raw = json.loads((path / "config.json").read_text())
    assert raw["vision_config"]["deepstack_visual_indexes"] == [0, 2]
    raw["vision_config"]["deepstack_visual_indexes"] = [1, 2]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    batch = batch_of([[(6, 10)]], seed=1)  # the one-image case of test_logit_parity
    want = reference_logits(ref, batch)
    assert max_diff(jax_logits(tmp_path, batch), want, batch["attention_mask"]) > 100 * TOL


@pytest.mark.parametrize("wrong", ["align_corners_false", "raster_order"])
def test_position_embedding_interpolation_pitfalls_would_fail(untied, monkeypatch, wrong):
    """The learned 5x5 position grid resampled to an odd 3x5-merged (6x10-patch) grid with
    align_corners=False, or in raster instead of merge-block order."""
    right = q3_inputs.pos_embed_taps

    def taps(h, w, side, merge, align_corners=True):
        if wrong == "align_corners_false":
            return right(h, w, side, merge, align_corners=False)
        return right(h, w, side, 1)  # merge 1 = raster order

    batch = batch_of([[(6, 10)]], seed=1)  # the one-image case of test_logit_parity
    diff = _pitfall_diff(untied, batch, monkeypatch, lambda m, _: m.setattr(q3_inputs, "pos_embed_taps", taps))
    assert diff > 100 * TOL


def test_bf16_close_to_fp32_reference(untied):
    path, ref = untied
    batch = batch_of(MIXED, "right", seed=8)
    want = reference_logits(ref, batch)
    got = jax_logits(path, batch, dtype=jnp.bfloat16).astype(np.float32)
    m = batch["attention_mask"].astype(bool)
    rel = np.linalg.norm(got[m] - want[m]) / np.linalg.norm(want[m])
    assert rel <= 2e-2, rel


def test_save_pretrained_round_trip(untied, tmp_path):
    path, _ = untied
    batch = batch_of(MIXED, "left", seed=9)
    model, params = models.from_pretrained(path)
    models.save_pretrained(model, params, tmp_path / "export", max_shard_bytes=100_000)
    assert (tmp_path / "export" / "model.safetensors.index.json").exists()  # sharded files
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "qwen3_vl"
    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(models.forward(model, params, batch))
    assert max_diff(ours, reference_logits(reloaded, batch), batch["attention_mask"]) <= TOL
    _, params2 = models.from_pretrained(tmp_path / "export")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_names_without_model_prefix_load(untied, tmp_path):
    """Files with `visual.*` / `model.layers.*` names (no `language_model` level) load too."""
    from safetensors.numpy import load_file, save_file

    path, ref = untied
    renamed = {}
    for k, v in load_file(str(path / "model.safetensors")).items():
        if k.startswith("model.visual."):
            k = k[len("model.") :]
        elif k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model.") :]
        renamed[k] = v
    save_file(renamed, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    batch = batch_of([[(6, 10)]], seed=10)
    assert max_diff(jax_logits(tmp_path, batch), reference_logits(ref, batch), batch["attention_mask"]) <= TOL

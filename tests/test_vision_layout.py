"""The per-row vision layout and per-segment vision attention compute what the dense path over the
whole batch did: values and gradients (fp32, both families, window and full blocks, odd grids,
several images per row, text-only rows); the vision inputs split over the batch; a GRPO
micro-batch encodes only its distinct prompts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import build_reference, make_batch
from vlm_jax import models, sharding
from vlm_jax.config import MeshConfig
from vlm_jax.models.qwen2_5_vl import inputs as q25_inputs
from vlm_jax.models.qwen2_5_vl import model as q25_model
from vlm_jax.rl.policy import embed_prompts
from vlm_jax.shapes import row_patch_budget

# odd merged grids (3x5, 5x3: partial windows), two images in a row, text-only rows
ROWS = [[(6, 10)], [], [(4, 4), (2, 6)], [(10, 6)]]


def dense_segment_attention(q_BPHE, k_BPHE, v_BPHE, seg_BP, *, halo=None, chunk=None):
    """What the vision attention was: one dense [H, P, P] softmax over ALL the batch's patches with a
    segment mask (rows flattened, segment ids made unique across rows)."""
    B, P, H, E = q_BPHE.shape
    flat = lambda a: a.reshape(B * P, *a.shape[2:])  # noqa: E731
    seg = jnp.where(seg_BP >= 0, seg_BP + 10_000 * jnp.arange(B)[:, None], -1).reshape(-1)
    scores = jnp.einsum("qhd,khd->hqk", flat(q_BPHE), flat(k_BPHE)) * E**-0.5
    scores = jnp.where((seg[:, None] == seg[None, :])[None], scores.astype(jnp.float32), q25_model.NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_BPHE.dtype)
    return jnp.einsum("hqk,khd->qhd", probs, flat(v_BPHE)).reshape(B, P, H, E)


def random_segments(rng, B, P, most, pad_from):
    """Contiguous segments of 1..`most` patches per row, ids from 0, padding (-1) after `pad_from[b]`."""
    seg = np.full((B, P), -1, np.int32)
    for b in range(B):
        i, s = 0, 0
        while i < pad_from[b]:
            n = min(int(rng.integers(1, most + 1)), pad_from[b] - i)
            seg[b, i : i + n] = s
            i, s = i + n, s + 1
    return seg


@pytest.mark.parametrize(
    "halo,chunk",
    [(8, 16), (None, 12), pytest.param(8, 48, marks=pytest.mark.slow), pytest.param(None, 16, marks=pytest.mark.slow)],
)
def test_segment_attention_equals_dense_values_and_gradients(halo, chunk):
    rng = np.random.default_rng(0)
    B, P, H, E = 3, 48, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal((B, P, H, E)), jnp.float32) for _ in range(3))
    seg = jnp.asarray(random_segments(rng, B, P, 8 if halo else 30, [48, 37, 0]))  # last row all padding
    w = jnp.asarray(rng.standard_normal((B, P, H, E)), jnp.float32)
    valid = (seg >= 0)[..., None, None]
    new = functools.partial(q25_model.segment_attention, halo=halo, chunk=chunk)

    def loss(fn, q, k, v):
        return jnp.sum(jnp.where(valid, fn(q, k, v, seg) * w, 0.0))

    with jax.default_matmul_precision("highest"):
        got = jax.value_and_grad(functools.partial(loss, new), argnums=(0, 1, 2))(q, k, v)
        want = jax.value_and_grad(functools.partial(loss, dense_segment_attention), argnums=(0, 1, 2))(q, k, v)
        out, ref = new(q, k, v, seg), dense_segment_attention(q, k, v, seg)
    assert np.isfinite(np.asarray(out)).all()  # padding rows stay NaN-free
    np.testing.assert_allclose(np.asarray(out)[np.asarray(seg) >= 0], np.asarray(ref)[np.asarray(seg) >= 0],
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=0)
    for g, h in zip(got[1], want[1]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), atol=1e-5, rtol=0)


@pytest.fixture(scope="module", params=["qwen2_5_vl", pytest.param("qwen3_vl", marks=pytest.mark.slow)])
def family_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    build_reference(path, seed=3, family=request.param)
    model, params = models.from_pretrained(path)
    return request.param, model, params


def embed_value_and_grad(model, params, inputs):
    """sum(embed * fixed weights) over valid tokens, and its gradient w.r.t. every parameter."""
    valid = jnp.asarray(inputs.attention_mask_BL > 0)[..., None]

    def f(p):
        x = model.merge(p).embed(inputs.input_ids_BL, inputs.vision)
        w = jnp.cos(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape))
        return jnp.sum(jnp.where(valid, x * w, 0.0))

    with jax.default_matmul_precision("highest"):
        return jax.jit(jax.value_and_grad(f))(params)


def test_vision_tower_equals_dense_over_the_batch(family_model, monkeypatch):
    """Every block type (window and full for Qwen2.5-VL; full + DeepStack for Qwen3-VL), several
    query chunks per row, odd grids, two images in a row and text-only rows: the per-row, per-segment
    attention gives the dense whole-batch attention's values and gradients."""
    name, model, params = family_model
    batch = make_batch(ROWS, padding="right", seed=4, patch=14 if name == "qwen2_5_vl" else 16)
    inputs = model.prepare(batch)
    assert inputs.vision.patches_BPC.shape[:2] == (4, 64)  # per row, bucketed to the largest row
    small = functools.partial(q25_model.segment_attention, chunk=8)  # 8 query chunks per row
    monkeypatch.setattr(q25_model, "segment_attention", small)
    got = embed_value_and_grad(model, params, inputs)
    monkeypatch.setattr(q25_model, "segment_attention", dense_segment_attention)
    want = embed_value_and_grad(model, params, inputs)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-3)
    n_vision = 0
    for (path, g), h in zip(jax.tree_util.tree_flatten_with_path(got[1])[0], jax.tree.leaves(want[1])):
        key = jax.tree_util.keystr(path)
        n_vision += "visual" in key and float(jnp.abs(g).max()) > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), atol=2e-5, rtol=0, err_msg=key)
    assert n_vision > 10  # the vision tower's gradients are really compared


@pytest.mark.slow
def test_each_row_encodes_only_its_own_images(family_model):
    """A row's features do not depend on the other rows (or on the per-row budget): encoding the
    batch equals encoding each row alone with a bigger budget."""
    name, model, params = family_model
    patch = 14 if name == "qwen2_5_vl" else 16
    batch = make_batch(ROWS, padding="right", seed=5, patch=patch)
    run = jax.jit(lambda p, i: model.merge(p).embed(i.input_ids_BL, i.vision))
    with jax.default_matmul_precision("highest"):
        whole = np.asarray(run(params, model.prepare(batch)))
        offset = 0
        for b, images in enumerate(ROWS):
            n = len(images)
            one = dict(input_ids=batch["input_ids"][b : b + 1], attention_mask=batch["attention_mask"][b : b + 1])
            if n:
                sizes = [h * w for h, w in images]
                start = sum(h * w for imgs in ROWS[:b] for h, w in imgs)
                one["pixel_values"] = batch["pixel_values"][start : start + sum(sizes)]
                one["image_grid_thw"] = batch["image_grid_thw"][offset : offset + n]
            offset += n
            alone = np.asarray(run(params, model.prepare(one, num_patches=128)))
            np.testing.assert_allclose(whole[b], alone[0], atol=1e-5, rtol=0, err_msg=f"row {b}")


def test_vision_inputs_split_over_the_batch(family_model):
    """On an 8-device (data, fsdp) mesh the vision arrays are placed per row like the tokens (each
    shard holds only its rows' patches) and the sharded forward equals the single-device one."""
    name, model, params = family_model
    rows = ROWS * 2  # 8 rows, one per device
    batch = make_batch(rows, padding="right", seed=6, patch=14 if name == "qwen2_5_vl" else 16)
    with jax.default_matmul_precision("highest"):
        want = np.asarray(models.forward(model, params, batch))
        mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4))
        sharded, sparams = models.from_pretrained(model.source_dir, mesh=mesh)
        inputs = models.place_inputs(sharded, sharded.prepare(batch))
        for leaf in jax.tree.leaves(inputs.vision):
            assert leaf.sharding.spec[0] == ("data", "fsdp"), leaf.sharding
            assert leaf.addressable_shards[0].data.shape[0] == 1  # one row's patches per device
        got = np.asarray(models.forward(sharded, sparams, batch))
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)


def test_grpo_micro_batch_embeds_its_distinct_prompts_once(family_model):
    """`embed_prompts` with fewer completions than prompts encodes only the prompts named (each
    once) and gives every completion its prompt's embedding, as embedding the rows directly."""
    name, model, params = family_model
    batch = make_batch(ROWS, padding="right", seed=7, patch=14 if name == "qwen2_5_vl" else 16)
    inputs = model.prepare(batch)
    emb = jax.jit(lambda p, i, local, shards: embed_prompts(model.merge(p), i, local, shards), static_argnums=3)
    with jax.default_matmul_precision("highest"):
        full = np.asarray(jax.jit(lambda p, i: model.merge(p).embed(i.input_ids_BL, i.vision))(params, inputs))
        got = np.asarray(emb(params, inputs, jnp.asarray([[2, 0, 2]]), 1))  # 3 completions, 2 distinct prompts
        got2 = np.asarray(emb(params, inputs, jnp.asarray([[1, 0, 1], [0, 1, 1]]), 2))  # 2 shards of 2 prompts
    np.testing.assert_allclose(got, full[[2, 0, 2]], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got2, full[[1, 0, 1, 2, 3, 3]], atol=1e-5, rtol=0)


def test_layout_errors_name_the_row_and_budget():
    cfg = models.families()["qwen2_5_vl"].parse_config(_tiny_raw(), "tiny")
    batch = make_batch([[(4, 4)], [(6, 10)]], seed=8)
    with pytest.raises(ValueError, match=r"row 1 has 60 image patches, over the per-row patch budget 32"):
        q25_inputs.prepare_inputs(batch, cfg, num_patches=32)
    with pytest.raises(ValueError, match="not a multiple of the merge unit"):
        q25_inputs.prepare_inputs(batch, cfg, num_patches=66)
    per_row = q25_inputs.images_per_row(
        batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], cfg.image_token_id, 4
    )
    assert per_row.tolist() == [1, 1]
    assert row_patch_budget(4_194_304, 14) == 21_440 and row_patch_budget(112 * 112, 14) == 64


def _tiny_raw():
    from hf_reference import FAMILIES

    make_config = FAMILIES["qwen2_5_vl"][0]
    return make_config().to_dict()

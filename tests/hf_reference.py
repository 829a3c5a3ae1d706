"""Reference PyTorch Qwen2.5-VL and Qwen3-VL models for parity tests (torch is a test-only dependency)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

# Special token ids inside the tiny vocab.
IMAGE, VIDEO, VSTART, VEND = 250, 251, 252, 253


def tiny_hf_config(
    *,
    tied=False,
    window_size=56,
    fullatt=(1,),
    vocab=256,
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    mrope=(2, 3, 3),
    vision_depth=2,
    vision_hidden=32,
    vision_heads=2,
) -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope)},
            max_position_embeddings=4096,
            tie_word_embeddings=tied,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_heads=vision_heads,
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=window_size,
            fullatt_block_indexes=list(fullatt),
            out_hidden_size=hidden,
            tokens_per_second=2,
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VSTART,
        vision_end_token_id=VEND,
        tie_word_embeddings=tied,
    )


def tiny_qwen3_config(
    *,
    tied=False,
    vocab=256,
    hidden=64,
    layers=3,
    heads=4,
    kv_heads=2,
    head_dim=32,
    mrope=(6, 5, 5),
    vision_depth=3,
    vision_hidden=32,
    vision_heads=2,
    deepstack=(0, 2),
    num_position_embeddings=25,
) -> Qwen3VLConfig:
    """Tiny Qwen3-VL: head_dim 32 != hidden / heads, 2 DeepStack features (from vision blocks 0 and 2)
    into decoder layers 0 and 1 of 3, a 5 x 5 learned position grid (resampled to every image)."""
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": list(mrope),
                "mrope_interleaved": True,
            },
            max_position_embeddings=4096,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_heads=vision_heads,
            patch_size=16,
            temporal_patch_size=2,
            spatial_merge_size=2,
            out_hidden_size=hidden,
            num_position_embeddings=num_position_embeddings,
            deepstack_visual_indexes=list(deepstack),
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VSTART,
        vision_end_token_id=VEND,
        tie_word_embeddings=tied,
    )


FAMILIES = {
    "qwen2_5_vl": (tiny_hf_config, Qwen2_5_VLForConditionalGeneration, 14),
    "qwen3_vl": (tiny_qwen3_config, Qwen3VLForConditionalGeneration, 16),
}


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> None:
    """Every parameter random (biases and norm weights too) at a scale where logits are O(1-10)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name or name.endswith("ln_q.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:])) if "embed_tokens" not in name else 1
                p.copy_(scale * torch.randn(p.shape, generator=g) / np.sqrt(fan_in))


def build_reference(out_dir, seed=0, family="qwen2_5_vl", **kw):
    """A randomised tiny model of `family` saved to `out_dir` (returned, in eval mode)."""
    make_config, cls, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = cls(make_config(**kw)).eval()
    randomize_(model, seed)
    model.save_pretrained(out_dir)
    return model


def make_batch(rows, *, padding="right", seed=0, vocab=200, patch=14):
    """rows: list of lists of images, each image an (h, w) patch grid; text tokens random < vocab;
    `patch` the vision patch size (14 Qwen2.5-VL, 16 Qwen3-VL). Returns a processor-style numpy batch."""
    rng = np.random.default_rng(seed)
    seqs, grids = [], []
    for images in rows:
        seq = list(rng.integers(0, vocab, size=3))
        for h, w in images:
            seq += [VSTART] + [IMAGE] * (h * w // 4) + [VEND] + list(rng.integers(0, vocab, size=2))
            grids.append((1, h, w))
        seq += list(rng.integers(0, vocab, size=int(rng.integers(2, 6))))
        seqs.append(seq)
    L = max(map(len, seqs))
    ids = np.zeros((len(seqs), L), np.int64)
    mask = np.zeros((len(seqs), L), np.int64)
    for b, s in enumerate(seqs):
        if padding == "right":
            ids[b, : len(s)], mask[b, : len(s)] = s, 1
        else:
            ids[b, L - len(s) :], mask[b, L - len(s) :] = s, 1
    n_patches = sum(h * w for _, h, w in grids)
    batch = dict(input_ids=ids, attention_mask=mask)
    if grids:
        batch["pixel_values"] = rng.standard_normal((n_patches, 3 * 2 * patch * patch)).astype(np.float32)
        batch["image_grid_thw"] = np.asarray(grids, np.int64)
    return batch


def random_rollout_batch(prompt, G: int, T: int, rng: np.random.Generator):
    """A GRPO `RolloutBatch` of G random completions (lengths 1..T, tokens < 200) per row of the model
    inputs `prompt`, with random old / reference log-probs and advantages, drawn from `rng`."""
    import jax.numpy as jnp

    from vlm_jax.rl.policy import RolloutBatch

    N = prompt.input_ids_BL.shape[0] * G
    mask = (np.arange(T)[None] < rng.integers(1, T + 1, size=N)[:, None]).astype(np.float32)
    return RolloutBatch(
        prompt,
        jnp.asarray(rng.integers(0, 200, size=(N, T)), jnp.int32),
        jnp.asarray(mask),
        jnp.asarray(-rng.uniform(0.5, 4.0, size=(N, T)), jnp.float32),
        jnp.asarray(-rng.uniform(0.5, 4.0, size=(N, T)), jnp.float32),
        jnp.asarray(rng.standard_normal(N), jnp.float32),
    )


def reference_logits(model, batch) -> np.ndarray:
    """transformers logits with positions from its own get_rope_index (and mm_token_type_ids)."""
    ids = torch.as_tensor(np.asarray(batch["input_ids"], np.int64))
    mask = torch.as_tensor(np.asarray(batch["attention_mask"], np.int64))
    mm = (ids == IMAGE).int()
    grid = torch.as_tensor(batch["image_grid_thw"]) if "image_grid_thw" in batch else None
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=mask)
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=pos, mm_token_type_ids=mm)
    if grid is not None:
        kwargs.update(pixel_values=torch.as_tensor(batch["pixel_values"]), image_grid_thw=grid)
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()

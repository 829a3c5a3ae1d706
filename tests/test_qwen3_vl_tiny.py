"""The tiny Qwen3-VL directory is a real HF checkpoint, and the processor serves it: patch 16 /
factor 32, mean = std = 0.5, `<|image_pad|>` expansion and MRoPE positions as transformers."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from vlm_jax import models
from vlm_jax.data.processor import Processor
from vlm_jax.models.qwen2_5_vl.inputs import rope_index
from vlm_jax.models.qwen3_vl import tiny as tiny3
from vlm_jax.models.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny3") / "model", family="qwen3_vl", seed=1)


@pytest.fixture(scope="module")
def proc(tiny_dir):
    return Processor.from_pretrained(tiny_dir)


def image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def batch(proc):
    texts = [proc.apply_chat_template([{"role": "user", "content": c}]) for c in (
        "What is 2 + 3?",
        [{"type": "image"}, {"type": "text", "text": "Count the circles."}],
        [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}],
    )]
    return proc(texts, [[], [image(70, 100)], [image(64, 64, 1), image(40, 130, 2)]], padding_side="left")


def test_image_processor_patch16_factor32_half_mean_std(proc):
    ip = proc.image_processor
    assert (ip.patch_size, ip.merge_size, proc.patch_dim) == (16, 2, 3 * 2 * 16 * 16)
    white = proc(["<|vision_start|><|image_pad|><|vision_end|>"], [[Image.new("RGB", (100, 70), "white")]])
    assert white["image_grid_thw"].tolist() == [[1, 4, 6]]  # 70 x 100 px -> 64 x 96 (multiples of 32)
    np.testing.assert_allclose(white["pixel_values"], 1.0, atol=1e-6)  # (1 - 0.5) / 0.5
    black = proc(["<|image_pad|>"], [[Image.new("RGB", (64, 64), "black")]])
    np.testing.assert_allclose(black["pixel_values"], -1.0, atol=1e-6)


def test_image_tokens_and_positions_match_transformers(tiny_dir, proc, batch):
    from transformers import Qwen3VLForConditionalGeneration

    grids = batch["image_grid_thw"]
    assert grids.tolist() == [[1, 4, 6], [1, 4, 4], [1, 2, 8]]
    n_tokens = (batch["input_ids"] == proc.image_token_id).sum(-1)
    assert n_tokens.tolist() == [0, 6, 4 + 4]  # t*h*w / 4 per image
    ref = Qwen3VLForConditionalGeneration.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    ids = torch.as_tensor(batch["input_ids"].astype(np.int64))
    want, _ = ref.model.get_rope_index(
        ids, mm_token_type_ids=torch.as_tensor(batch["mm_token_type_ids"]),
        image_grid_thw=torch.as_tensor(grids.astype(np.int64)),
        attention_mask=torch.as_tensor(batch["attention_mask"].astype(np.int64)))
    model, _ = models.from_pretrained(tiny_dir)
    got = rope_index(batch["input_ids"], batch["attention_mask"], grids, model.config)
    np.testing.assert_array_equal(got, want.numpy())


def test_transformers_loads_every_weight_and_logits_match(tiny_dir, batch):
    from transformers import Qwen3VLForConditionalGeneration

    ref, info = Qwen3VLForConditionalGeneration.from_pretrained(
        str(tiny_dir), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    weights = load_file(str(tiny_dir / "model.safetensors"))
    for name, arr in weights.items():  # nothing left at a default init (0 bias, 1 norm)
        assert not np.allclose(arr, 0.0) and not np.allclose(arr, 1.0), name
    inputs = {k: torch.from_numpy(v.astype(np.int64) if v.dtype == np.int32 else v) for k, v in batch.items()}
    with torch.no_grad():
        want = ref.eval()(**inputs).logits.numpy()
    with jax.default_matmul_precision("highest"):
        model, params = models.from_pretrained(tiny_dir)
        got = np.asarray(models.forward(model, params, batch))
    m = batch["attention_mask"].astype(bool)
    assert 0.3 < want[m].std() < 10
    assert np.abs(got - want)[m].max() <= 1e-4


def test_tied_sharded_directory_loads(tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    path = build_tiny_model(tmp_path / "m", family="qwen3_vl", tied=True, shards=2, seed=2)
    assert len(list(path.glob("model-*.safetensors"))) == 2
    ref, info = Qwen3VLForConditionalGeneration.from_pretrained(
        str(path), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model, params = models.from_pretrained(path)
    assert model.config.tie_word_embeddings and model.merge(params).lm_head is None


def test_instruct_template_has_no_default_system_turn(proc):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count."}]},
                {"role": "assistant", "content": "3"}]
    got = proc.tokenizer.apply_chat_template(messages, tokenize=False)
    assert got == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Count.<|im_end|>\n"
                   "<|im_start|>assistant\n3<|im_end|>\n")
    prompt = proc.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_thinking_template_opens_think_and_drops_old_reasoning(tmp_path):
    from transformers import AutoTokenizer

    path = build_tiny_model(tmp_path / "t", family="qwen3_vl", thinking=True, weights=False)
    tok = AutoTokenizer.from_pretrained(str(path))
    conv = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and this?"}]}]
    got = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert got == ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
                   "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>and this?<|im_end|>\n"
                   "<|im_start|>assistant\n<think>\n")
    last = tok.apply_chat_template(conv[:2], tokenize=False)  # the turn after the last query keeps it
    assert last.endswith("<|im_start|>assistant\n<think>\nadd them\n</think>\n\n4<|im_end|>\n")
    assert tok.convert_tokens_to_ids("<think>") != tok.unk_token_id


def test_cli_family_flag(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, str(ROOT / "scripts/build_tiny_model.py"), "--out", str(out),
                          "--family", "qwen3_vl", "--thinking", "--seed", "3"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_vl" and cfg["vision_config"]["deepstack_visual_indexes"] == [0, 2]
    assert json.loads((out / "chat_template.json").read_text())["chat_template"] == tiny3.THINKING_CHAT_TEMPLATE
    assert set(load_file(str(out / "model.safetensors"))) == set(tiny3.weight_shapes(cfg))
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/build_tiny_model.py"), "--out", str(out),
                          "--family", "qwen3_vl", "--flat"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "nested" in bad.stderr

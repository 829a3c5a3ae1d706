"""The tiny Qwen2.5-VL directory is a real HF checkpoint: transformers loads every part offline."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from vlm_jax.models import tiny
from vlm_jax.models.tiny import SPECIAL_TOKENS, TinySpec, build_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir))


def test_builtin_corpus_is_deterministic_and_on_topic():
    a, b = tiny.builtin_corpus(), tiny.builtin_corpus()
    assert a == b and len(a) == 3000
    text = "\n".join(a)
    for needle in ("<think>", "</think>", "\\boxed{", "circle", "left", "digits"):
        assert needle in text


def test_special_tokens_are_single_ids_at_end_of_vocab(tokenizer):
    assert len(tokenizer) == 1024
    n_added = len(SPECIAL_TOKENS) + len(tiny.ADDED_TOKENS)
    for k, tok in enumerate(SPECIAL_TOKENS + tiny.ADDED_TOKENS):
        assert tokenizer(tok)["input_ids"] == [1024 - n_added + k], tok
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_text_with_special_tokens_round_trips(tokenizer):
    text = ("<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>"
            "How many red circles? 42 ünïcode<|im_end|>\n<|im_start|>assistant\n"
            "<think>3 + 4 = 7</think> \\boxed{7}<|im_end|><|endoftext|>")
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ids.count(image_id) == 2
    assert tokenizer.decode(ids, skip_special_tokens=True).startswith("user\nHow many")


def test_chat_template_renders_qwen_layout(tokenizer):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count."}]},
                {"role": "assistant", "content": "3"}]
    got = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert got == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                   "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Count.<|im_end|>\n"
                   "<|im_start|>assistant\n3<|im_end|>\n")
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
        tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
                     "<|im_start|>assistant\n"


def test_configs_use_the_tokenizer_ids(tiny_dir, tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["image_token_id"] == ids("<|image_pad|>")
    assert cfg["video_token_id"] == ids("<|video_pad|>")
    assert cfg["vision_start_token_id"] == ids("<|vision_start|>")
    assert cfg["vision_end_token_id"] == ids("<|vision_end|>")
    assert cfg["text_config"]["eos_token_id"] == ids("<|im_end|>")
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [ids("<|im_end|>"), ids("<|endoftext|>")]


def test_image_processor_loads_pil_backend_with_small_bounds(tiny_dir):
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(str(tiny_dir))
    assert type(proc).__name__ == "Qwen2VLImageProcessorPil"
    assert proc.size["shortest_edge"] == 28 * 28 * 4 and proc.size["longest_edge"] == 28 * 28 * 64
    assert (proc.patch_size, proc.temporal_patch_size, proc.merge_size) == (14, 2, 2)


def test_every_weight_is_randomized(tiny_dir):
    weights = load_file(str(tiny_dir / "model.safetensors"))
    assert set(weights) == set(tiny.weight_shapes(TinySpec()))
    for name, arr in weights.items():
        assert arr.dtype == np.float32, name
        if name.endswith(".bias"):
            assert np.abs(arr).max() > 0.01, name
        elif arr.ndim == 1:  # norm weights
            assert 0.5 < arr.mean() < 1.5 and arr.std() > 0.01, name


def test_weights_from_config_dict_match_spec(tmp_path):
    spec = TinySpec(tie_word_embeddings=True)
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS + tiny.ADDED_TOKENS)}
    for flat in (False, True):
        out = tmp_path / f"flat{flat}"
        tiny.write_random_weights(out, tiny.model_config(spec, ids, flat=flat), seed=3)
        got = load_file(str(out / "model.safetensors"))
        want = tiny.random_weights(spec, seed=3)
        assert "lm_head.weight" not in got and set(got) == set(want)
        np.testing.assert_array_equal(got["visual.merger.mlp.0.bias"],
                                      want["visual.merger.mlp.0.bias"])


def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="head_dim"):
        TinySpec(hidden_size=128)
    with pytest.raises(ValueError, match="mrope_section"):
        TinySpec(mrope_section=(2, 2, 2))


@pytest.mark.parametrize("flat,tied", [(False, False), (False, True), (True, False), (True, True)])
def test_transformers_loads_model_without_missing_keys(tmp_path, flat, tied):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    shards = 2 if flat and not tied else 1
    path = build_tiny_model(tmp_path / "m", flat=flat, tied=tied, seed=5, shards=shards)
    if shards == 2:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == 2
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(path), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    text_cfg = model.config.text_config
    assert text_cfg.rope_parameters["mrope_section"] == [2, 3, 3]
    assert text_cfg.vocab_size == 1024 and text_cfg.hidden_size == 64
    assert model.config.vision_config.fullatt_block_indexes == [1]
    assert model.config.vision_config.window_size == 56
    # The file values were loaded, not re-initialised.
    want = tiny.random_weights(TinySpec(tie_word_embeddings=tied), seed=5)
    lm = model.model.language_model
    np.testing.assert_array_equal(lm.layers[1].self_attn.k_proj.bias.detach().numpy(),
                                  want["model.layers.1.self_attn.k_proj.bias"])
    np.testing.assert_array_equal(model.model.visual.merger.ln_q.weight.detach().numpy(),
                                  want["visual.merger.ln_q.weight"])
    head = model.lm_head.weight.detach().numpy()
    key = "model.embed_tokens.weight" if tied else "lm_head.weight"
    np.testing.assert_array_equal(head, want[key])


def test_forward_on_processor_batch_gives_order_one_logits(tiny_dir):
    import torch
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vlm_jax.data.processor import Processor

    proc = Processor.from_pretrained(tiny_dir)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (84, 140, 3), dtype=np.uint8))
    texts = [proc.apply_chat_template([{"role": "user", "content": c}]) for c in (
        "What is 2 + 3?", [{"type": "image"}, {"type": "text", "text": "Count the circles."}])]
    batch = proc(texts, [[], [image]])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_dir), dtype=torch.float32)
    inputs = {k: torch.from_numpy(v.astype(np.int64) if v.dtype == np.int32 else v)
              for k, v in batch.items()}
    with torch.no_grad():
        logits = model(**inputs).logits.numpy()
    assert logits.shape == (*batch["input_ids"].shape, 1024)
    valid = logits[batch["attention_mask"].astype(bool)]
    assert np.isfinite(valid).all()
    assert 0.3 < valid.std() < 10


def test_rebuild_is_deterministic(tmp_path):
    a = build_tiny_model(tmp_path / "a", seed=1)
    b = build_tiny_model(tmp_path / "b", seed=1)
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    build_tiny_model(a, seed=2)  # overwrite in place
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()


def test_extra_texts_change_the_merges(tmp_path):
    plain = build_tiny_model(tmp_path / "p", weights=False)
    extra = build_tiny_model(tmp_path / "e", weights=False,
                             extra_texts=["photosynthesis chlorophyll"] * 200)
    assert not (plain / "model.safetensors").exists()
    from tokenizers import Tokenizer

    word = " chlorophyll"
    n_plain = len(Tokenizer.from_file(str(plain / "tokenizer.json")).encode(word).ids)
    n_extra = len(Tokenizer.from_file(str(extra / "tokenizer.json")).encode(word).ids)
    assert n_extra == 1 < n_plain


def test_cli_writes_flat_tied_directory(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, str(ROOT / "scripts/build_tiny_model.py"), "--out",
                          str(out), "--flat", "--tied", "--seed", "4"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert "text_config" not in cfg and cfg["tie_word_embeddings"] is True
    assert cfg["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/build_tiny_model.py"), "--out",
                          str(out), "--shards", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "shards" in bad.stderr

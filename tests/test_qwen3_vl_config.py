"""Qwen3-VL configs: hub-size presets (parameter counts from abstract shapes), config.json parsing
(legacy and v5 rope keys, transformers' defaults), and the Qwen3-VL recipes in `configs/`."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.config import load_config
from vlm_jax.models import abstract_model, qwen3_vl
from vlm_jax.models.qwen2_5_vl.config import ConfigParseError

ROOT = Path(__file__).resolve().parents[1]

# Parameter counts of the dense hub checkpoints (model card sizes: 2B, 4B, 8B, 32B).
SIZES = {"2B": 2.128e9, "4B": 4.438e9, "8B": 8.767e9, "32B": 33.357e9}


@pytest.mark.parametrize("size", sorted(SIZES))
def test_presets_build_with_hub_parameter_counts(size):
    raw = qwen3_vl.PRESETS[size]
    assert json.loads((ROOT / f"configs/hf/Qwen3-VL-{size}-Instruct/config.json").read_text()) == raw
    cfg = qwen3_vl.parse_config(raw)
    if size in ("2B", "8B"):  # the recipes' sizes; building the abstract 32B alone takes ~15 s
        _, state = abstract_model(qwen3_vl, cfg, jnp.bfloat16)  # shapes only
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
        assert abs(n - SIZES[size]) / SIZES[size] < 1e-3, n
    assert cfg.text.head_dim == 128 and cfg.text.mrope_section == (24, 20, 20)
    assert cfg.text.rope_theta == 5e6 and cfg.vision.patch_size == 16
    assert cfg.tie_word_embeddings == (size in ("2B", "4B"))


def test_parse_matches_transformers_reading():
    from transformers import Qwen3VLConfig

    raw = qwen3_vl.PRESETS["8B"]
    hf = Qwen3VLConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    ours = qwen3_vl.parse_config(raw)
    t, v = hf.text_config, hf.vision_config
    assert ours.text.rope_theta == t.rope_parameters["rope_theta"]
    assert list(ours.text.mrope_section) == t.rope_parameters["mrope_section"]
    assert (ours.text.head_dim, ours.text.num_key_value_heads) == (t.head_dim, t.num_key_value_heads)
    assert list(ours.vision.deepstack_visual_indexes) == list(v.deepstack_visual_indexes)
    assert ours.vision.rope_theta == v.rope_parameters["rope_theta"] == 10000.0
    # v5 `rope_parameters` and the class defaults (head_dim 128 when absent, kv heads = heads)
    text = {k: raw["text_config"][k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                               "num_hidden_layers", "num_attention_heads")}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}
    cfg = qwen3_vl.parse_config({"text_config": text, "vision_config": {}})
    assert (cfg.text.head_dim, cfg.text.num_key_value_heads, cfg.text.rope_theta) == (128, 32, 1e6)
    assert cfg.text.mrope_section == (8, 12, 12) and cfg.vision.depth == 27


def test_bad_configs_are_clear_errors():
    raw = json.loads(json.dumps(qwen3_vl.PRESETS["2B"]))
    raw["vision_config"]["deepstack_visual_indexes"] = [5, 24]
    with pytest.raises(ConfigParseError, match=r"deepstack_visual_indexes \[24\]"):
        qwen3_vl.parse_config(raw)
    with pytest.raises(ConfigParseError, match="vision_config"):
        qwen3_vl.parse_config({"text_config": raw["text_config"]})


def test_qwen3_recipes():
    paper = load_config(str(ROOT / "configs/qwen2_5_vl_7b_tpu.py"))
    staged = load_config(str(ROOT / "configs/qwen3_vl_8b_tpu.py"))
    assert staged.model.path.endswith("Qwen3-VL-8B-Instruct")
    # one recipe, both families, the 7B's decoding layout included (4 divides the 8B's 8 KV heads)
    assert paper.stages[0].grpo.rollout_tensor == 4
    assert staged.stages == paper.stages and staged.data == paper.data
    merged = load_config(str(ROOT / "configs/qwen3_vl_8b_tpu.py:merged"))
    (stage,) = merged.stages
    assert stage.steps == 930 and stage.objective == "grpo" and stage.grpo == staged.stages[0].grpo
    weights = {d.name: d.weight for d in stage.datasets}
    assert weights == {s.datasets[0].name: float(s.steps * s.batch_size) for s in staged.stages}
    chip = load_config(str(ROOT / "configs/qwen3_vl_2b_tpu_chip.py"))
    assert chip.model.path.endswith("Qwen3-VL-2B-Instruct") and chip.mesh.fsdp == -1
    for s, p in zip(chip.stages, staged.stages):
        assert (s.name, s.steps, s.trainable, s.reward) == (p.name, p.steps, p.trainable, p.reward)
        assert s.batch_size * s.grpo.num_samples // s.grpo.mini_batch_size == 4  # updates per rollout
        assert s.grpo.kl_coef == 1e-2 and s.optimizer.lr == 1e-6


@pytest.mark.parametrize("name", ["qwen3_vl_8b_tpu.py:", "qwen3_vl_8b_tpu.py:merged", "qwen3_vl_2b_tpu_chip.py:"])
def test_smoke_variants_keep_the_stages_at_cpu_sizes(name):
    recipe = load_config(str(ROOT / f"configs/{name}"))
    smoke = load_config(str(ROOT / f"configs/{name}{',' if not name.endswith(':') else ''}smoke"))
    assert smoke.model.path == "artifacts/tiny_qwen3" and smoke.model.dtype == "float32"
    assert [(s.name, s.objective, s.trainable, s.reward, s.remat) for s in smoke.stages] == \
        [(s.name, s.objective, s.trainable, s.reward, s.remat) for s in recipe.stages]
    assert all(s.steps == 2 and s.datasets[0].name.startswith("synthetic_") for s in smoke.stages)

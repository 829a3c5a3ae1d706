"""LoRA adapters (`vlm_jax.models.lora`): applied adapters equal merged weights in the teacher-forced
forward and in the sampler's decode path, a GRPO run that trains only adapters learns while the base
stays bitwise unchanged and the optimizer holds adapter moments only, and bad targets are named.

One tiny random Qwen2.5-VL reference checkpoint (vocab 256) and one prompt batch (text-only, one-image
and two-image rows) are shared; the parity test also runs on Qwen3-VL (DeepStack mergers).
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import build_reference, make_batch
from vlm_jax import models
from vlm_jax.config import OptimizerConfig
from vlm_jax.models import lora
from vlm_jax.rl import grpo, sampler
from vlm_jax.rl.policy import RolloutBatch, grpo_step, score_responses
from vlm_jax.train_state import init_state, make_optimizer

ROWS = [[(4, 4)], [], [(4, 4), (4, 4)], []]
G, T, EOS, GOOD = 8, 6, (254, 255), 64
ALL = ("language", "vision", "merger")
RANK = 4


def host_copy(tree):
    return jax.tree.map(lambda a: np.array(a, copy=True), tree)


def randomized(adapters, seed: int, scale: float = 0.05):
    """The adapters with random `b` too (a fresh adapter's b is zero, which hides a wrong product)."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def family_env(tmp_path_factory, family):
    path = tmp_path_factory.mktemp(f"lora_ref_{family}")
    small = dict(layers=2, vision_depth=2, deepstack=(0, 1)) if family == "qwen3_vl" else {}
    build_reference(path, seed=0, family=family, **small)
    model, params = models.from_pretrained(path)
    batch = make_batch(ROWS, padding="left", seed=1, patch=16 if family == "qwen3_vl" else 14)
    return SimpleNamespace(model=model, params=params, batch=batch, path=path,
                           prompt=sampler.prepare_prompts(model, batch))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return family_env(tmp_path_factory, "qwen2_5_vl")


@pytest.mark.parametrize("family", ["qwen2_5_vl", pytest.param("qwen3_vl", marks=pytest.mark.slow)])
def test_applied_adapters_equal_merged_weights(family, env, tmp_path_factory):
    e = env if family == "qwen2_5_vl" else family_env(tmp_path_factory, family)
    fresh = lora.init_adapters(e.params, ALL, RANK, jax.random.key(0))
    base_logits = np.asarray(models.forward(e.model, e.params, e.batch))
    # a fresh adapter (b = 0) leaves the model as it was
    np.testing.assert_allclose(
        np.asarray(models.forward(e.model, lora.LoraParams(e.params, fresh, 4.0), e.batch)), base_logits,
        atol=1e-5, rtol=0)
    p = lora.LoraParams(e.params, randomized(fresh, 1), 4.0)
    applied = np.asarray(models.forward(e.model, p, e.batch))
    assert np.abs(applied - base_logits).max() > 1e-2  # the adapters do change the model
    merged = np.asarray(models.forward(e.model, lora.merge(p), e.batch))
    np.testing.assert_allclose(applied, merged, atol=1e-4, rtol=0)
    # a model set to scan its layers runs them in the loop when adapters are attached (same logits)
    scanned = np.asarray(models.forward(e.model.with_options(scan_layers=True), p, e.batch))
    np.testing.assert_allclose(scanned, applied, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sampler_with_applied_adapters_equals_merged_weights(env):
    """Prefill runs through the modules (adapters applied), decode through the fused q/k/v and
    gate/up projections (adapters merged into those copies): same tokens as the merged model."""
    p = lora.LoraParams(env.params, randomized(lora.init_adapters(env.params, ALL, RANK, jax.random.key(0)), 1),
                        4.0)
    run = lambda q: sampler.generate(env.model, q, env.batch, max_new_tokens=T, temperature=1.0,  # noqa: E731
                                     num_samples=2, rng=jax.random.key(3), eos_token_ids=EOS)
    a, m = run(p), run(lora.merge(p))
    np.testing.assert_array_equal(a.tokens, m.tokens)
    np.testing.assert_allclose(a.logprobs, m.logprobs, atol=1e-4)


def test_targets_select_modules_per_alias_and_bad_ones_are_named(env):
    lang = lora.target_modules(env.params, ("language",))
    assert len(lang) == 2 * 7 and all(m.startswith("language_model.layers.") for m in lang)
    vis = lora.target_modules(env.params, ("vision", "merger"))
    assert "visual.blocks.0.attn.qkv" in vis and "visual.merger.mlp_0" in vis
    assert "visual.patch_embed" not in vis  # the convolutional patch embedding is never adapted
    assert lora.target_modules(env.params, (r"language_model\.layers\.1\.self_attn\.q_proj",)) == {
        "language_model.layers.1.self_attn.q_proj": (64, 64)}
    with pytest.raises(ValueError, match=r"lora.targets: 'lm_head' matches no adaptable linear layer"):
        lora.target_modules(env.params, ("lm_head",))
    with pytest.raises(ValueError, match="not a valid regular expression"):
        lora.target_modules(env.params, ("q_proj(",))


@pytest.mark.slow  # torch + peft models for both families: the suite's time budget
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_peft_adapters_give_the_same_logits_in_transformers(family, env, tmp_path_factory, tmp_path):
    """The adapters written in PEFT's format, loaded by `peft.PeftModel.from_pretrained` over the
    transformers base, give vlm_jax's logits (fp32) on text, one-image and two-image rows."""
    peft = pytest.importorskip("peft")
    from hf_reference import reference_logits
    from transformers import AutoModelForImageTextToText

    e = env if family == "qwen2_5_vl" else family_env(tmp_path_factory, family)
    adapters = randomized(lora.init_adapters(e.params, ALL, RANK, jax.random.key(0)), 2)
    p = lora.LoraParams(e.params, adapters, 2.0)
    out = models.save_peft_adapters(e.model, p, tmp_path / "adapter", base_model=str(e.path))
    base = AutoModelForImageTextToText.from_pretrained(e.path, dtype="float32").eval()
    tuned = peft.PeftModel.from_pretrained(base, out).eval()
    assert tuned.peft_config["default"].r == RANK and tuned.peft_config["default"].lora_alpha == 2.0 * RANK
    n_lora = sum(1 for n, _ in tuned.named_modules() if n.endswith(".lora_A.default"))
    assert n_lora == len(lora.target_modules(e.params, ALL))  # every adapter found its module
    ours = np.asarray(models.forward(e.model, p, e.batch))
    theirs = reference_logits(tuned.base_model.model, e.batch)
    mask = np.asarray(e.batch["attention_mask"], bool)
    np.testing.assert_allclose(ours[mask], theirs[mask], atol=1e-4, rtol=0)


def test_lora_configs_load_and_bad_lora_settings_are_named():
    from pathlib import Path

    from vlm_jax import config as config_lib

    root = Path(__file__).resolve().parents[1]
    demo = config_lib.load_config(str(root / "configs/demo_cpu_lora.py"))
    assert [st.lora.rank for st in demo.stages] == [8, 8, 8]
    assert demo.stages[0].lora.targets == ("language", "vision", "merger") and demo.stages[0].lora.scale == 2.0
    colab = config_lib.load_config(str(root / "configs/qwen2_5_vl_3b_lora_colab.py"))
    assert colab.model.dtype == "bfloat16" and all(st.lora.enabled for st in colab.stages)
    with pytest.raises(config_lib.ConfigError, match=r"stages\.1\.reset_optimizer.*LoRA"):
        config_lib.load_config(str(root / "configs/demo_cpu_lora.py"), ["stages.1.reset_optimizer=false"])
    with pytest.raises(config_lib.ConfigError, match=r"model\.dtype.*bfloat16"):  # a full-weights stage
        config_lib.load_config(str(root / "configs/qwen2_5_vl_3b_lora_colab.py"), ["stages.1.lora.rank=0"])
    with pytest.raises(config_lib.ConfigError, match=r"stages\.0\.lora\.rank"):
        config_lib.load_config(str(root / "configs/demo_cpu_lora.py"), ["stages.0.lora.rank=-1"])


# ------------------------------------------------------------------------------------------------
# GRPO with adapters only: learns, base bitwise unchanged, optimizer state = adapter moments
# ------------------------------------------------------------------------------------------------


def toy_reward(roll: sampler.Rollout) -> np.ndarray:
    real = np.arange(roll.tokens.shape[1])[None] < roll.lengths[:, None]
    return ((roll.tokens < GOOD) & real).sum(-1) / np.maximum(roll.lengths, 1)


def sample(env, params, key):
    return sampler.generate(env.model, params, env.batch, max_new_tokens=T, temperature=1.0, num_samples=G,
                            rng=key, eos_token_ids=EOS)


@pytest.fixture(scope="module")
def learned(env):
    """20 rollouts x 2 updates of adapters on every adaptable layer (AdamW lr 2e-2, rank 4)."""
    frozen = lora.Frozen(env.params, 2.0)
    before = host_copy(env.params)
    optimizer = make_optimizer(OptimizerConfig(lr=2e-2, weight_decay=0.0), 100, ("vision", "merger", "language_model"))
    state = init_state(lora.init_adapters(env.params, ALL, RANK, jax.random.key(0)), optimizer)
    loss_cfg = grpo.GRPOLossConfig(kl_coef=1e-3)
    policy = lambda s: lora.with_adapters(frozen, s.params)  # noqa: E731
    start = float(toy_reward(sample(env, policy(state), jax.random.key(12345))).mean())
    rng = jax.random.key(0)
    for it in range(20):
        roll = sample(env, policy(state), jax.random.fold_in(rng, it))
        adv = grpo.compute_advantages(jnp.asarray(toy_reward(roll), jnp.float32), G)
        mask = grpo.response_mask(jnp.asarray(roll.lengths), T).astype(jnp.float32)
        tokens = jnp.asarray(roll.tokens)
        # the KL reference is the base with the adapters off: the frozen parameters themselves
        ref = score_responses(env.model.graphdef, frozen.params, env.prompt, tokens, group_size=G)
        batch = RolloutBatch(env.prompt, tokens, mask, jnp.asarray(roll.logprobs), ref, adv)
        state, metrics = grpo_step(state, batch, jax.random.fold_in(rng, 1000 + it), graphdef=env.model.graphdef,
                                   optimizer=optimizer, group_size=G, loss_cfg=loss_cfg, mu=2,
                                   minibatch=G * len(ROWS) // 2, frozen=frozen)
    end = float(toy_reward(sample(env, policy(state), jax.random.key(12345))).mean())
    return SimpleNamespace(start=start, end=end, state=state, before=before, frozen=frozen)


@pytest.mark.slow
def test_lora_grpo_raises_reward_on_toy_task(learned):
    assert learned.start < 0.4, learned.start
    assert learned.end > 0.7, (learned.start, learned.end)
    assert int(learned.state.step) == 80 and int(learned.state.skipped) == 0  # 20 rollouts x mu 2 x 2 mini-batches


@pytest.mark.slow
def test_lora_grpo_leaves_the_base_bitwise_unchanged(env, learned):
    after = jax.tree.leaves(env.params)
    for a, b in zip(jax.tree.leaves(learned.before), after):
        np.testing.assert_array_equal(a, np.asarray(b))
    # ... while every adapter b moved off zero (vision and merger included)
    for name, _, b in lora.iter_adapters(learned.state.params):
        assert np.abs(np.asarray(b)).max() > 0, name


@pytest.mark.slow
def test_lora_optimizer_state_holds_only_adapter_moments(env, learned):
    adapters = learned.state.params
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))
    # per adapted layer (in + out) * rank: 2 decoder layers x 7 + 2 vision blocks x 5 + merger 2
    modules = lora.target_modules(env.params, ALL)
    assert n == sum((i + o) * RANK for i, o in modules.values())
    float_bytes = sum(x.nbytes for x in jax.tree.leaves(learned.state.opt_state)
                      if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim > 0)
    assert float_bytes == 2 * 4 * n  # AdamW mu and nu, fp32, adapters only
    # full AdamW would hold 2 x the parameters' bytes (1.5 MB here); rank 4 of 64-wide layers: 111 kB
    assert float_bytes < 2 * lora.num_bytes(env.params) / 10


# ------------------------------------------------------------------------------------------------
# the curriculum with LoRA stages: GRPO (all towers) -> SFT (fresh LoRA on the merged weights)
# ------------------------------------------------------------------------------------------------


def lora_config(assets):
    from test_curriculum import two_stage_config

    cfg = two_stage_config(assets, **{
        "stages.0.lora.rank": 4, "stages.0.lora.targets": '("language","vision","merger")',
        "stages.0.optimizer.lr": 3e-3, "stages.1.lora.rank": 4, "stages.1.optimizer.lr": 3e-3,
    })
    return cfg


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from test_curriculum import make_assets
    from vlm_jax import curriculum

    assets = make_assets(tmp_path_factory, "qwen2_5_vl")
    wd = tmp_path_factory.mktemp("lora_full")
    cfg = lora_config(assets)
    assert curriculum.run(cfg, wd) == "finished"
    return SimpleNamespace(assets=assets, wd=wd, cfg=cfg)


def final(workdir):
    from vlm_jax.workdir import restore_for_export

    return restore_for_export(workdir)[1]


@pytest.mark.slow
def test_lora_curriculum_trains_adapters_and_merges_them_at_the_boundary(lora_run):
    import json

    from vlm_jax.checkpoint import Checkpointer

    rows = [json.loads(line) for line in (lora_run.wd / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["stage"] for r in train] == ["perception"] * 3 + ["textual_reasoning"] * 3
    assert all(r["skipped_nonfinite"] == 0 for r in train)
    p = final(lora_run.wd)
    assert isinstance(p, lora.LoraParams) and p.scale == 16.0 / 4
    assert set(p.adapters) == {"language_model"}  # stage 1 adapts the language model only
    # stage 1's base (saved for a resume) is the loaded model with stage 0's adapters merged in: it
    # differs from the loaded model in every adapted kernel of stage 0 and nowhere else
    _, loaded = models.from_pretrained(lora_run.assets / "model")
    assert Checkpointer(lora_run.wd / "lora_base").all_steps() == [1]
    adapted = set(lora.target_modules(loaded, ("language", "vision", "merger")))
    for path, a in jax.tree_util.tree_flatten_with_path(loaded)[0]:
        keys = lora._keys(path)
        b = dict(jax.tree_util.tree_flatten_with_path(p.base)[0])[path]
        same = np.array_equal(np.asarray(a), np.asarray(b))
        assert same == (keys[-1] != "kernel" or ".".join(keys[:-1]) not in adapted), keys


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [2, 3, 5])  # mid-GRPO-LoRA, stage boundary, mid-SFT-LoRA
def test_lora_curriculum_resume_is_bitwise(lora_run, tmp_path, stop_after):
    from test_curriculum import assert_bitwise
    from vlm_jax import curriculum

    assert curriculum.run(lora_run.cfg, tmp_path, stop_after=stop_after) == "preempted"
    assert curriculum.run(lora_run.cfg, tmp_path) == "finished"
    a, b = final(lora_run.wd), final(tmp_path)
    assert_bitwise(a.adapters, b.adapters)
    assert_bitwise(a.base, b.base)


@pytest.mark.slow
def test_lora_workdir_exports_merged_weights_and_peft_adapters(lora_run, tmp_path):
    """export: the merged directory and PEFT adapters over `adapter_base` give the same logits in
    transformers (and vlm_jax's)."""
    import peft
    from transformers import AutoModelForImageTextToText
    from vlm_jax import export

    assert export.main(["--workdir", str(lora_run.wd), "--out", str(tmp_path / "hf")]) == 0
    for f in ("hf/config.json", "hf/adapter/adapter_config.json", "hf/adapter/adapter_model.safetensors",
              "hf/adapter_base/config.json"):
        assert (tmp_path / f).exists(), f
    import torch
    from PIL import Image
    from vlm_jax.workdir import restore_for_export
    from vlm_jax.data.processor import Processor

    model, params, _ = restore_for_export(lora_run.wd)
    proc = Processor.from_pretrained(tmp_path / "hf")
    img = Image.fromarray((np.arange(56 * 84 * 3) % 251).astype(np.uint8).reshape(56, 84, 3))
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red circles?"}]}])
    batch = proc([text, "hello there"], [[img], []], padding_side="left")
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(models.forward(model, params, batch))
    tb = {k: torch.as_tensor(v).long() if v.dtype.kind == "i" else torch.as_tensor(v) for k, v in batch.items()}
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    base = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf/adapter_base", dtype=torch.float32).eval()
    tuned = peft.PeftModel.from_pretrained(base, tmp_path / "hf/adapter").eval()
    m = batch["attention_mask"].astype(bool)
    with torch.no_grad():
        for hf in (merged, tuned):
            np.testing.assert_allclose(hf(**tb).logits.numpy()[m], ours[m], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------
# LoRA stages with a bucket workdir (storage server on loopback: the `gcs` fixture)
# ------------------------------------------------------------------------------------------------


def test_lora_base_saved_in_a_bucket_is_the_base_a_resume_uses(gcs, env):
    """A LoRA stage's frozen base (the weights at its start, saved in `lora_base/` for a resume)
    round-trips through a bucket bitwise; a stage without a saved base uses the loaded model."""
    from pathlib import Path

    from test_curriculum import assert_bitwise
    from vlm_jax import config as config_lib
    from vlm_jax.checkpoint import Checkpointer
    from vlm_jax.startup import dtype_of
    from vlm_jax.workdir import lora_base

    cfg = config_lib.load_config(str(Path(__file__).resolve().parents[1] / "configs/demo_cpu_lora.py"))
    dtype = dtype_of(cfg.stages[1].lora.base_dtype or cfg.model.dtype)
    changed = lora.cast(randomized(env.params, seed=3), dtype)
    with Checkpointer(f"{gcs}/lora/lora_base", keep=2, async_save=False) as bases:
        bases.save(1, changed, {"stage_index": 1}, force=True)
    with Checkpointer(f"{gcs}/lora/lora_base", keep=2, async_save=False) as bases:
        assert bases.all_steps() == [1]
        assert_bitwise(lora_base(cfg, bases, 1, env.params).params, changed)
        assert_bitwise(lora_base(cfg, bases, 0, env.params).params, lora.cast(env.params, dtype))


@pytest.mark.slow  # two LoRA runs (~1 min on 2 cores) beside the module's reference run
def test_lora_curriculum_in_a_bucket_resumes_from_its_base_bitwise(gcs, lora_run, tmp_path, monkeypatch):
    """A LoRA curriculum with a bucket workdir stopped in the second LoRA stage (its base, the
    first stage's merged weights, saved to `lora_base/` in the bucket) resumes from the bucket and
    ends bitwise equal to the local uninterrupted run; export to the bucket writes the merged model,
    the PEFT adapters and their base."""
    from test_curriculum import assert_bitwise
    from vlm_jax import curriculum, export, paths
    from vlm_jax.checkpoint import Checkpointer

    monkeypatch.chdir(tmp_path)
    wd = f"{gcs}/lora_run"
    assert curriculum.run(lora_run.cfg, wd, stop_after=4) == "preempted"
    assert Checkpointer(f"{wd}/lora_base").all_steps() == [1]
    assert curriculum.run(lora_run.cfg, wd) == "finished"
    a, b = final(lora_run.wd), final(wd)
    assert_bitwise(a.adapters, b.adapters)
    assert_bitwise(a.base, b.base)
    assert export.main(["--workdir", wd, "--out", f"{gcs}/lora_hf"]) == 0
    for f in ("config.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
              "adapter_base/config.json"):
        assert paths.resolve(f"{gcs}/lora_hf/{f}").exists(), f
    assert not (tmp_path / "gs:").exists()

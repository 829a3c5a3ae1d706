"""The memory planner compiles the trainer's programs for a TPU topology (deviceless, libtpu)."""

import json
import math

import pytest

from vlm_jax import config as config_lib

pytest.importorskip("libtpu", reason="libtpu is not installed: `pip install libtpu` (requirements-test.txt)")

from vlm_jax import plan  # noqa: E402

GiB = 1 << 30


def tiny_hf_config(tmp_path):
    raw = json.loads(open("configs/hf/Qwen2.5-VL-3B-Instruct/config.json").read())
    raw.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False,
               rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
               bos_token_id=1, eos_token_id=2, vision_start_token_id=3, vision_end_token_id=4,
               vision_token_id=5, image_token_id=6, video_token_id=7)
    raw["vision_config"].update(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                out_hidden_size=64, fullatt_block_indexes=[1], window_size=56)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return raw


def tpu_bytes(shape, itemsize=4):
    """Bytes of one fp32 array in TPU memory: 1-D padded to 128 elements, 2-D to (8, 128) tiles
    in whichever dim order is smaller (the layout the compiler picks)."""
    up = lambda n, m: -(-n // m) * m  # noqa: E731
    if len(shape) == 1:
        return up(shape[0], 128) * itemsize
    a, b = shape
    return min(up(a, 8) * up(b, 128), up(b, 8) * up(a, 128)) * itemsize


def hand_param_shards(raw, chips):
    """Per-chip shapes of every parameter: dims named embed / vision_embed / merger_in split."""
    D, I, V, n_layers = raw["hidden_size"], raw["intermediate_size"], raw["vocab_size"], raw["num_hidden_layers"]
    H, K = raw["num_attention_heads"], raw["num_key_value_heads"]
    E = D // H
    v = raw["vision_config"]
    Dv, Iv = v["hidden_size"], v["intermediate_size"]
    s = lambda n: n // chips  # noqa: E731  (the split dim; the tests' sizes divide)
    layer = [(s(D), H * E), (H * E,), (s(D), K * E), (K * E,), (s(D), K * E), (K * E,), (H * E, s(D)),
             (s(D), I), (s(D), I), (I, s(D)), (D,), (D,)]
    block = [(s(Dv), 3 * Dv), (3 * Dv,), (Dv, s(Dv)), (s(Dv),),
             (s(Dv), Iv), (Iv,), (s(Dv), Iv), (Iv,), (Iv, s(Dv)), (s(Dv),), (Dv,), (Dv,)]
    merger = [(Dv,), (s(4 * Dv), 4 * Dv), (4 * Dv,), (4 * Dv, s(D)), (s(D),)]
    return ([(V, s(D))] + layer * n_layers + [(D,), (s(D), V)]
            + [(3 * 2 * 14 * 14, s(Dv))] + block * v["depth"] + merger)


def stages_config(tmp_path, sft_batch=8):
    return config_lib.Config(
        model=config_lib.ModelConfig(path=str(tmp_path), dtype="float32"),
        mesh=config_lib.MeshConfig(data=1, fsdp=-1, tensor=1),
        data=config_lib.DataConfig(max_prompt_len=64, length_buckets=(32, 64), max_pixels_per_image=12544),
        stages=(
            config_lib.StageConfig(name="text", capability="textual_reasoning", objective="sft",
                                   datasets=(config_lib.DatasetSpec(name="x"),), steps=1,
                                   batch_size=sft_batch),
            config_lib.StageConfig(name="rl", capability="textual_reasoning", objective="grpo",
                                   datasets=(config_lib.DatasetSpec(name="x"),), steps=1, batch_size=4,
                                   grpo=config_lib.GRPOConfig(num_samples=2, max_new_tokens=32,
                                                              mini_batch_size=4)),
        ),
        compilation_cache_dir="",
    )


def test_planner_counts_parameters_and_optimizer_bytes_exactly(tmp_path):
    raw = tiny_hf_config(tmp_path)
    rows = plan.plan(stages_config(tmp_path), "v5e:2x2", programs=("init", "sft", "grpo", "score"),
                     log=lambda *_: None)
    by = {(r.stage, r.program): r for r in rows}
    assert set(by) == {("text", "init"), ("text", "sft"), ("rl", "init"), ("rl", "grpo"), ("rl", "score")}
    p = sum(tpu_bytes(shape) for shape in hand_param_shards(raw, chips=4))
    init = by[("text", "init")]
    assert init.error is None and init.fits
    assert init.detail["argument"] == p  # the loaded parameters, sharded
    # a parameter copy plus AdamW's two moments per parameter, sharded like it, and the scalars
    # (step, skipped, per-module Adam and schedule counts, grad norm: 9, each at least one
    # 128-word tile; the compiler reports 11 tiles' worth here)
    assert init.detail["scalars"] == 2 + 3 + 3 + 1
    assert 3 * p + 512 * 9 <= init.detail["output"] <= 3 * p + 512 * 12
    assert init.hbm_bytes_per_chip == 16 * GiB
    for key in (("text", "sft"), ("rl", "grpo"), ("rl", "score")):
        r = by[key]
        assert r.error is None and r.fits and r.flops and r.flops > 0, r
        assert r.bytes_per_chip >= r.detail["program"] >= r.detail["argument"] > 0
    # the update's arguments hold the state: parameters and both moments
    assert by[("text", "sft")].detail["argument"] >= 3 * p
    json.dumps([r.to_json() for r in rows])  # the --json records serialise


def test_planner_reports_an_over_budget_program_as_not_fitting(tmp_path):
    tiny_hf_config(tmp_path)
    # fp32 logits of 262,144 x 64 tokens x 512 vocab per step: far beyond a v5e chip's 16 GiB
    cfg = stages_config(tmp_path, sft_batch=262144)
    rows = plan.plan(cfg, "v5e:2x2", programs=("init", "sft"), stages={"text"}, log=lambda *_: None)
    sft = next(r for r in rows if r.program == "sft")
    assert not sft.fits
    assert sft.bytes_per_chip is None or sft.bytes_per_chip > sft.hbm_bytes_per_chip
    assert sft.error is None or "RESOURCE_EXHAUSTED" in sft.error or "HbmOom" in sft.error


def test_micro_batch_suggestion_from_two_compiles_by_hand():
    """Bytes linear in the micro-batch (1000 + 100 per row, HBM 5000): with 64 rows on 4 shards the
    accepted sizes are the divisors of 64 that are multiples of 4; 64 needs 7400 and does not fit,
    32 needs 4200: the line through them suggests 32. Sizes that do not compile (no byte count) are
    skipped when fitting the line, and a suggestion that does not compile steps down."""
    calls = []

    def compile_at(m, broken=()):
        calls.append(m)
        b = None if m in broken else 1000 + 100 * m
        return plan.Row("s", "grpo", b, 5000, b is not None and b <= 5000, 0.0, None, None if b else "OOM")

    assert plan.micro_batch_options(64, 4) == [4, 8, 16, 32, 64]
    out = plan.suggest_micro_batch(compile_at, 64, 64, 4, 5000)
    assert out["suggested_micro_batch"] == 32 and out["bytes_at_suggestion"] == 4200
    assert out["bytes_per_row"] == 100 and out["fixed_bytes"] == 1000 and calls == [64, 32]
    calls.clear()
    out = plan.suggest_micro_batch(lambda m: compile_at(m, broken=(64, 32)), 64, 64, 4, 5000)
    assert calls == [64, 32, 16, 8] and out["suggested_micro_batch"] == 16 and out["bytes_at_suggestion"] == 2600


@pytest.mark.slow  # ~30-50 s of TPU compiles
def test_planner_image_stage_has_a_vision_row_with_per_row_inputs_split_over_the_chips(tmp_path):
    """A stage with images: its programs get the per-row vision inputs (split over the batch like the
    tokens, each row `num_patches_for` patches) and a `vision` row (the tower's share of an update:
    one micro-batch's rows encoded, forward and backward when the stage trains the vision tower)."""
    from vlm_jax import startup

    tiny_hf_config(tmp_path)
    base = stages_config(tmp_path)
    img = config_lib.StageConfig(name="img", capability="perception", objective="sft",
                                 datasets=(config_lib.DatasetSpec(name="x"),), steps=1, batch_size=8,
                                 micro_batch_size=4)
    cfg = config_lib.Config(model=base.model, mesh=base.mesh, data=base.data, stages=(img,),
                            compilation_cache_dir="")
    P = startup.num_patches_for(cfg, 14)
    assert P == 64  # 12,544 pixels per row in 14-pixel patches
    rows = plan.plan(cfg, "v5e:2x2", programs=("sft", "vision"), log=lambda *_: None)
    by = {r.program: r for r in rows}
    assert set(by) == {"sft", "vision"}
    v = by["vision"]
    assert v.error is None and v.fits and v.flops > 0, v
    assert v.detail["rows"] == 4 and v.detail["patches_per_row"] == 64 and v.detail["train"]
    # the vision inputs are split over the 4 chips: one row's patches on each, not all four rows'
    one_row_patches = 64 * 3 * 2 * 14 * 14 * 4
    assert one_row_patches <= v.detail["input_bytes"] < 2 * one_row_patches


@pytest.mark.slow
def test_planner_lora_stage_state_is_adapters_and_moments(tmp_path):
    """A LoRA stage: the optimizer init takes and returns only adapters (+ AdamW moments), a small
    fraction of the parameters; the GRPO update takes the frozen base as an argument, once."""
    import dataclasses

    raw = tiny_hf_config(tmp_path)
    cfg = stages_config(tmp_path)
    rl = dataclasses.replace(cfg.stages[1], lora=config_lib.LoraConfig(rank=4, targets=("language",)))
    cfg = dataclasses.replace(cfg, stages=(cfg.stages[0], rl))
    rows = plan.plan(cfg, "v5e:2x2", programs=("init", "grpo"), stages={"rl"}, log=lambda *_: None)
    by = {r.program: r for r in rows}
    p = sum(tpu_bytes(shape) for shape in hand_param_shards(raw, chips=4))
    D, I = raw["hidden_size"], raw["intermediate_size"]
    H, K = raw["num_attention_heads"], raw["num_key_value_heads"]
    E = D // H
    # adapters (replicated): a [in, 4] and b [4, out] of q, k, v, o, gate, up, down per layer
    shapes = [(D, H * E), (D, K * E), (D, K * E), (H * E, D), (D, I), (D, I), (I, D)] * raw["num_hidden_layers"]
    raw_adapters = sum((i + o) * 4 * 4 for i, o in shapes)  # unpadded fp32 bytes (the layout pads them)
    init = by["init"]
    assert init.error is None and init.fits
    adapters = init.detail["argument"]
    assert raw_adapters <= adapters <= 4 * raw_adapters
    assert 3 * adapters <= init.detail["output"] <= 3 * adapters + 512 * 12  # copy + 2 moments + scalars
    # the base stays resident beside it (counted unpadded, as the planner counts resident trees)
    assert init.detail["resident_extra"] == sum(4 * math.prod(s) for s in hand_param_shards(raw, chips=4))
    grpo = by["grpo"]
    assert grpo.error is None and grpo.fits
    # the base once (the unused vision tower of this text stage pruned), no reference copy
    assert 3 * adapters < grpo.detail["argument"] < 1.5 * p


def test_planner_generate_row_in_the_decoding_layout(tmp_path):
    """`grpo.rollout_tensor`: the generate row compiles the sampler on the decoding mesh (data 2,
    tensor 2 on 4 chips) with the resharded policy as its argument and the whole training state
    (parameters + moments, training layout) resident beside it; the FSDP row takes the training
    parameters and counts only the moments (and reference) beside them. Both count the decode step's
    collectives. A size that does not divide the KV heads is refused before compiling."""
    import dataclasses

    raw = tiny_hf_config(tmp_path)
    cfg = stages_config(tmp_path)

    def with_tensor(n):
        rl = cfg.stages[1]
        return dataclasses.replace(cfg, stages=(cfg.stages[0], dataclasses.replace(
            rl, grpo=dataclasses.replace(rl.grpo, rollout_tensor=n))))

    rows = {n: plan.plan(with_tensor(n), "v5e:2x2", programs=("generate",), stages={"rl"},
                         log=lambda *_: None)[0] for n in (0, 2)}
    fsdp, tp = rows[0], rows[2]
    for r in rows.values():
        assert r.error is None and r.fits, r
        assert r.detail["decode_step_collective_bytes"] > 0 and r.detail["decode_step_collectives"]
    assert fsdp.detail["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert tp.detail["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
    p = sum(4 * math.prod(s) for s in hand_param_shards(raw, chips=4))  # training layout, unpadded
    assert fsdp.detail["sampler_param_bytes"] == p
    assert 1.5 * p < tp.detail["sampler_param_bytes"] <= 4 * p  # halves (or whole) instead of quarters
    kl = cfg.stages[1].grpo.kl_coef > 0
    assert tp.detail["resident_extra"] >= 3 * p + kl * p  # parameters + 2 moments (+ reference)
    assert fsdp.detail["resident_extra"] < tp.detail["resident_extra"] - p
    with pytest.raises(config_lib.ConfigError, match=r"stages.1.grpo.rollout_tensor: 4 does not divide "
                                                      r"the model's 2 KV heads"):
        plan.plan(with_tensor(4), "v5e:2x2", programs=("generate",), stages={"rl"}, log=lambda *_: None)

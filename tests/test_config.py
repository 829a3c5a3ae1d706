"""Tests for vlm_jax.config: schema defaults, file loading, dotted overrides, validation, round trip."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import pytest

from vlm_jax.config import (LOGICAL_AXIS_RULES, Config, ConfigError, DataConfig, DatasetSpec,
                            GRPOConfig, MeshConfig, OptimizerConfig, StageConfig, config_from_dict,
                            config_to_dict, load_config, parse_flags)

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo_cpu.py")


def _stage(name: str = "s", **kw) -> StageConfig:
    base = dict(name=name, capability="perception", objective="grpo",
                datasets=(DatasetSpec(name="synthetic_perception"),), steps=2, batch_size=4)
    return StageConfig(**{**base, **kw})


@pytest.fixture()
def cfg_file(tmp_path: pathlib.Path) -> str:
    """A minimal two-stage config file written by the test."""
    path = tmp_path / "two_stage.py"
    path.write_text(
        "from vlm_jax.config import Config, DatasetSpec, StageConfig\n"
        "def get_config():\n"
        "    d = (DatasetSpec(name='synthetic_perception'),)\n"
        "    return Config(stages=(\n"
        "        StageConfig(name='a', capability='perception', objective='grpo', datasets=d,"
        " steps=3, batch_size=4),\n"
        "        StageConfig(name='b', capability='visual_reasoning', objective='sft', datasets=d,"
        " steps=5, batch_size=4)))\n")
    return str(path)


def _error(fn, *args) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    return info.value


# ------------------------------------------------------------------------------------- defaults
def test_defaults_match_the_schema(cfg_file):
    cfg = load_config(cfg_file)
    assert cfg.seed == 0 and cfg.compilation_cache_dir == "default" and cfg.data.data_dir == ""
    assert cfg.mesh == MeshConfig(data=-1, fsdp=1, tensor=1)
    assert cfg.data.length_buckets == (64, 128, 256, 512) and cfg.data.strict is False
    stage = cfg.stages[0]
    assert stage.reward == (("auto", 0.9), ("format", 0.1))
    assert stage.trainable == ("vision", "merger", "language_model")
    assert stage.grpo.num_samples == 5 and stage.grpo.clip_c == 3.0 and stage.grpo.kl_estimator == "k3"
    assert stage.optimizer.lr == 1e-6 and stage.optimizer.lr_multipliers == ()
    rules = dict(cfg.logical_axis_rules)
    assert cfg.logical_axis_rules == LOGICAL_AXIS_RULES
    assert rules["batch"] == ("data", "fsdp") and rules["vocab"] == "tensor" and rules["head_dim"] is None
    assert len(rules) == 15
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


def test_python_values_are_normalised():
    stage = _stage(datasets=[{"name": "x.jsonl", "weight": 2}], optimizer=OptimizerConfig(lr=1))
    assert stage.datasets == (DatasetSpec(name="x.jsonl", split="train", weight=2.0),)
    assert stage.datasets[0].is_file and not DatasetSpec(name="synthetic_perception").is_file
    assert isinstance(stage.optimizer.lr, float)
    with pytest.raises(ConfigError, match="weight: must be > 0"):
        DatasetSpec(name="x", weight=0)
    with pytest.raises(ConfigError, match=r"batch_size: expected int, got '4'"):
        _stage(batch_size="4")
    with pytest.raises(ConfigError, match="expected bool"):
        DataConfig(strict=1)


@pytest.mark.parametrize("name", ["demo_cpu", "demo_cpu.py:merged", "qwen2_5_vl_7b_tpu"])
def test_shipped_configs_load(name):
    cfg = load_config(str(ROOT / "configs" / (name if ".py" in name else f"{name}.py")))
    assert isinstance(cfg, Config) and len(cfg.stages) >= 1


def test_demo_stages_and_merged_baseline_share_data_and_steps():
    demo = load_config(DEMO)
    assert [s.name for s in demo.stages] == ["perception", "textual_reasoning", "visual_reasoning"]
    assert [s.objective for s in demo.stages] == ["grpo", "sft", "sft"]
    assert demo.stages[1].trainable == ("language_model",)
    assert "vision" in demo.stages[0].trainable and "vision" in demo.stages[2].trainable
    assert demo.model.path == "artifacts/tiny_base"
    grid_sets = [("grid_perception", "validation"), ("grid_textual_reasoning", "validation"),
                 ("grid_visual_reasoning", "validation")]
    for k, stage in enumerate(demo.stages):  # every capability at the end of every stage
        assert [(d.name, d.split) for d in stage.eval.datasets] == grid_sets
        assert stage.eval.at_start == (k == 0) and stage.eval.max_examples == 512
    merged = load_config(str(ROOT / "configs" / "demo_cpu.py:merged"))
    (stage,) = merged.stages
    assert stage.capability == "mixed"
    assert stage.steps == sum(s.steps for s in demo.stages)
    weights = {d.name: d.weight for d in stage.datasets}
    assert weights == {s.datasets[0].name: float(s.steps * s.batch_size) for s in demo.stages}
    assert stage.objective == "grpo" and stage.optimizer == demo.stages[0].optimizer  # the GRPO stage's settings


def test_merged_baseline_of_a_run_without_grpo_is_one_cross_entropy_stage():
    from vlm_jax import experiment

    staged = experiment.staged(perception="answer_sft")
    assert {s.objective for s in staged.stages} == {"sft"}
    (stage,) = experiment.merged(form="sft").stages
    assert (stage.objective, stage.steps, stage.optimizer) == ("sft", sum(s.steps for s in staged.stages),
                                                               staged.stages[0].optimizer)
    assert stage.sft == staged.stages[0].sft and set(stage.trainable) == {"vision", "merger", "language_model"}
    with pytest.raises(ValueError, match="form must be"):
        experiment.merged(form="project")


def test_paper_recipe_values():
    cfg = load_config(str(ROOT / "configs" / "qwen2_5_vl_7b_tpu.py"))
    assert [s.steps for s in cfg.stages] == [90, 375, 465]
    assert cfg.stages[1].trainable == ("language_model",)
    g = cfg.stages[0].grpo
    assert (g.num_samples, g.kl_coef, g.clip_low, g.clip_high, g.clip_c) == (5, 1e-2, 0.2, 0.3, 3.0)
    assert cfg.stages[0].batch_size * g.num_samples // g.mini_batch_size == 4  # updates per rollout
    assert (cfg.data.min_pixels_per_image, cfg.data.max_pixels_per_image) == (262_144, 4_194_304)


# ------------------------------------------------------------------------------------ overrides
def test_overrides_of_each_kind(cfg_file):
    cfg = load_config(cfg_file, [
        "--config.seed=7",                                  # int
        "--config.stages.0.optimizer.lr=3e-4",              # float, nested index
        "config.data.strict=true",                          # bool, "config." prefix
        "checkpoint.async_save=0",                          # bool as 0, bare key
        "--config.stages.0.grpo.clip_c=none",               # Optional -> None
        "--config.data.length_buckets=(32, 64)",            # tuple of scalars
        "--config.stages.1.trainable=language_model",       # one-item tuple
        "--config.model.compute_dtype=bfloat16",            # Literal
        "--config.stages.1.grpo.kl_coef=0",                 # int text into a float field
        "--config.stages.0.reward=math=0.8,format=0.2",     # reward, NAME=VALUE form
        '--config.stages.1.reward={"tools/r.py:score": 1}',  # reward, JSON form, user reward
        "--config.model.path=/tmp/a=b",                     # value containing '='
    ])
    assert cfg.seed == 7
    assert cfg.stages[0].optimizer.lr == 3e-4 and cfg.stages[1].optimizer.lr == 1e-6
    assert cfg.data.strict is True and cfg.checkpoint.async_save is False
    assert cfg.stages[0].grpo.clip_c is None and cfg.stages[1].grpo.clip_c == 3.0
    assert cfg.data.length_buckets == (32, 64)
    assert cfg.stages[1].trainable == ("language_model",)
    assert cfg.model.compute_dtype == "bfloat16"
    assert cfg.stages[1].grpo.kl_coef == 0.0 and isinstance(cfg.stages[1].grpo.kl_coef, float)
    assert cfg.stages[0].reward == (("math", 0.8), ("format", 0.2))
    assert cfg.stages[1].reward == (("tools/r.py:score", 1.0),)
    assert cfg.model.path == "/tmp/a=b"


def test_json_overrides_for_whole_values(cfg_file):
    cfg = load_config(cfg_file, [
        '--config.stages.1.datasets=[{"name": "x.jsonl", "weight": 3}, {"name": "y", "split": "val"}]',
        "--config.data.length_buckets=[8, 16]",
        '--config.logical_axis_rules=[["batch", ["data"]], ["vocab", null]]',
        "--config.stages.0.optimizer.lr_multipliers=vision=0.1,merger=0.5",
        "--config.stages.0.reward.1.1=0.25",  # index into a pair
    ])
    assert cfg.stages[1].datasets == (DatasetSpec(name="x.jsonl", weight=3.0), DatasetSpec(name="y", split="val"))
    assert cfg.data.length_buckets == (8, 16)
    assert cfg.logical_axis_rules == (("batch", ("data",)), ("vocab", None))
    assert cfg.stages[0].optimizer.lr_multipliers == (("vision", 0.1), ("merger", 0.5))
    assert cfg.stages[0].reward == (("auto", 0.9), ("format", 0.25))


def test_overrides_apply_together_before_validation(cfg_file):
    # batch 4 x default group 5 = 20 completions, not divisible by 6; with a group of 3, 12 is.
    err = _error(load_config, cfg_file, ["stages.0.grpo.mini_batch_size=6"])
    assert err.key == "stages.0.grpo.mini_batch_size" and "= 20 is not divisible by 6" in str(err)
    cfg = load_config(cfg_file, ["stages.0.grpo.mini_batch_size=6", "stages.0.grpo.num_samples=3"])
    assert (cfg.stages[0].grpo.num_samples, cfg.stages[0].grpo.mini_batch_size) == (3, 6)


def test_unknown_keys_name_the_full_key_and_valid_keys(cfg_file):
    err = _error(load_config, cfg_file, ["--config.sead=1"])
    assert err.key == "sead" and "valid keys of Config:" in str(err) and "seed" in str(err)
    err = _error(load_config, cfg_file, ["--config.stages.1.grpo.kl_coeff=0"])
    assert err.key == "stages.1.grpo.kl_coeff"
    assert "kl_coef" in str(err) and "kl_estimator" in str(err) and "valid keys of GRPOConfig" in str(err)
    err = _error(load_config, cfg_file, ["--config.seed.x=1"])
    assert err.key == "seed.x" and "no sub-key 'x'" in str(err)
    err = _error(config_from_dict, {**config_to_dict(load_config(cfg_file)), "extra": 1})
    assert err.key == "extra"


def test_index_out_of_range_names_key_and_length(cfg_file):
    err = _error(load_config, cfg_file, ["--config.stages.2.steps=10"])
    assert err.key == "stages.2.steps" and "out of range" in str(err) and "length 2" in str(err)
    err = _error(load_config, cfg_file, ["--config.stages.first.steps=10"])
    assert "expected an index" in str(err)


@pytest.mark.parametrize("override, key, needle", [
    ("stages.0.objective=ppo", "stages.0.objective", "valid choices: 'grpo', 'sft'"),
    ("stages.0.grpo.kl_estimator=k4", "stages.0.grpo.kl_estimator", "'k1', 'k2', 'k3'"),
    ("seed=1.5", "seed", "expected an int, got '1.5'"),
    ("data.strict=maybe", "data.strict", "expected a bool"),
    ("stages.0.grpo.top_p=1.5", "stages.0.grpo.top_p", "must be in [0, 1]"),
    ("stages.0.grpo.temperature=-1", "stages.0.grpo.temperature", "must be >= 0"),
    ("stages.0.grpo.clip_low=-0.1", "stages.0.grpo.clip_low", "must be >= 0"),
    ("stages.0.grpo.num_samples=1", "stages.0.grpo.num_samples", "group of >= 2"),
    ("stages.0.trainable=vision,eyes", "stages.0.trainable.1", "unknown module 'eyes'"),
    ("stages.0.trainable=()", "stages.0.trainable", "at least one module"),
    ("stages.0.reward=a b=1", "stages.0.reward.0.0", "neither a builtin name"),
    ("stages.0.datasets=[]", "stages.0.datasets", "at least one dataset"),
    ("stages.0.pace_start=0", "stages.0.pace_start", "must be in (0, 1]"),
    ("stages.0.order=random", "stages.0.order", "'shuffle', 'easy_to_hard', 'paced'"),
    ("stages.0.datasets=[{\"name\": \"x\", \"weight\": -1}]", "stages.0.datasets.0.weight", "must be > 0"),
    ("stages.0.datasets=[{\"split\": \"x\"}]", "stages.0.datasets.0.name", "required key"),
    ("stages.0.optimizer.lr_multipliers=eyes=2", "stages.0.optimizer.lr_multipliers.0.0", "unknown module"),
    ("data.length_buckets=64,32", "data.length_buckets", "strictly increasing"),
    ("logical_axis_rules.0.1=model", "logical_axis_rules.0.1", "unknown mesh axis 'model'"),
])
def test_invalid_values_are_named(cfg_file, override, key, needle):
    err = _error(load_config, cfg_file, [override])
    assert err.key == key, str(err)
    assert needle in str(err)


def test_zero_steps_error_names_the_stage(cfg_file):
    err = _error(load_config, cfg_file, ["--config.stages.1.steps=0"])
    assert err.key == "stages.1.steps" and "stage 'b'" in str(err) and "got 0" in str(err)
    with pytest.raises(ConfigError, match="stage 'x': steps must be >= 1"):
        _stage("x", steps=0)


def test_duplicate_stage_names(cfg_file):
    err = _error(load_config, cfg_file, ["--config.stages.1.name=a"])
    assert err.key == "stages.1.name" and "duplicate stage name 'a'" in str(err) and "stages.0" in str(err)
    with pytest.raises(ConfigError, match="at least one stage"):
        Config(stages=())


# ----------------------------------------------------------------------------------------- mesh
def test_mesh_shape():
    assert MeshConfig().shape(8) == (8, 1, 1)
    assert MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 2)
    assert MeshConfig(data=2, fsdp=2, tensor=2).shape(8) == (2, 2, 2)
    with pytest.raises(ConfigError, match="do not divide 8 devices"):
        MeshConfig(data=-1, tensor=3).shape(8)
    with pytest.raises(ConfigError, match="has 4 devices but 8 are available"):
        MeshConfig(data=2, fsdp=2, tensor=1).shape(8)


def test_bad_mesh_is_rejected(cfg_file):
    err = _error(load_config, cfg_file, ["mesh.fsdp=-1"])  # data is already -1
    assert err.key == "mesh.fsdp" and "at most one mesh axis may be -1" in str(err)
    err = _error(load_config, cfg_file, ["mesh.tensor=0"])
    assert err.key == "mesh.tensor"


# ----------------------------------------------------------------------------------- round trip
def test_round_trip_through_json(cfg_file):
    cfg = load_config(DEMO, ["stages.0.grpo.clip_c=none", "stages.0.optimizer.lr_multipliers=vision=0.5"])
    text = json.dumps(config_to_dict(cfg))
    back = config_from_dict(json.loads(text))
    assert back == cfg and back is not cfg
    assert json.loads(text)["stages"][0]["grpo"]["clip_c"] is None


# --------------------------------------------------------------------------------- file loading
def test_bad_config_files(tmp_path):
    assert "does not exist" in str(_error(load_config, str(tmp_path / "nope.py")))
    no_fn = tmp_path / "no_fn.py"
    no_fn.write_text("X = 1\n")
    assert "no get_config()" in str(_error(load_config, str(no_fn)))
    bad = tmp_path / "bad.py"
    bad.write_text("from vlm_jax.config import *\n"
                   "def get_config():\n"
                   "    return Config(stages=(StageConfig(name='p', capability='perception',"
                   " objective='sft', datasets=(DatasetSpec(name='d'),), steps=0, batch_size=1),))\n")
    err = _error(load_config, str(bad))
    assert str(bad) in str(err) and "stage 'p': steps must be >= 1" in str(err)


# ---------------------------------------------------------------------------------------- flags
def test_parse_flags():
    path, overrides, other = parse_flags(
        ["--config", "configs/x.py", "--config.seed=1", "--workdir", "/tmp/w", "--config.stages.0.steps=2"])
    assert (path, overrides, other) == ("configs/x.py", ("--config.seed=1", "--config.stages.0.steps=2"),
                                        {"workdir": "/tmp/w"})
    assert parse_flags(["--config=c.py", "--workdir=w"]) == ("c.py", (), {"workdir": "w"})
    assert parse_flags(["--config=c.py", "--out=o"], known_flags=("out",)) == ("c.py", (), {"out": "o"})
    for argv, needle in [
        (["--config=c.py", "--lr=1"], "'--lr=1'"),
        (["--config=c.py", "stray"], "'stray'"),
        (["--workdir=w"], "missing --config"),
        (["--config=c.py", "--config=d.py"], "given twice"),
        (["--config=c.py", "--config.seed"], "needs a value"),
        (["--config=c.py", "--workdir"], "needs a value"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            parse_flags(argv)


def test_parse_flags_feeds_load_config(cfg_file):
    path, overrides, _ = parse_flags([f"--config={cfg_file}", "--config.stages.1.steps=9", "--workdir=w"])
    assert load_config(path, overrides).stages[1].steps == 9


def test_grpo_defaults_stand_alone():
    g = GRPOConfig()
    assert (g.mu, g.mini_batch_size, g.advantage, g.loss_agg) == (1, 0, "grpo", "token_mean")
    with pytest.raises(ConfigError, match="clip_c: dual-clip constant must be > 1"):
        GRPOConfig(clip_c=0.5)
    with pytest.raises(ConfigError, match="overlong_buffer: must be < max_new_tokens"):
        GRPOConfig(max_new_tokens=16, overlong_buffer=16)


def test_dr_grpo_without_no_scaling_is_a_config_error():
    """Found by running `--config.stages.0.grpo.advantage=dr_grpo`: it failed at the first rollout."""
    with pytest.raises(ConfigError, match="reward_scaling"):
        load_config(DEMO, ["stages.0.grpo.advantage=dr_grpo"])
    cfg = load_config(DEMO, ["stages.0.grpo.advantage=dr_grpo", "stages.0.grpo.reward_scaling=none"])
    assert cfg.stages[0].grpo.advantage == "dr_grpo"

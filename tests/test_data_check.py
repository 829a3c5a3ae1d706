"""Preflight data check: per-stage counts on a crafted dataset, equal to what the pipeline skips;
refusal from the CLI and at `train` start-up, before any model load or compile."""

import importlib.util
from pathlib import Path

import pytest

from vlm_jax import config as config_lib
from vlm_jax import startup, train
from vlm_jax.data import check, pipeline

ROOT = Path(__file__).resolve().parents[1]


def _crafted_module():
    spec = importlib.util.spec_from_file_location("crafted_data", ROOT / "scripts" / "crafted_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    from vlm_jax.models.tiny import build_tiny_model

    d = tmp_path_factory.mktemp("crafted")
    model = build_tiny_model(d / "model")  # with weights: train checks the model directory first
    return _crafted_module().write(d / "set", model)


def test_counts_on_the_crafted_dataset(crafted):
    cfg = config_lib.load_config(str(crafted), [])
    (report,) = check.check_config(cfg, rows=-1)
    assert (report.rows, report.checked) == (20, 18)  # 2 rows lost when the file is read
    assert report.loaded_skipped == {"image_count_mismatch": [14, 15]}
    assert report.skipped == {"prompt_too_long": [12, 13], "too_many_pixels": [18, 19]}
    assert report.out_of_bounds == [16, 17]  # the 8x8 and 400x400 images, resized but usable
    # 56x56 -> 2x2 merged patches = 4 tokens; 400x400 resized to 112x112 -> 16; two 112x112 -> 32
    assert min(report.image_tokens) == 4 and max(report.image_tokens) == 32
    assert sorted(report.image_tokens).count(16) == 1
    assert max(report.prompt_tokens) > 128 >= sorted(report.prompt_tokens)[len(report.prompt_tokens) // 2]
    assert report.skip_share == pytest.approx(6 / 20)
    table = check.format_table([report])
    assert "crafted.jsonl" in table and "30.0" in table.splitlines()[-1]


def test_check_skips_exactly_what_the_training_pipeline_skips(crafted):
    """One epoch of `make_dataset` with the stage's arguments skips the same rows for the same
    reasons as the check counted (file-read losses aside)."""
    cfg = config_lib.load_config(str(crafted), [])
    (report,) = check.check_config(cfg, rows=-1)
    sources = check._open_sources(cfg)
    processor = _processor(cfg)
    kwargs = check.stage_pipeline_kwargs(cfg, 0)
    it = pipeline.make_dataset([(sources[(cfg.stages[0].datasets[0].name, "train")], 1.0)], processor,
                               shard_index=0, shard_count=1, num_epochs=1, **kwargs)
    real_rows = sum(int(b["row_mask"].sum()) for b in it)
    skipped = {k: v for k, v in it.stats["skipped"].items() if v}
    assert skipped == {k: len(v) for k, v in report.skipped.items()}
    assert real_rows == report.checked - report.num_skipped


def _processor(cfg):
    from vlm_jax.data.processor import Processor

    processor = Processor.from_pretrained(cfg.model.path)
    startup.configure_processor(processor, cfg.data)
    return processor


def test_check_uses_the_arguments_the_curriculum_reads_each_stage_with(monkeypatch, crafted):
    cfg = config_lib.load_config(str(ROOT / "configs/synthetic_cpu.py"),
                                 ["stages.1.sft.target=caption", "stages.2.sft.caption_as_input=true"])
    assert check.CAPTION_INSTRUCTION == startup.CAPTION_INSTRUCTION
    seen = []
    monkeypatch.setattr(pipeline, "make_dataset", lambda sources, processor, **kw: seen.append(kw))
    env = startup.Env(cfg, Path("."), None, None, _processor(config_lib.load_config(str(crafted), [])),
                         {(d.name, d.split): None for s in cfg.stages for d in s.datasets}, 64)
    for i in range(len(cfg.stages)):
        startup.make_iterator(env, i)
        want = check.stage_pipeline_kwargs(cfg, i)
        assert {k: seen[-1][k] for k in want} == want
        assert pipeline.row_spec(**want) == pipeline.row_spec(**{k: seen[-1][k] for k in want})


def test_cli_prints_the_table_and_refuses_above_the_share(crafted, capsys):
    assert check.main(["--config", str(crafted)]) == 2
    out, err = capsys.readouterr()
    assert "crafted.jsonl" in out and "skip %" in out
    assert err.startswith("error: preflight data check: stage 0 (caption_sft) dataset ")
    assert ("would skip 30.0% of its rows (image_count_mismatch rows 14, 15; prompt_too_long rows 12, 13; "
            "too_many_pixels rows 18, 19); above data.preflight_max_skip_share=0.1") in err
    assert check.main(["--config", str(crafted), "--max_skip_share=0.5", "--rows=5"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].split()[2:4] == ["20", "5"]  # rows, checked (an even sample)


def test_train_refuses_to_start_before_loading_the_model(crafted, tmp_path, capsys, monkeypatch):
    from vlm_jax import models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data check refused")

    monkeypatch.setattr(models, "from_pretrained", no_load)
    assert train.main(["--config", str(crafted), "--workdir", str(tmp_path / "wd")]) == 2
    out, err = capsys.readouterr()
    assert "skip %" in out and "error: preflight data check:" in err and "prompt_too_long rows 12, 13" in err
    assert not (tmp_path / "wd" / "config.json").exists()
    # configurable: a sample of 4 evenly spread rows, or a higher share, or off
    cfg = config_lib.load_config(str(crafted), ["data.preflight_rows=4", "data.preflight_max_skip_share=1"])
    assert [r.checked for r in check.preflight(cfg, check._open_sources(cfg))] == [4]
    cfg = config_lib.load_config(str(crafted), ["data.preflight_max_skip_share=0.35"])
    assert check.preflight(cfg, check._open_sources(cfg))[0].skip_share == pytest.approx(0.3)
    cfg = config_lib.load_config(str(crafted), ["data.preflight_rows=0"])
    assert check.preflight(cfg, check._open_sources(cfg)) == []
    # strict: any skipped row refuses (a strict run would stop at it mid-stage)
    cfg = config_lib.load_config(str(crafted), ["data.preflight_max_skip_share=0.35", "data.strict=true"])
    with pytest.raises(config_lib.ConfigError, match="data.strict=True allows none"):
        check.preflight(cfg, check._open_sources(cfg))


@pytest.mark.parametrize("override, message", [("data.preflight_rows=-2", "preflight_rows"),
                                               ("data.preflight_max_skip_share=1.5", "preflight_max_skip_share")])
def test_bad_preflight_settings_are_config_errors(override, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.load_config(str(ROOT / "configs/synthetic_cpu.py"), [override])

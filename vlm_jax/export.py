"""python -m vlm_jax.export --workdir DIR --out HF_DIR

Writes the latest checkpoint of a training workdir as a Hugging Face directory (safetensors,
config.json, tokenizer, image processor, chat template) that transformers loads. A checkpoint of a
LoRA stage is written merged, and its adapters alone also in PEFT's format in `HF_DIR/adapter`
(`peft.PeftModel.from_pretrained(base, HF_DIR/adapter)`); the base they belong to is the training's
model directory, or, when earlier stages had changed the weights, `HF_DIR/adapter_base` (written too).
DIR and HF_DIR may be local folders or bucket URLs (`gs://...`).
"""

import argparse
import os
import sys
from pathlib import Path

from vlm_jax import models, paths
from vlm_jax.models import lora


def export(workdir, out_dir):
    from vlm_jax.workdir import restore_for_export

    model, params, _, meta = restore_for_export(workdir, with_meta=True)
    out = models.save_pretrained(model, params, out_dir)
    share_files(out)
    if isinstance(params, lora.LoraParams):
        from vlm_jax.checkpoint import Checkpointer

        with Checkpointer(paths.resolve(workdir) / "lora_base", keep=2, async_save=False) as bases:
            saved = meta["opt_stage"] in bases.all_steps()
        base_dir = str(model.source_dir)
        if saved:  # the weights at the LoRA stage's start, not the training's model directory
            base_dir = str(models.save_pretrained(model, params.base, paths.as_path(out) / "adapter_base"))
            share_files(base_dir)
        share_files(models.save_peft_adapters(model, params, paths.as_path(out) / "adapter", base_model=base_dir))
    return out


def share_files(directory) -> None:
    """Gives the exported files the usual permissions (0644 under the default umask) instead of the
    0600 of the temporary files they were written through, so other users and jobs can read them
    (nothing for a bucket: access there is the bucket's)."""
    if paths.is_url(directory):
        return
    umask = os.umask(0)
    os.umask(umask)
    for f in Path(directory).iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlm_jax.export", description=__doc__)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        out = export(args.workdir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.workdir} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

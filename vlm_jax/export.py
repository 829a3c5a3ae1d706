"""python -m vlm_jax.export --workdir DIR --out HF_DIR

Writes the latest checkpoint of a training workdir as a Hugging Face directory (safetensors,
config.json, tokenizer, image processor, chat template) that transformers loads.
"""

import argparse
import os
import sys
from pathlib import Path

from vlm_jax import models


def export(workdir, out_dir):
    from vlm_jax.curriculum import restore_for_export

    model, params, _ = restore_for_export(workdir)
    out = models.save_pretrained(model, params, out_dir)
    share_files(out)
    return out


def share_files(directory) -> None:
    """Gives the exported files the usual permissions (0644 under the default umask) instead of the
    0600 of the temporary files they were written through, so other users and jobs can read them."""
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

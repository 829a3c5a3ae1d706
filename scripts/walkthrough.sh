#!/usr/bin/env bash
# The docs' "Your own data, start to finish" walkthrough (docs/getting-started/your-data.md shows
# this file), run from a fresh folder OUTSIDE the repository with the installed commands only (no
# PYTHONPATH): prepare an EasyR1-style Parquet file (problem / answer / images written by Hugging
# Face datasets, relative image paths), train a GRPO + SFT config with an EasyR1 compute_score
# reward, evaluate, export, load in transformers.
# Usage: bash scripts/walkthrough.sh [FOLDER]   (default: a new temporary folder). CI runs it (slow tests).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/scripts/env.sh" test        # the environment: venv + `pip install -e .`
unset PYTHONPATH                         # only the installed package from here on
W="${1:-$(mktemp -d)}"
mkdir -p "$W" && cd "$W"
case "$PWD/" in "$ROOT"/*) echo "walkthrough: $PWD is inside the repository" >&2; exit 1;; esac
export VLM_JAX_HOME="$W/home"             # the one data directory is $VLM_JAX_HOME/data
export JAX_PLATFORMS=cpu
echo "== walkthrough in $W"

# 0. a model directory (here the project's tiny Qwen2.5-VL; normally a downloaded checkpoint)
python -c "from vlm_jax.models.tiny import build_tiny_model; build_tiny_model('model', seed=0)"

# 1. your data: what `datasets` writes for images opened from files ({"bytes": None, "path": ...})
python - <<'PY'
import io, pathlib
import pyarrow as pa, pyarrow.parquet as pq
from PIL import Image
root = pathlib.Path("mydata/images"); root.mkdir(parents=True, exist_ok=True)
colors = ["red", "green", "blue"]
problems, answers, images = [], [], []
for k in range(12):
    Image.new("RGB", (56, 56), colors[k % 3]).save(root / f"{k}.png")
    problems.append("<image>What color is the picture?"); answers.append(colors[k % 3])
    images.append([{"bytes": None, "path": f"mydata/images/{k}.png"}])
t = pa.table({"problem": problems, "answer": answers, "images": pa.array(images,
    type=pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())])))})
pq.write_table(t, "mydata/train.parquet")
PY
vlm-jax-prepare --input mydata/train.parquet --name mydata | tee prepare.log
grep -q "kept 12 rows, skipped 0" prepare.log

# 2. an EasyR1-style reward and a GRPO + SFT config
cat > myreward.py <<'PY'
def compute_score(predict: str, ground_truth: str) -> dict:
    return {"overall": float(ground_truth.lower() in predict.lower()), "format": 0.0}
PY
cat > myconfig.py <<'PY'
from vlm_jax.config import (CheckpointConfig, Config, DataConfig, DatasetSpec, GRPOConfig,
                            LoggingConfig, ModelConfig, OptimizerConfig, SFTConfig, StageConfig)

def get_config() -> Config:
    data = (DatasetSpec(name="mydata"),)
    see = StageConfig(name="see", capability="perception", objective="grpo", datasets=data, steps=2,
                      batch_size=2, optimizer=OptimizerConfig(lr=1e-4),
                      grpo=GRPOConfig(num_samples=2, max_new_tokens=8, kl_coef=0.0),
                      reward=(("easyr1:myreward.py:compute_score", 1.0),))
    think = StageConfig(name="think", capability="visual_reasoning", objective="sft", datasets=data,
                        steps=2, batch_size=2, optimizer=OptimizerConfig(lr=1e-4),
                        sft=SFTConfig(target="answer"))
    return Config(model=ModelConfig(path="model"),
                  data=DataConfig(max_prompt_len=256, length_buckets=(256,),
                                  max_pixels_per_image=12544, min_pixels_per_image=3136),
                  stages=(see, think), checkpoint=CheckpointConfig(every=0),
                  logging=LoggingConfig(progress=False, tensorboard=False))
PY

# 3. train, evaluate, export (the python -m form works the same from here)
vlm-jax-train --config myconfig.py --workdir run | tee train.log
grep -q "stage see: 2/2 steps" train.log && grep -q "stage think: 2/2 steps" train.log
grep -q '"reward/compute_score"' run/metrics.jsonl
vlm-jax-evaluate --model run --data mydata --out eval.json --max_new_tokens 8 | tee eval.log
grep -q "mydata\[train\]: accuracy" eval.log
vlm-jax-export --workdir run --out run_hf
python -m vlm_jax.export --help > /dev/null

# 4. the exported directory in transformers
python - <<'PY'
import stat, pathlib
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
model = Qwen2_5_VLForConditionalGeneration.from_pretrained("run_hf")
tok = AutoTokenizer.from_pretrained("run_hf")
mode = pathlib.Path("run_hf/model.safetensors").stat().st_mode
assert mode & stat.S_IROTH, oct(mode)
print("transformers loaded run_hf:", type(model).__name__, sum(p.numel() for p in model.parameters()), "parameters")
PY
echo "== walkthrough finished in $W"

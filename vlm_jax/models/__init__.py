"""Public model API: `from_pretrained`, `forward`, `save_pretrained`, and the family registry.

A model family is a sub-package of `vlm_jax.models` (e.g. `qwen2_5_vl/`) that declares the HF
`model_type`s it serves in `MODEL_TYPES`; adding a family is adding a folder.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import pkgutil
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from vlm_jax import paths
from vlm_jax import sharding as shd
from vlm_jax.models import hf_io
from vlm_jax.models import lora
from vlm_jax.models.hf_io import CheckpointError

# Files copied from the source directory on save, so an export is a complete HF model directory.
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)


@functools.cache
def families() -> dict[str, ModuleType]:
    """model_type -> family module, discovered from the sub-packages of this package."""
    out = {}
    for info in pkgutil.iter_modules(__path__):
        if info.ispkg:
            module = importlib.import_module(f"{__name__}.{info.name}")
            for model_type in getattr(module, "MODEL_TYPES", ()):
                out[model_type] = module
    return out


def family_for(raw: Mapping[str, Any], source: str) -> ModuleType:
    model_type = raw.get("model_type")
    fams = families()
    if model_type not in fams:
        raise CheckpointError(f"{source}: unsupported model_type {model_type!r}; supported: {sorted(fams)}")
    return fams[model_type]


@dataclasses.dataclass(eq=False)
class Model:
    """Everything about a loaded model except its parameters (which travel separately as a pytree)."""

    family: ModuleType
    config: Any
    graphdef: nnx.GraphDef
    hf_config: dict
    dtype: Any
    mesh: Mesh | None = None
    source_dir: Any = None  # a local Path or a URL (etils.epath.Path)
    options: Any = None  # the family's ModelOptions (compute dtype, remat, chunk sizes)

    def prepare(self, batch: Mapping[str, Any], **kw):
        """Host-side inputs (`ModelInputs`) for a processor-style numpy batch."""
        return self.family.prepare_inputs(batch, self.config, **kw)

    def merge(self, params):
        return lora.bind(self.graphdef, params)

    def with_options(self, **changes) -> "Model":
        """The same model (same parameters) computing with other `ModelOptions` (e.g. a stage's
        remat policy): a new graphdef, so the jitted functions compile for it separately."""
        options = dataclasses.replace(self.options or self.family.ModelOptions(), **changes)
        if options == self.options:
            return self
        graphdef, _ = abstract_model(self.family, self.config, self.dtype, options)
        return dataclasses.replace(self, graphdef=graphdef, options=options)


def abstract_model(family: ModuleType, cfg, dtype, options=None) -> tuple[nnx.GraphDef, nnx.State]:
    options = family.ModelOptions() if options is None else options
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: family.build(cfg, dtype, nnx.Rngs(0), options))
    graphdef, state = nnx.split(abstract, nnx.Param)
    return graphdef, state


def _path(key_path) -> str:
    return ".".join(str(k) for k in key_path)


def from_pretrained(
    path, *, dtype=jnp.float32, mesh: Mesh | None = None, rules=None, options=None
) -> tuple[Model, nnx.State]:
    """Loads an HF directory (`config.json` + `*.safetensors`) into (model, params), each parameter read
    slice by slice into its target sharding (on `mesh` by the logical-axis rules, else one device).
    `dtype` is how the parameters are stored; `options` (the family's `ModelOptions`, or a dict of
    its fields) how the model computes (e.g. `compute_dtype="bfloat16"` over fp32 parameters).
    `path` may be a URL (`gs://...`: each host reads only its slices from the bucket) or a Hugging
    Face hub id (see `vlm_jax.paths.model_dir`)."""
    try:
        path = paths.model_dir(path)
    except paths.ModelPathError as e:
        raise CheckpointError(str(e)) from None
    raw = hf_io.read_config(path)
    source = str(path / "config.json")
    family = family_for(raw, source)
    try:
        cfg = family.parse_config(raw, source)
    except (TypeError, KeyError) as e:
        raise CheckpointError(f"{source}: cannot parse config ({e})") from e
    if options is None or isinstance(options, Mapping):
        options = family.ModelOptions(**(options or {}))
    graphdef, abstract = abstract_model(family, cfg, dtype, options)
    model = Model(family, cfg, graphdef, raw, dtype, mesh, path, options)
    flat = nnx.to_flat_state(abstract)
    specs = family.tensor_map([_path(p) for p, _ in flat], cfg)
    if mesh is not None:
        shardings = dict(nnx.to_flat_state(shd.param_shardings(abstract, mesh, rules)))
    else:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    loaded = []
    with hf_io.SafetensorsIndex(path) as index:
        for key_path, var in flat:
            spec = specs[_path(key_path)]
            name = index.find(spec.names)
            if name is None:
                raise CheckpointError(
                    f"tensor {spec.names[0]} (or {spec.names[1]}) not found in the "
                    f"safetensors files of {path}"
                )
            sharding = shardings[key_path] if mesh is not None else single
            arr = hf_io.load_sharded(index, name, spec, var.shape, dtype, sharding)
            loaded.append((key_path, var.replace(arr)))
    return model, nnx.from_flat_state(loaded)


def save_pretrained(model: Model, params, out_dir, *, max_shard_bytes: int = 2 << 30) -> Path:
    """Writes an HF directory transformers loads: safetensors (legacy file names), config.json and,
    when the model came from a directory, its tokenizer / processor / chat-template files. LoRA
    parameters (`lora.LoraParams`) are written merged."""
    if isinstance(params, lora.LoraParams):  # adapters merged into the weights
        params = lora.merge(params, dtype=model.dtype)
    flat = nnx.to_flat_state(params)
    specs = model.family.tensor_map([_path(p) for p, _ in flat], model.config)
    tensors = {}
    for key_path, var in flat:
        spec = specs[_path(key_path)]
        tensors[spec.names[0]] = functools.partial(lambda s, v: s.from_jax(hf_io.to_host(v)), spec, var[...])
    target = paths.resolve(out_dir) if paths.is_url(out_dir) else Path(out_dir)
    with paths.staged_dir(out_dir) as local:  # a bucket: written locally, then uploaded
        hf_io.save_tensors(tensors, local, max_shard_bytes)
        if jax.process_index() == 0:
            raw = dict(model.hf_config)
            raw["dtype"] = jnp.dtype(model.dtype).name
            raw.setdefault("architectures", list(model.family.ARCHITECTURES))
            (local / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
            src = model.source_dir
            if src is not None and (paths.is_url(src) or paths.is_url(target) or src.resolve() != target.resolve()):
                for name in PROCESSOR_FILES:
                    if (src / name).exists():
                        paths.copy_file(src / name, local / name)
    return target


def hf_module_name(spec) -> str:
    """The transformers (5.x) module name of a linear layer's `TensorSpec` (its in-memory name,
    `model.language_model.*` / `model.visual.*`, without `.weight`)."""
    name = next((n for n in spec.names if n.startswith(("model.language_model.", "model.visual."))), spec.names[0])
    return name[: -len(".weight")]


def save_peft_adapters(model: Model, params: lora.LoraParams, out_dir, *, base_model: str = "") -> Path:
    """Writes the adapters of `params` in PEFT's LoRA format (`adapter_config.json` +
    `adapter_model.safetensors`), which `peft.PeftModel.from_pretrained(base, out_dir)` loads over
    the transformers model of the base (`base_model`, recorded as `base_model_name_or_path`)."""
    target = paths.resolve(out_dir) if paths.is_url(out_dir) else Path(out_dir)
    adapters = list(lora.iter_adapters(params.adapters))
    names = [f"{m}.kernel" for m, _, _ in adapters]
    specs = model.family.tensor_map(names, model.config)
    tensors, targets, rank = {}, [], 0
    for (module, a, b), key in zip(adapters, names):
        name = hf_module_name(specs[key])
        a, b = hf_io.to_host(a), hf_io.to_host(b)
        rank = a.shape[1]
        tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(a.T.astype(np.float32))
        tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(b.T.astype(np.float32))
        targets.append(name)
    if jax.process_index() == 0:
        from safetensors.numpy import save_file

        with paths.staged_dir(target) as out_dir:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
            config = dict(
                peft_type="LORA", task_type=None, r=rank, lora_alpha=params.scale * rank, lora_dropout=0.0,
                target_modules=targets, bias="none", fan_in_fan_out=False, use_rslora=False, use_dora=False,
                init_lora_weights=True, inference_mode=True, modules_to_save=None,
                base_model_name_or_path=base_model or None,
            )
            (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return target


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, inputs):
    module = lora.bind(graphdef, params)
    return module(inputs.input_ids_BL, inputs.attention_mask_BL, inputs.positions_3BL, inputs.vision)


def place_inputs(model: Model, inputs, *, local: bool = False):
    """Puts `ModelInputs` on the model's mesh: token and vision arrays split over (data, fsdp) (the
    vision inputs are laid out per row, so each batch shard holds only its own rows' images).
    `local`: `inputs` are this process's rows only (see `shard_batch`; `prepare_local` builds them)."""
    if model.mesh is None:
        return inputs
    mesh = model.mesh

    def batch_axis(path, x):
        name = _path(getattr(k, "name", k) for k in path)
        return 1 if name.startswith("positions") else 0

    return shd.shard_batch(inputs, mesh, batch_axis, local=local)


def has_images(batch: Mapping[str, Any]) -> bool:
    """Whether a processor-style batch holds an image."""
    grid = batch.get("image_grid_thw")
    n = int(np.asarray(batch["num_images"]).sum()) if "num_images" in batch else (
        0 if grid is None else int(np.asarray(grid).reshape(-1, 3).shape[0]))
    return n > 0


def prepare_local(model: Model, batch: Mapping[str, Any], *, num_patches: int | None = None):
    """`model.prepare` for this process's rows of a batch split over processes: the rows must have
    the length every process uses (see `pad_to_length`), and they get vision inputs when any
    process's rows have an image (all padding here if none of this process's do), so every process
    builds the same shapes. With one process it is `model.prepare`."""
    (any_images,) = shd.agree_max(has_images(batch))
    return model.prepare(batch, num_patches=num_patches, with_vision=bool(any_images) and bool(num_patches))


def forward(model: Model, params, batch: Mapping[str, Any]) -> jax.Array:
    """Logits [B, L, V] for a processor-style batch (`input_ids`, `attention_mask`, `pixel_values`,
    `image_grid_thw`; numpy). Text-only rows, several images per row and left/right padding all work."""
    inputs = place_inputs(model, model.prepare(batch))
    return _forward(model.graphdef, params, inputs)


__all__ = [
    "Model",
    "from_pretrained",
    "forward",
    "save_pretrained",
    "families",
    "CheckpointError",
]

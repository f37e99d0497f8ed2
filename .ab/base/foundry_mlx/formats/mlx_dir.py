"""MLX model directories (mlx-lm's format): config.json, safetensors, tokenizer files.

`save_directory` is what `foundry-mlx convert` writes: the weights exactly as foundry-mlx holds
them (affine-quantized matrices as `weight`/`scales`/`biases`, per-layer bits in
config.json's "quantization"), so `mlx_lm.load` runs the identical weights — that is how the
benchmarks compare the two engines. `load_directory` reads such a directory back, or any
mlx-community / Hugging Face safetensors repository of a supported family.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
from tqdm import tqdm

from .. import models, quant
from ..config import OUR_MODEL_TYPES, ModelConfig
from ..errors import FoundryError, ModelFormatError

SHARD_BYTES = 5 << 30  # mlx-lm's default shard size


def _split_fused(model) -> dict[str, Any]:
    """The model's weights under Hugging Face names, fused projections split back apart."""
    if hasattr(model, "hf_weights"):  # a family that lays out its own weights (gemma3)
        return model.hf_weights()
    config: ModelConfig = model.config
    weights: dict[str, Any] = {"model.embed_tokens.weight": model.embed_tokens.table.stored}
    weights["model.norm.weight"] = model.norm_weight
    if not config.tie_word_embeddings:
        weights["lm_head.weight"] = model.lm_head.stored
    for index, layer in enumerate(model.layers):
        prefix = f"model.layers.{index}"
        attention, mlp = layer.self_attn, layer.mlp
        weights[f"{prefix}.input_layernorm.weight"] = attention.norm_weight
        weights[f"{prefix}.post_attention_layernorm.weight"] = mlp.norm_weight
        weights |= models.split_projections(prefix, attention, mlp, config)
    return weights



def save_directory(model, tokenizer, out_dir: str | Path, force: bool = False, progress: bool = True) -> Path:
    """Write `model` and `tokenizer` as an mlx-lm model directory; atomic (temp dir, then rename)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise FoundryError(f"{out_dir} exists and is not empty; choose another directory or pass --force.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    weights = _split_fused(model)
    tensors: dict[str, mx.array] = {}
    layer_quantization: dict[str, dict[str, int]] = {}
    for name, weight in weights.items():
        module = name.rsplit(".", 1)[0]
        if isinstance(weight, quant.QuantizedWeight):
            tensors[name] = weight.weight
            tensors[f"{module}.scales"] = weight.scales
            tensors[f"{module}.biases"] = weight.biases
            layer_quantization[module] = {"group_size": weight.group_size, "bits": weight.bits}
        else:
            tensors[name] = weight
    config = model.config.to_hf_dict()
    config["torch_dtype"] = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}.get(
        model.norm_weight.dtype, "float32"
    )
    config["eos_token_id"] = sorted(tokenizer.eos_token_ids)
    if tokenizer.bos_token_id is not None:
        config["bos_token_id"] = tokenizer.bos_token_id
    if layer_quantization:
        # The most common setting is the default; every other layer is listed (mlx-lm reads both).
        default = Counter(tuple(sorted(q.items())) for q in layer_quantization.values()).most_common(1)[0][0]
        quantization: dict[str, Any] = {**dict(default), "mode": "affine"}
        quantization.update({m: q for m, q in layer_quantization.items() if tuple(sorted(q.items())) != default})
        config["quantization"] = config["quantization_config"] = quantization

    scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(scratch, 0o777 & ~umask)  # mkdtemp makes it private; the result should not be
    try:
        shards = _shards(tensors)
        names = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
        ]
        for name, shard in tqdm(list(zip(names, shards)), desc="writing weights", unit="shard", disable=not progress):
            mx.save_safetensors(str(scratch / name), shard, metadata={"format": "mlx"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                     "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
            (scratch / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (scratch / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save(scratch)
        _replace(scratch, out_dir)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return out_dir


def _shards(tensors: dict[str, mx.array]) -> list[dict[str, mx.array]]:
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        if current and size + tensor.nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += tensor.nbytes
    return shards + [current]


def _replace(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing target is moved aside first and deleted last."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def load_directory(path: Path, dtype: mx.Dtype, progress: bool = True, make_plan=None):
    """Load an mlx-lm / Hugging Face safetensors model directory; returns (model, tokenizer).

    `make_plan(config)` (`distributed.planner`) gives the plan that keeps only this rank's part of
    each weight: the tensors are read lazily, so a rank holds only its part once built."""
    from ..tokenizer import Tokenizer

    config_path = path / "config.json"
    if not config_path.exists():
        raise ModelFormatError(f"{path} has no config.json; is it a model directory?")
    values = json.loads(config_path.read_text())
    if OUR_MODEL_TYPES.get(values.get("model_type"), values.get("model_type")) not in models.FAMILIES:
        raise ModelFormatError(
            f"{path} holds a {values.get('model_type')!r} model; supported: {', '.join(models.FAMILIES)}."
        )
    config = ModelConfig.from_hf_dict(values)
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise ModelFormatError(f"{path} has no model*.safetensors weight files.")
    raw: dict[str, mx.array] = {}
    for file in tqdm(files, desc="loading weights", unit="file", disable=not progress, leave=False):
        raw.update(mx.load(str(file)))
    quantization = values.get("quantization") or {}
    weights: dict[str, Any] = {}
    for name, tensor in raw.items():
        module, leaf = name.rsplit(".", 1)
        if leaf in ("scales", "biases") and f"{module}.weight" in raw and f"{module}.scales" in raw:
            continue
        if leaf == "weight" and f"{module}.scales" in raw:
            setting = quantization.get(module, quantization)
            if setting.get("mode", "affine") != "affine":
                raise ModelFormatError(f"{module} uses {setting['mode']} quantization; only affine is supported.")
            weights[name] = quant.QuantizedWeight(
                tensor, raw[f"{module}.scales"].astype(dtype), raw[f"{module}.biases"].astype(dtype),
                int(setting["bits"]), int(setting["group_size"]),
            )
        else:
            weights[name] = tensor.astype(dtype)
    if make_plan is None:
        model = models.build(config, weights)
    else:
        from ..distributed import shard_weights

        shard = make_plan(config)
        del raw  # so that each whole tensor is freed once its part is taken
        model = shard.build(config, shard_weights(shard, weights))
    model.source = path
    return model, Tokenizer.from_directory(path)

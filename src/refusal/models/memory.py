"""How much memory a run needs, estimated before the model loads, and how much the device has free.

Weights: the parameter count times the bytes of ``model.dtype``. The count is exact where a checkpoint
config is on disk (a local folder, the Hugging Face cache, a packaged model already dequantized, the
tiny model): the model is built on the ``meta`` device (no memory) and its parameters counted. Else
it comes from the sizes the model config declares (``n_layers``, ``d_model``, optionally ``vocab_size``
and ``d_mlp``) with a Llama-style formula. Working set: what a forward pass over ``model.batch_size``
sequences of a nominal length holds besides the weights (KV cache, the widest block intermediates,
and every position's logits with their float32 copy, as scoring a completion needs). With
``model.matmul=bfloat16`` the block weights' rounded copy besides (half their size, or their size where
the products are emulated on float32 kernels). All are rough;
a run only warns when the estimate exceeds what the device has free, it never refuses to start.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refusal.models.tiny import build_tiny_tokenizer, tiny_config

log = logging.getLogger(__name__)

GIB = float(1 << 30)
#: Prompt plus completion tokens per sequence assumed by the working-set estimate (this study's chat
#: prompts are 30-100 tokens, completions up to eval.max_new_tokens=64).
NOMINAL_TOKENS = 128
#: Vocabulary assumed when a config declares none and no checkpoint config is on disk.
DEFAULT_VOCAB = 32_000
_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}


@dataclass(frozen=True)
class Shape:
    """The sizes the estimate needs; ``exact``: the parameter count is the checkpoint's own."""

    n_params: int
    n_layers: int
    d_model: int
    d_mlp: int
    vocab_size: int
    kv_dim: int  # key/value heads × head dim: one token's K (or V) per layer
    exact: bool

    @property
    def block_linear_params(self) -> int:
        """The blocks' projection weights (q, o: d²; k, v: d·kv_dim; a gated MLP: 3·d·d_mlp per layer): what
        ``model.matmul=bfloat16`` holds a second, rounded copy of."""
        d = self.d_model
        return self.n_layers * (2 * d * d + 2 * d * self.kv_dim + 3 * d * self.d_mlp)


def count_parameters(config: Any) -> int:
    """Exact parameter count of ``config``'s causal LM (tied weights once), built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def shape_from_config(config: Any) -> Shape:
    """The :class:`Shape` of a transformers config (multimodal configs: their text model)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    d, heads = int(text.hidden_size), int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or d // heads)
    return Shape(
        n_params=count_parameters(config),
        n_layers=int(text.num_hidden_layers),
        d_model=d,
        d_mlp=int(getattr(text, "intermediate_size", None) or 4 * d),
        vocab_size=int(text.vocab_size),
        kv_dim=kv_heads * head_dim,
        exact=True,
    )


def declared_shape(
    n_layers: int, d_model: int, vocab_size: int | None = None, d_mlp: int | None = None, tied: bool = False
) -> Shape:
    """A Llama-style decoder from declared sizes: per layer full multi-head attention (4·d²), a gated MLP
    (3·d·d_mlp, d_mlp = 8/3·d unless given) and two norms (2·d); embedding and unembedding V·d each
    (once if tied); a final norm. Grouped-query attention or biases make real models differ a little."""
    d, L = int(d_model), int(n_layers)
    m = int(d_mlp) if d_mlp else (8 * d) // 3
    V = int(vocab_size) if vocab_size else DEFAULT_VOCAB
    n = L * (4 * d * d + 3 * d * m + 2 * d) + V * d * (1 if tied else 2) + d
    return Shape(n_params=n, n_layers=L, d_model=d, d_mlp=m, vocab_size=V, kv_dim=d, exact=False)


def working_set_bytes(shape: Shape, dtype: torch.dtype, batch_size: int, tokens: int = NOMINAL_TOKENS) -> int:
    """Memory one forward pass of ``batch_size`` × ``tokens`` holds besides the weights."""
    b, n = _BYTES[dtype], batch_size * tokens
    kv_cache = 2 * shape.n_layers * n * shape.kv_dim * b
    block = n * (4 * shape.d_model + 2 * shape.d_mlp) * b  # residual, norm, q/k/v/out; gate and up
    logits = n * shape.vocab_size * (b + (4 if b != 4 else 0))  # every position, plus its float32 copy
    return kv_cache + block + logits


def checkpoint_config(cfg: Mapping[str, Any], cache_dir: str | Path) -> Any | None:
    """The transformers config of ``cfg``'s model when it is on disk already (never downloads)."""
    from transformers import AutoConfig

    source = cfg.get("source")
    try:
        if source == "tiny":
            return tiny_config(build_tiny_tokenizer(), **dict(cfg.get("tiny") or {}))
        if source == "local":
            folder = Path(str(cfg.get("path", ""))).expanduser()
            return AutoConfig.from_pretrained(folder) if (folder / "config.json").exists() else None
        if source == "hub":
            return AutoConfig.from_pretrained(str(cfg["hub_id"]), revision=cfg.get("revision"), local_files_only=True)
        if source == "gguf_package":
            folder = Path(cache_dir) / "models" / f"{str(cfg['gguf']['sha256']).lower()[:16]}-hf"
            return AutoConfig.from_pretrained(folder) if (folder / ".complete").exists() else None
    except Exception as err:  # an estimate never stops a run
        log.debug("no checkpoint config for the memory estimate: %s", err)
    return None


def model_shape(cfg: Mapping[str, Any], cache_dir: str | Path) -> Shape | None:
    """From the checkpoint's config when on disk, else from the declared sizes; None when neither is known."""
    config = checkpoint_config(cfg, cache_dir)
    if config is not None:
        try:
            return shape_from_config(config)
        except Exception as err:  # e.g. an architecture transformers cannot build
            log.debug("cannot count %s's parameters from its config: %s", cfg.get("name"), err)
    if cfg.get("n_layers") and cfg.get("d_model"):
        return declared_shape(cfg["n_layers"], cfg["d_model"], cfg.get("vocab_size"), cfg.get("d_mlp"))
    return None


def free_memory(device: torch.device | None, device_map: Any = None) -> tuple[str, int | None]:
    """(where the model goes, in words; bytes free there, None when unknown)."""
    if device_map is not None:
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            free = sum(torch.cuda.mem_get_info(i)[0] for i in range(n))
            return f"device_map {_describe(device_map)} over {n} GPU{'s' if n > 1 else ''}", int(free)
        return f"device_map {_describe(device_map)} (no GPU: cpu)", _free_cpu()
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return str(device), int(torch.cuda.mem_get_info(device)[0])
    if device is None or device.type == "cpu":
        return "cpu", _free_cpu()
    return str(device), None


def _describe(device_map: Any) -> str:
    return device_map if isinstance(device_map, str) else f"of {len(device_map)} entries"


def _free_cpu() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass(frozen=True)
class MemoryEstimate:
    """Weights and working set of one model at one dtype and batch size, and the room where it goes."""

    name: str
    shape: Shape | None
    dtype: torch.dtype
    batch_size: int
    tokens: int
    where: str
    free_bytes: int | None
    # model.matmul=bfloat16: bytes per block weight of its rounded copy (2 native, 4 where emulated on float32
    # kernels: numerics.Bf16Linear); 0 without one
    matmul_copy_bytes: int = 0

    @property
    def weights_bytes(self) -> int | None:
        return None if self.shape is None else self.shape.n_params * _BYTES[self.dtype]

    @property
    def copy_bytes(self) -> int | None:
        return None if self.shape is None else self.shape.block_linear_params * self.matmul_copy_bytes

    @property
    def working_bytes(self) -> int | None:
        return None if self.shape is None else working_set_bytes(self.shape, self.dtype, self.batch_size, self.tokens)

    @property
    def total_bytes(self) -> int | None:
        return None if self.shape is None else self.weights_bytes + self.copy_bytes + self.working_bytes

    @property
    def fits(self) -> bool | None:
        """False only when both the need and the room are known and the need is larger."""
        if self.total_bytes is None or self.free_bytes is None:
            return None
        return self.total_bytes <= self.free_bytes

    def line(self) -> str:
        """``qwen05: ~2.3 GiB weights (630M parameters, float32) + ~2.6 GiB working set (batch 32 × 128 tokens); device cpu, 21.7 GiB free``"""
        dtype = str(self.dtype).removeprefix("torch.")
        room = f"device {self.where}, " + ("free memory unknown" if self.free_bytes is None else f"{format_bytes(self.free_bytes)} free")
        if self.shape is None:
            return f"{self.name}: size unknown before loading (no checkpoint config on disk, no declared n_layers/d_model); {room}"
        count = f"{format_count(self.shape.n_params)} parameters" + ("" if self.shape.exact else " from declared sizes")
        copy = (f"~{format_bytes(self.copy_bytes)} bfloat16-rounded block weights (model.matmul=bfloat16"
                f"{', kept in float32: no bfloat16 units' if self.matmul_copy_bytes == 4 else ''}) + ") if self.matmul_copy_bytes else ""
        return (f"{self.name}: ~{format_bytes(self.weights_bytes)} weights ({count}, {dtype}) + {copy}"
                f"~{format_bytes(self.working_bytes)} working set (batch {self.batch_size} × {self.tokens} tokens); {room}")

    def warning(self, device_map: Any = None) -> str | None:
        """What to change when the estimate does not fit (None when it fits or is unknown)."""
        if self.fits is not False:
            return None
        fixes = ["lower model.batch_size"]
        if self.dtype == torch.float32:
            fixes.append("use model.dtype=bfloat16 (half the weights)")
        if device_map is None:
            fixes.append("spread it over the GPUs with model.device_map=auto")
        parts = "weights + their bfloat16 copy + working set" if self.matmul_copy_bytes else "weights + working set"
        return (f"{self.name} may not fit: it needs ~{format_bytes(self.total_bytes)} ({parts}) but "
                f"{self.where} has {format_bytes(self.free_bytes)} free; the estimate is rough, the run goes on. "
                f"If it runs out of memory: {', or '.join(fixes)}")


def format_bytes(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / (1 << 20):.1f} MiB"


def format_count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    return f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def estimate_memory(
    cfg: Mapping[str, Any],
    cache_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device | None,
    device_map: Any = None,
    tokens: int = NOMINAL_TOKENS,
    matmul_copy_bytes: int = 0,
) -> MemoryEstimate:
    """The estimate for ``cfg`` (a ``conf/model/*.yaml`` mapping) at ``dtype`` on ``device``/``device_map``, with
    ``matmul_copy_bytes`` per block weight for ``model.matmul=bfloat16``'s rounded copy."""
    where, free = free_memory(device, device_map)
    return MemoryEstimate(
        name=str(cfg.get("name", "model")),
        shape=model_shape(cfg, cache_dir),
        dtype=dtype,
        batch_size=int(cfg.get("batch_size") or 16),
        tokens=tokens,
        where=where,
        free_bytes=free,
        matmul_copy_bytes=matmul_copy_bytes,
    )

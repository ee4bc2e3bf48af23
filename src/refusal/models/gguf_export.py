"""A weight-edited checkpoint as GGUF, for llama.cpp users, built from the GGUF the model was packaged as.

The edit (an exported ablation) changes only the matrices that write the residual stream. So the new file is the
packaged one with those tensors replaced by their edited float32 values, and every other tensor copied byte for byte
in its original quantisation, with all of the file's metadata (tokenizer and chat template included). An untied
unembedding (the export unties it when it edits a shared embedding) becomes GGUF's ``output.weight``, which tells
readers the model is no longer tied. The file is then loaded back with transformers' ``gguf_file=`` and its logits
are compared with the model that the edit was checked against: a file that does not load or does not match is not
kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import nn

from refusal.artifacts import atomic_target
from refusal.errors import ModelSourceError
from refusal.models.bundle import ModelBundle
from refusal.models.gguf_package import GGUFPackageSpec, assemble_gguf

log = logging.getLogger(__name__)

#: Largest |logit| gap to the edited model the reloaded GGUF may show (float32 weights on both sides: rounding only).
ROUNDTRIP_TOLERANCE = 1e-3


def edited_tensors(original: nn.Module, exported: Path) -> dict[str, torch.Tensor]:
    """The parameters of the checkpoint folder ``exported`` that ``original`` does not have with the same values: the
    edited writes, and an unembedding the export untied. Read one tensor at a time, so only those are held."""
    from safetensors import safe_open

    params = dict(original.named_parameters())  # a tied unembedding is listed once, under the embedding's name
    changed = {}
    for file in sorted(exported.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                value = fh.get_tensor(name)
                if name not in params or not torch.equal(params[name].detach().to(value.dtype).cpu(), value):
                    changed[name] = value
    return changed


def write_edited_gguf(source: Path, changed: Mapping[str, torch.Tensor], out: Path) -> Path:
    """``source`` with the tensors of ``changed`` (Hugging Face names) replaced or added as float32."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    model_arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    if model_arch is None:
        raise ModelSourceError(f"{source}: GGUF architecture {arch!r} is unknown to gguf {gguf.__version__}")
    names = gguf.get_tensor_name_map(model_arch, int(reader.fields[f"{arch}.block_count"].contents()))
    replaced = {}
    for hf_name, value in changed.items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelSourceError(f"cannot export {hf_name} to GGUF ({arch}): gguf's name map has no tensor for it; "
                                   "convert the exported folder with llama.cpp's convert_hf_to_gguf.py instead")
        replaced[gguf_name] = value.detach().to(torch.float32).cpu().contiguous().numpy()
    present = {t.name for t in reader.tensors}
    with atomic_target(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
        for field in reader.fields.values():  # as gguf's own gguf_new_metadata.py copies them
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            kind = field.types[0]
            writer.add_key_value(field.name, field.contents(), kind,
                                 sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
        for t in reader.tensors:
            if t.name in replaced:
                writer.add_tensor_info(t.name, replaced[t.name].shape, replaced[t.name].dtype, replaced[t.name].nbytes)
            else:
                writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        added = [name for name in replaced if name not in present]
        for name in added:
            writer.add_tensor_info(name, replaced[name].shape, replaced[name].dtype, replaced[name].nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            if t.name in replaced:
                writer.write_tensor_data(replaced[t.name])
            else:
                writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        for name in added:
            writer.write_tensor_data(replaced[name])
        writer.close()
    return out


def _logits(load: Callable[[], nn.Module], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    model = load().eval()
    with torch.inference_mode():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()


def export_gguf(source: Path, original: nn.Module, exported: Path, out: Path,
                input_ids: Int[torch.Tensor, "batch seq"], attention_mask: Int[torch.Tensor, "batch seq"]) -> float:
    """Write ``out``: the packaged GGUF ``source`` with the edits of the checkpoint folder ``exported`` (made from
    ``original``). Returns the largest |logit| gap between ``out`` loaded with ``gguf_file=`` and ``exported`` on the
    given inputs; a file past :data:`ROUNDTRIP_TOLERANCE` is removed and raises. One model is held at a time."""
    from transformers import AutoModelForCausalLM

    write_edited_gguf(source, edited_tensors(original, exported), out)
    load = dict(dtype=torch.float32, use_kernels=False)
    reference = _logits(lambda: AutoModelForCausalLM.from_pretrained(exported, **load), input_ids, attention_mask)
    try:
        reloaded = _logits(lambda: AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, **load),
                           input_ids, attention_mask)
    except Exception as err:  # whatever transformers raises on a file it cannot read: the file is not kept
        out.unlink(missing_ok=True)
        raise ModelSourceError(f"the GGUF export does not load back with transformers' gguf_file= ({err}); it was "
                               f"removed. Convert {exported} with llama.cpp's convert_hf_to_gguf.py instead") from err
    gap = float((reloaded - reference)[attention_mask.bool()].abs().max())
    if not gap <= ROUNDTRIP_TOLERANCE:
        out.unlink(missing_ok=True)
        raise ModelSourceError(f"the GGUF export loaded back with transformers' gguf_file= differs from the exported "
                               f"checkpoint by {gap:.3g} in logits (tolerance {ROUNDTRIP_TOLERANCE:g}); it was removed. "
                               f"Convert {exported} with llama.cpp's convert_hf_to_gguf.py instead")
    return gap


def export_packaged_gguf(model_cfg: Mapping[str, Any], cache_dir: str | Path, bundle: ModelBundle,
                         probe: Sequence[Sequence[int]], exported: Path, out: Path) -> dict[str, Any]:
    """``intervention.export=true`` on a model packaged as GGUF: the exported checkpoint as GGUF too, checked on the
    ``probe`` prompts (token ids). A failed check is logged and recorded; the checkpoint folder stays."""
    source = assemble_gguf(GGUFPackageSpec.from_config(model_cfg["gguf"]), Path(cache_dir) / "models")
    batch = bundle.pad(probe)
    try:
        gap = export_gguf(source, bundle.model, exported, out, batch.input_ids, batch.attention_mask)
    except ModelSourceError as err:
        log.warning("%s", err)
        return {"error": str(err)}
    log.info("exported %s (loaded back with gguf_file=: logits within %.2g of the exported checkpoint)", out, gap)
    return {"path": str(out), "roundtrip_max_abs_logit_gap": gap}

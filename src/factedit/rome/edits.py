"""Edits as rank-one factors: apply, revert (bitwise), save and load `edits.safetensors`.

A saved edit is kilobytes (u, Λ, layer, module) plus metadata; the base model's fingerprint ties
the file to the weights it was computed on.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from factedit.architectures import as_out_in, get_module
from factedit.errors import FacteditError
from factedit.io import read_safetensors, write_safetensors
from factedit.rome.update import delta_weight

FORMAT = "factedit.edits/1"


@dataclass
class Edit:
    """ΔW = v uᵀ on `module` (out×in view). u: (d_mlp,), v = Λ: (d_model,), both float64.

    key (k̄, (d_mlp,)) and target_value (v*, (d_model,)) are kept for inspection: (W + ΔW) k̄ = v*.
    """

    layer: int
    module: str
    u: torch.Tensor
    v: torch.Tensor
    fact: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    key: torch.Tensor | None = None
    target_value: torch.Tensor | None = None


class WeightBackup(dict):
    """module name -> bit-exact copy of its weight before the first edit touched it."""


@torch.no_grad()
def apply_edits(model, edits: list[Edit], backup: WeightBackup | None = None) -> WeightBackup:
    """W ← W + v uᵀ for each edit in order (in float64, then cast). Returns the backup to revert."""
    backup = WeightBackup() if backup is None else backup
    for edit in edits:
        weight = get_module(model, edit.module).weight
        if edit.module not in backup:
            backup[edit.module] = weight.detach().clone()
        view = as_out_in(model, weight)
        if view.shape != (edit.v.numel(), edit.u.numel()):
            raise FacteditError(f"edit for {edit.module} has shape {(edit.v.numel(), edit.u.numel())} but the module is "
                                f"{tuple(view.shape)}: these edits belong to another model")
        delta = delta_weight(edit.u.to(view.device), edit.v.to(view.device))  # on W's device: no host-to-device copy of ΔW
        view.copy_((view.double() + delta).to(view.dtype))
    return backup


@torch.no_grad()
def revert_edits(model, backup: WeightBackup) -> None:
    """Restore every weight in `backup` bit for bit."""
    for name, original in backup.items():
        get_module(model, name).weight.copy_(original)
    backup.clear()


def save_edits(path, edits: list[Edit], *, base_fingerprint: str, model_name: str) -> None:
    tensors, records = {}, []
    for index, edit in enumerate(edits):
        tensors[f"edit.{index}.u"] = edit.u.double().cpu()
        tensors[f"edit.{index}.v"] = edit.v.double().cpu()
        for name in ("key", "target_value"):
            if getattr(edit, name) is not None:
                tensors[f"edit.{index}.{name}"] = getattr(edit, name).double().cpu()
        records.append({"layer": edit.layer, "module": edit.module, "fact": edit.fact, "info": edit.info})
    metadata = {"format": FORMAT, "base_fingerprint": base_fingerprint, "model": model_name, "edits": json.dumps(records)}
    write_safetensors(Path(path), tensors, metadata)


def load_edits(path, *, base_fingerprint: str | None = None) -> tuple[list[Edit], dict]:
    """Edits in order, and the file's metadata; refuses a file made for other base weights."""
    path = Path(path)
    if path.is_dir():
        path = path / "edits.safetensors"
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise FacteditError(f"{path} is not a factedit edits file (format {metadata.get('format')!r})")
    if base_fingerprint is not None and metadata["base_fingerprint"] != base_fingerprint:
        raise FacteditError(f"{path} was made for model {metadata['model']} (fingerprint {metadata['base_fingerprint']}), "
                            f"not this base model ({base_fingerprint}): load that model, e.g. model={metadata['model']}")
    records = json.loads(metadata["edits"])
    edits = [Edit(r["layer"], r["module"], tensors[f"edit.{i}.u"], tensors[f"edit.{i}.v"], r["fact"], r["info"],
                  tensors.get(f"edit.{i}.key"), tensors.get(f"edit.{i}.target_value")) for i, r in enumerate(records)]
    return edits, metadata

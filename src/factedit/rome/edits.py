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
    """ΔW = v uᵀ on `module` (out×in view), float64: ROME's rank one, u (d_mlp,) and v = Λ (d_model,);
    MEMIT's rank ≤ r for a batch of r facts, u (d_mlp, r) and v (d_model, r).

    key and target_value are kept for inspection: (W + ΔW) key = target_value, k̄ (d_mlp,) and
    v* (d_model,) for ROME, the batch's keys (r, d_mlp) and what they now give (r, d_model) for MEMIT.
    fact: the fact written (ROME), or {"facts": [...]} (MEMIT: the batch, on each layer's edit).
    """

    layer: int
    module: str
    u: torch.Tensor
    v: torch.Tensor
    fact: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    key: torch.Tensor | None = None
    target_value: torch.Tensor | None = None
    written_keys: torch.Tensor | None = None  # (n, d_mlp) every key whose value the edit sets (not saved)


class WeightBackup(dict):
    """module name -> bit-exact copy of its weight before the first edit touched it."""


class Edits(list):
    """The edits made, in order; `.backup` restores the weights they changed (revert_edits)."""

    backup: WeightBackup


@torch.no_grad()
def apply_edits(model, edits: list[Edit], backup: WeightBackup | None = None) -> WeightBackup:
    """W ← W + v uᵀ for each edit in order (in float64, then cast). Returns the backup to revert."""
    backup = WeightBackup() if backup is None else backup
    for edit in edits:
        weight = get_module(model, edit.module).weight
        if edit.module not in backup:
            backup[edit.module] = weight.detach().clone()
        view = as_out_in(model, weight)
        if view.shape != (edit.v.shape[0], edit.u.shape[0]):
            raise FacteditError(
                f"edit for {edit.module} has shape {(edit.v.shape[0], edit.u.shape[0])} but the module is "
                f"{tuple(view.shape)}: these edits belong to another model"
            )
        # ΔW on W's device: no host-to-device copy of a d_model × d_mlp matrix
        delta = delta_weight(edit.u.to(view.device), edit.v.to(view.device))
        view.copy_((view.double() + delta).to(view.dtype))
    return backup


@torch.no_grad()
def revert_edits(model, backup: WeightBackup) -> None:
    """Restore every weight in `backup` bit for bit."""
    for name, original in backup.items():
        get_module(model, name).weight.copy_(original)
    backup.clear()


def save_edits(path, edits: list[Edit], *, base_fingerprint: str, model_name: str,
               extra_tensors: dict | None = None, extra_metadata: dict | None = None) -> None:  # fmt: skip
    """edits.safetensors (atomically): each edit's factors, key and target_value in float64, its layer,
    module, fact and info as JSON; extra_tensors / extra_metadata travel in the same file."""
    tensors, records = dict(extra_tensors or {}), []
    for index, edit in enumerate(edits):
        for name in ("u", "v", "key", "target_value"):
            if getattr(edit, name) is not None:
                tensors[f"edit.{index}.{name}"] = getattr(edit, name).double().cpu()
        records.append({"layer": edit.layer, "module": edit.module, "fact": edit.fact, "info": edit.info})
    metadata = {**(extra_metadata or {}), "format": FORMAT, "base_fingerprint": base_fingerprint, "model": model_name,
                "edits": json.dumps(records)}  # fmt: skip
    write_safetensors(Path(path), tensors, metadata)


def load_edits(path, *, base_fingerprint: str | None = None) -> tuple[list[Edit], dict]:
    """Edits in order, and the file's metadata; refuses a file made for other base weights."""
    edits, metadata, _ = load_edits_and_extras(path, base_fingerprint=base_fingerprint)
    return edits, metadata


def load_edits_and_extras(path, *, base_fingerprint: str | None = None) -> tuple[list[Edit], dict, dict]:
    """load_edits, and the file's tensors that are not edits (save_edits' extra_tensors)."""
    path = Path(path)
    if path.is_dir():
        path = path / "edits.safetensors"
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise FacteditError(f"{path} is not a factedit edits file (format {metadata.get('format')!r})")
    if base_fingerprint is not None and metadata["base_fingerprint"] != base_fingerprint:
        raise FacteditError(
            f"{path} was made for model {metadata['model']} (fingerprint {metadata['base_fingerprint']}), "
            f"not this base model ({base_fingerprint}): load that model, e.g. model={metadata['model']}"
        )
    records = json.loads(metadata["edits"])
    edits = []
    for i, r in enumerate(records):
        u, v, key, target = (tensors.get(f"edit.{i}.{name}") for name in ("u", "v", "key", "target_value"))
        edits.append(Edit(r["layer"], r["module"], u, v, r["fact"], r["info"], key, target))
    extras = {name: t for name, t in tensors.items() if not name.startswith("edit.")}
    return edits, metadata, extras


def facts_of(edits: list[Edit]) -> list[dict]:
    """The facts the edits wrote, in order, each once (a MEMIT batch's facts are on each of its layers' edits)."""
    seen, facts = set(), []
    for edit in edits:
        for fact in edit.fact.get("facts", [edit.fact]) if edit.fact else []:
            key = (fact.get("subject"), fact.get("prompt"), fact.get("target_new"))
            if key not in seen:
                seen.add(key)
                facts.append(fact)
    return facts

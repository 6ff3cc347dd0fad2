"""Edits as rank-one factors: apply, revert (bitwise), save and load `edits.safetensors`.

A saved edit is kilobytes (u, Λ, layer, module) plus metadata; the base model's fingerprint ties
the file to the weights it was computed on.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from factedit.architectures import as_out_in, get_module
from factedit.errors import FacteditError
from factedit.io import read_safetensors, write_safetensors
from factedit.models import base_fingerprint, remember_base
from factedit.rome.update import delta_weight

FORMAT = "factedit.edits/1"
EDIT_TENSORS = ("u", "v", "key", "target_value")  # an edit's tensors: edit.<index>.<name>
FLOAT_DTYPES = ("float64", "float32", "bfloat16", "float16")  # weight dtypes an edit may be computed on


@dataclass
class Edit:
    """ΔW = v uᵀ on `module` (out×in view), float64: ROME's rank one, u (d_mlp,) and v = Λ (d_model,);
    MEMIT's rank ≤ r for a batch of r facts, u (d_mlp, r) and v (d_model, r).

    key and target_value are kept for inspection: (W + ΔW) key = target_value, k̄ (d_mlp,) and
    v* (d_model,) for ROME, the batch's keys (r, d_mlp) and what they now give (r, d_model) for MEMIT.
    fact: the fact written (ROME), or {"facts": [...]} (MEMIT: the batch, on each layer's edit).
    weight_dtype: the dtype of the weights the edit was computed on ("float32", "bfloat16", ...; set when an
    edit just made is first applied), which bounds how far the recorded target_value can be from what the
    edit gives on weights of another dtype. None: not known (files of older versions).
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
    weight_dtype: str | None = None


class WeightBackup(dict):
    """module name -> bit-exact copy of its weight before the first edit touched it."""


class Edits(list):
    """The edits made, in order; `.backup` restores the weights they changed (revert_edits)."""

    backup: WeightBackup


# An applied edit must give its recorded target_value at its key, up to two things an honest edit does:
# - rounding W + ΔW to the weight's dtype moves each entry by at most eps/2 of it, so a key row by at most
#   eps/2 · ‖|W'| |k|‖ however the roundings add up; ROUNDING_ULPS · eps is twice that. eps is that of the
#   coarser of the weight's dtype and the one the edit was computed on, as float32 and bfloat16 copies of the
#   same weights differ by as much. Honest edits miss by ~1% of it (the roundings mostly cancel). More is not
#   safer: at 16 eps a third of u sign-flipped passed on bfloat16 weights (SmolLM2-135M, tiny models), since
#   ‖|W'| |k|‖ grows with d_in faster than ΔW k does;
# - RELATIVE_MISS of the change ΔW k the edit writes, for sums taken in another order (another device).
# A third of u sign-flipped misses by 0.3-9x ΔW k on float32 weights, by 4x the allowance or more on bfloat16.
RELATIVE_MISS = 0.05
ROUNDING_ULPS = 1
FIX = "restore it from a backup, or delete it and make its edits again with the command that made them"  # a file's
APPLY_FIX = "restore the edits file from a backup, or make the edits again with the command that made them"


@torch.no_grad()
def apply_edits(model, edits: list[Edit], backup: WeightBackup | None = None) -> WeightBackup:
    """W ← W + v uᵀ for each edit in order (in float64, then cast). Returns the backup to revert.

    Every edit's shape is checked before any weight changes. An edit with key and target_value must then
    give (W + ΔW) key ≈ target_value on the weights as it leaves them (earlier edits included, as they were
    when it was recorded); if one does not, the weights this call changed are restored bit for bit (and
    dropped from `backup` when this call put them there) and a one-line FacteditError names the edit.
    """
    backup = WeightBackup() if backup is None else backup
    views = [_fitting_view(model, index, edit) for index, edit in enumerate(edits)]
    base = base_fingerprint(model)  # the base weights' fingerprint follows the model through edits
    before = {}  # module -> its weight when this call began (its backup when this call made that)
    added = set()  # modules this call put into `backup`
    try:
        for index, (edit, view) in enumerate(zip(edits, views)):
            weight = get_module(model, edit.module).weight
            if edit.module not in backup:
                backup[edit.module] = weight.detach().clone()
                added.add(edit.module)
            if edit.module not in before and (edit.module in added or index < len(edits) - 1):
                # an edit is checked before it is written, so only a later edit's failure needs this copy
                before[edit.module] = backup[edit.module] if edit.module in added else weight.detach().clone()
            view.copy_(_checked_weight(index, edit, view))
            if edit.weight_dtype is None and edit.written_keys is not None:
                # made in this process (the editors set written_keys, which is never saved) on these weights
                edit.weight_dtype = str(view.dtype).removeprefix("torch.")
    except BaseException:
        for name, original in before.items():
            get_module(model, name).weight.copy_(original)
        for name in added:
            del backup[name]
        raise
    remember_base(model, base)
    return backup


def _fitting_view(model, index: int, edit: Edit) -> torch.Tensor:
    """The (out, in) view of the weight `edit` changes, after checking the edit's factors fit it."""
    try:
        weight = model.get_submodule(edit.module).weight
    except AttributeError:
        raise FacteditError(
            f"edit {index} changes {edit.module!r}, which this {type(model).__name__} has no weight of: "
            f"these edits belong to another model"
        ) from None
    view = as_out_in(model, weight)
    problem = edit_problem(edit)
    if problem:
        raise FacteditError(f"edit {index} ({edit.module}): {problem}: {APPLY_FIX}")
    if view.shape != (edit.v.shape[0], edit.u.shape[0]):
        raise FacteditError(
            f"edit {index} for {edit.module} has shape {(edit.v.shape[0], edit.u.shape[0])} but the module is "
            f"{tuple(view.shape)}: these edits belong to another model"
        )
    return view


def _checked_weight(index: int, edit: Edit, view: torch.Tensor) -> torch.Tensor:
    """W + ΔW cast to the weight's dtype, on its device (no host-to-device copy of a d_out × d_in matrix),
    after checking it gives the edit's target_value at its key (when the edit recorded both)."""
    u, v = edit.u.to(view.device), edit.v.to(view.device)
    exact = view.double().add_(delta_weight(u, v))
    written = exact.to(view.dtype, copy=True)
    if edit.key is not None and edit.target_value is not None:
        eps = max(torch.finfo(view.dtype).eps, torch.finfo(recorded_dtype(edit)).eps)
        miss, allowed = written_miss(exact.copy_(written), eps, edit.key, edit.target_value, u, v)
        failing = ~(miss <= allowed)  # `~(<=)`: a NaN miss fails too
        if failing.any():
            row = int(torch.argmax(failing.double() * (miss - allowed).nan_to_num(torch.inf)))
            raise FacteditError(
                f"edit {index} ({edit.module}) does not give its recorded target_value at its key "
                f"(off by {miss[row]:.3g}, at most {allowed[row]:.3g} allowed): the edits were changed or damaged, "
                f"or belong to other weights; the weights were left as they were: {APPLY_FIX}"
            )
    return written


def recorded_dtype(edit: Edit) -> torch.dtype:
    """The dtype of the weights `edit` was computed on; when not known, the coarsest factedit edits (bfloat16)."""
    return getattr(torch, edit.weight_dtype) if edit.weight_dtype else torch.bfloat16


def written_miss(weight: torch.Tensor, eps: float, key: torch.Tensor, target_value: torch.Tensor,
                 u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per key row, ‖W'k − t‖ and what an honest edit may miss by: two (r,) float64 tensors.

    weight: W' = W + ΔW as written, in float64 (d_out, d_in), overwritten by |W'|; eps: of the coarser of the
    weight's dtype and the one the edit was computed on; key (d_in,) or (r, d_in); target_value (d_out,) or
    (r, d_out); u, v: the edit's factors.
    """
    keys = key.to(weight).reshape(-1, weight.shape[1])
    targets = target_value.to(weight).reshape(-1, weight.shape[0])
    miss = (keys @ weight.T - targets).norm(dim=1)
    change = (keys @ u.to(weight).reshape(weight.shape[1], -1)) @ v.to(weight).reshape(weight.shape[0], -1).T  # ΔW k
    rounding = keys.abs() @ weight.abs_().T  # |W'| |k|: what the rounding of each entry can add up to
    allowed = RELATIVE_MISS * change.norm(dim=1) + ROUNDING_ULPS * eps * rounding.norm(dim=1)
    return miss, allowed


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
        for name in EDIT_TENSORS:
            if getattr(edit, name) is not None:
                tensors[f"edit.{index}.{name}"] = getattr(edit, name).double().cpu()
        records.append({"layer": edit.layer, "module": edit.module, "fact": edit.fact, "info": edit.info})
        if edit.weight_dtype is not None:
            records[-1]["weight_dtype"] = edit.weight_dtype
    metadata = {**(extra_metadata or {}), "format": FORMAT, "base_fingerprint": base_fingerprint, "model": model_name,
                "edits": json.dumps(records)}  # fmt: skip
    write_safetensors(Path(path), tensors, metadata)


def load_edits(path, *, base_fingerprint: str | None = None) -> tuple[list[Edit], dict]:
    """Edits in order, and the file's metadata; refuses a file made for other base weights."""
    edits, metadata, _ = load_edits_and_extras(path, base_fingerprint=base_fingerprint)
    return edits, metadata


def load_edits_and_extras(path, *, base_fingerprint: str | None = None) -> tuple[list[Edit], dict, dict]:
    """load_edits, and the file's tensors that are not edits (save_edits' extra_tensors).

    Anything malformed (a changed file, metadata or tensors missing or of the wrong kind) is a one-line
    FacteditError naming the file, the problem and the fix.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "edits.safetensors"
    tensors, metadata = read_safetensors(path, fix=FIX)
    if metadata.get("format") != FORMAT:
        raise FacteditError(f"{path} is not a factedit edits file (format {metadata.get('format')!r})")
    missing = [key for key in ("base_fingerprint", "model", "edits") if key not in metadata]
    if missing:
        raise FacteditError(f"{path} has no {' or '.join(missing)} in its metadata: {FIX}")
    if base_fingerprint is not None and metadata["base_fingerprint"] != base_fingerprint:
        raise FacteditError(
            f"{path} was made for model {metadata['model']} (fingerprint {metadata['base_fingerprint']}), "
            f"not this base model ({base_fingerprint}): load that model, e.g. model={metadata['model']}"
        )
    records = _records(path, metadata["edits"])
    edits = [_edit_of(path, index, record, tensors) for index, record in enumerate(records)]
    _check_no_stray_tensors(path, tensors, len(records))
    extras = {name: t for name, t in tensors.items() if not name.startswith("edit.")}
    return edits, metadata, extras


def _records(path: Path, text: str) -> list[dict]:
    """The `edits` metadata entry: a JSON list of {layer: int, module: str, fact: dict, info: dict}."""
    try:
        records = json.loads(text)
    except ValueError as error:
        raise FacteditError(f"{path}: its `edits` metadata is not valid JSON ({error}): {FIX}") from None
    if not isinstance(records, list):
        raise FacteditError(f"{path}: its `edits` metadata is a {type(records).__name__}, not a list of edits: {FIX}")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise FacteditError(f"{path}: edit {index}'s record is a {type(record).__name__}, not an object: {FIX}")
        # bool is an int in Python, but never a layer
        if not isinstance(record.get("layer"), int) or isinstance(record["layer"], bool):
            raise FacteditError(f"{path}: edit {index} has no integer layer: {FIX}")
        if not isinstance(record.get("module"), str) or not re.fullmatch(r"[\w.]+", record["module"]):
            raise FacteditError(f"{path}: edit {index} has no module name (a dotted name): {FIX}")
        if not all(isinstance(record.get(name, {}), dict) for name in ("fact", "info")):
            raise FacteditError(f"{path}: edit {index}'s fact or info is not an object: {FIX}")
        if "weight_dtype" in record and record["weight_dtype"] not in FLOAT_DTYPES:
            raise FacteditError(f"{path}: edit {index}'s weight_dtype is not one of {', '.join(FLOAT_DTYPES)}: {FIX}")
    return records


def _edit_of(path: Path, index: int, record: dict, tensors: dict) -> Edit:
    """Edit `index` of a file from its record and its tensors edit.<index>.{u, v, key, target_value}."""
    u, v, key, target = (tensors.get(f"edit.{index}.{name}") for name in EDIT_TENSORS)
    if u is None or v is None:
        raise FacteditError(f"{path}: edit {index} has no tensor edit.{index}.{'u' if u is None else 'v'}: {FIX}")
    fact, info, dtype = record.get("fact", {}), record.get("info", {}), record.get("weight_dtype")
    edit = Edit(record["layer"], record["module"], u, v, fact, info, key, target, weight_dtype=dtype)
    problem = edit_problem(edit)
    if problem:
        raise FacteditError(f"{path}: edit {index} ({edit.module}): {problem}: {FIX}")
    return edit


def _check_no_stray_tensors(path: Path, tensors: dict, count: int) -> None:
    """Every edit.* tensor belongs to one of the `count` records (else the records lost an edit)."""
    names = {f"edit.{index}.{name}" for index in range(count) for name in EDIT_TENSORS}
    stray = sorted(name for name in tensors if name.startswith("edit.") and name not in names)
    if stray:
        raise FacteditError(f"{path} holds {stray[0]}, which belongs to none of its {count} edit records: {FIX}")


def edit_problem(edit: Edit) -> str:
    """What makes `edit` unusable, in a few words, or "" when nothing does: u (d_in,) with v (d_out,), or
    u (d_in, r) with v (d_out, r); key (d_in,) or (r, d_in) with target_value (d_out,) or (r, d_out); all finite."""
    u, v = edit.u, edit.v
    if not isinstance(u, torch.Tensor) or not isinstance(v, torch.Tensor):
        return "it has no u or no v"
    if u.dim() != v.dim() or u.dim() not in (1, 2) or (u.dim() == 2 and u.shape[1] != v.shape[1]):
        return f"u {tuple(u.shape)} and v {tuple(v.shape)} are not the factors of one edit"
    named = {"u": u, "v": v, "key": edit.key, "target_value": edit.target_value}
    for name, tensor in named.items():
        if tensor is not None and not tensor.is_floating_point():
            return f"{name} is {tensor.dtype}, not floating point"
        if tensor is not None and not torch.isfinite(tensor).all():
            return f"{name} holds non-finite values"
    return _pair_problem(edit.key, edit.target_value, u.shape[0], v.shape[0])


def _pair_problem(key, target_value, d_in: int, d_out: int) -> str:
    """What is wrong with an edit's (key, target_value) for factors of d_in and d_out, or ""."""
    if key is None or target_value is None:
        return ""  # nothing to check the edit against (MEMIT sets target_value just after applying)
    rows = key.shape[:-1]  # () for ROME's one key, (r,) for a MEMIT batch's
    if key.dim() not in (1, 2) or key.shape[-1] != d_in or target_value.shape != (*rows, d_out):
        shapes = f"key {tuple(key.shape)} and target_value {tuple(target_value.shape)}"
        return f"{shapes} do not fit u ({d_in}, ...) and v ({d_out}, ...)"
    return ""


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

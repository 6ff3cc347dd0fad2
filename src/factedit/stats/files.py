"""Key-statistics files: where they live, what they hold, and the checks made when reading them.

    stats/<model>/<module>/<source>-<tokens>.safetensors           the result
        second_moment  (d_mlp, d_mlp) float32    C = E[k kᵀ] = key_outer_sum / count
        count          ()            int64       number of keys (tokens)
    stats/<model>/<module>/<source>-<tokens>.partial.safetensors   an unfinished pass
        key_outer_sum  (d_mlp, d_mlp) float64    Σ k kᵀ over rows 0..rows_done-1
        count          ()            int64

Metadata (strings): format, code_version, model, fingerprint, module, layer, source, tokens,
seq_len, seed, dtype, precision; a partial file adds rows_done and num_rows.
"""
import importlib.metadata
import logging
import re
from pathlib import Path

import torch

import factedit.paths
from factedit.architectures import as_out_in, check_layer, module_name, rewrite_weight
from factedit.errors import FacteditError
from factedit.io import read_safetensors, write_safetensors
from factedit.models import base_fingerprint

log = logging.getLogger(__name__)
FORMAT = "factedit-stats/1"
DEFAULT_SOURCE = "wiki_offline"
_RESULT_NAME = re.compile(r"^(?P<source>[A-Za-z0-9_+]+)-(?P<tokens>\d+)\.safetensors$")
# Metadata a partial file must share with the run that continues it.
RESUME_KEYS = ("format", "fingerprint", "module", "source", "tokens", "seq_len", "seed")


def code_version() -> str:
    try:
        return f"factedit {importlib.metadata.version('factedit')}, {FORMAT}"
    except importlib.metadata.PackageNotFoundError:
        return f"factedit (not installed), {FORMAT}"


def model_name(model) -> str:
    """Registry name set by load_model (config.factedit_name), else the hub id with '/' replaced."""
    name = getattr(model.config, "factedit_name", None) or getattr(model.config, "_name_or_path", "") or model.config.model_type
    return str(name).replace("/", "_")


def key_dim(model, layer: int) -> int:
    """d_mlp: the width of the rewrite module's input k."""
    return as_out_in(model, rewrite_weight(model, layer)).shape[1]


def stats_dir_of(stats_dir=None) -> Path:
    return Path(stats_dir) if stats_dir is not None else factedit.paths.STATS_DIR


def stats_path(stats_dir, model: str, module: str, source: str, tokens: int) -> Path:
    return stats_dir_of(stats_dir) / model / module / f"{source}-{tokens}.safetensors"


def partial_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".safetensors") + ".partial.safetensors")


def fix_command(model: str, layer, source: str | None = None, tokens: int | None = None, force=False) -> str:
    """The precompute_stats.py command that writes the missing file(s) of `layer` (an int or a list)."""
    layers = ",".join(str(v) for v in layer) if isinstance(layer, (list, tuple)) else layer
    command = f"python src/precompute_stats.py model={model} layers=[{layers}]"
    if source and source != DEFAULT_SOURCE:
        command += f" data.source={source}"
    if tokens:
        command += f" data.max_tokens={tokens}"
    return command + (" force=true" if force else "")


# ---------------------------------------------------------------- write

def write_result(path: Path, key_outer_sum: torch.Tensor, count: torch.Tensor, metadata: dict) -> None:
    """The finished file: C = key_outer_sum / count as float32, and count."""
    count = torch.as_tensor(count, dtype=torch.long).cpu()
    second_moment = (key_outer_sum.double().cpu() / count).to(torch.float32)
    write_safetensors(path, {"second_moment": second_moment, "count": count},
                      {**metadata, "tokens": int(count), "dtype": "float32"})


def write_partial(path: Path, key_outer_sum: torch.Tensor, count: torch.Tensor, metadata: dict, rows_done: int) -> None:
    """The raw float64 sums of an unfinished pass, with the number of rows they cover."""
    tensors = {"key_outer_sum": key_outer_sum.double(), "count": torch.as_tensor(count, dtype=torch.long)}
    write_safetensors(partial_path(path), tensors, {**metadata, "dtype": "float64", "rows_done": rows_done})


# ---------------------------------------------------------------- read

def read_partial(path: Path, metadata: dict) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(key_outer_sum, count, rows_done) saved by an interrupted run of the same settings, or None.

    A partial file of other settings is an error, not overwritten, so its work is never lost.
    """
    partial = partial_path(path)
    if not partial.is_file():
        return None
    tensors, saved = read_safetensors(partial, fix="delete it and rerun to start over")
    for key in RESUME_KEYS:
        if saved.get(key) != str(metadata[key]):
            raise FacteditError(f"{partial} was accumulated with {key}={saved.get(key)}, this run has {key}={metadata[key]}: "
                                f"rerun with the settings of that run to finish it, or delete it to start over")
    if "key_outer_sum" not in tensors or "count" not in tensors or "rows_done" not in saved:
        raise FacteditError(f"{partial} lacks key_outer_sum, count or rows_done: delete it and rerun to start over")
    return tensors["key_outer_sum"], tensors["count"], int(saved["rows_done"])


def read_result(path: Path, model, layer: int, fingerprint: str | None = None) -> tuple[torch.Tensor, dict]:
    """C (float32, CPU) and metadata of a finished file, after checking it belongs to `model` at `layer`."""
    name, module = model_name(model), module_name(model, "rewrite", layer)
    match = _RESULT_NAME.match(path.name)
    redo = f"run `{fix_command(name, layer, match and match['source'], match and int(match['tokens']), force=True)}`"
    tensors, metadata = read_safetensors(path, fix=f"restore it from a backup, or {redo}")
    second_moment, count = tensors.get("second_moment"), tensors.get("count")
    if second_moment is None or count is None:
        raise FacteditError(f"{path} has no second_moment or count tensor: delete it and {redo}")
    if metadata.get("module") != module:
        raise FacteditError(f"{path} holds statistics of {metadata.get('module')}, not {module}: move it to its folder or {redo}")
    fingerprint = fingerprint or base_fingerprint(model)
    if metadata.get("fingerprint") != fingerprint:
        raise FacteditError(f"{path} was computed for other weights (fingerprint {metadata.get('fingerprint')}, "
                            f"this {name} has {fingerprint}): {redo}")
    d_mlp = key_dim(model, layer)
    if tuple(second_moment.shape) != (d_mlp, d_mlp):
        raise FacteditError(f"{path} holds a {tuple(second_moment.shape)} matrix, layer {layer} needs ({d_mlp}, {d_mlp}): {redo}")
    tokens = int(count)
    if tokens <= 0 or metadata.get("tokens") != str(tokens) or (match and int(match["tokens"]) != tokens):
        raise FacteditError(f"{path} has an inconsistent token count (count {tokens}, metadata {metadata.get('tokens')}): "
                            f"delete it and {redo}")
    problem = second_moment_problem(second_moment)
    if problem:
        raise FacteditError(f"{path} {problem}, which no E[k kᵀ] does: restore it from a backup, or {redo}")
    return second_moment.to(torch.float32), metadata


# |C_ij − C_ji| allowed, relative to √(C_ii C_jj) (≥ |C_ij| for any E[k kᵀ]): float32 sums of kᵀk per batch
# may round C_ij and C_ji apart by a few ulps (~1e-7 each); a changed entry is off by far more.
SYMMETRY_TOLERANCE = 1e-4


def second_moment_problem(second_moment: torch.Tensor, rows_at_once: int = 1024) -> str:
    """What a square C (d, d) holds that no second moment E[k kᵀ] does, in a few words, or "":
    non-finite values, a negative diagonal, or C ≠ Cᵀ. Compared a block of rows at a time (a d² copy is GBs)."""
    if not second_moment.is_floating_point() or not torch.isfinite(second_moment).all():
        return "holds non-finite values"
    diagonal = second_moment.diagonal().double()
    if (diagonal < 0).any():
        return f"has a negative diagonal entry ({diagonal.min():.3g})"
    root = diagonal.sqrt()
    for start in range(0, len(second_moment), rows_at_once):
        rows = slice(start, start + rows_at_once)
        asymmetry = (second_moment[rows].double() - second_moment[:, rows].T.double()).abs()
        if (asymmetry > SYMMETRY_TOLERANCE * torch.outer(root[rows], root)).any():
            return "is not symmetric"
    return ""


def result_files(folder: Path) -> list[tuple[str, int, Path]]:
    """(source, tokens, path) of the finished files in a module's folder."""
    if not folder.is_dir():
        return []
    return [(m["source"], int(m["tokens"]), p) for p in sorted(folder.iterdir()) if (m := _RESULT_NAME.match(p.name))]


class MissingStatistics(FacteditError):
    """No statistics file for a layer; keeps what the fix command needs."""

    def __init__(self, message: str, model: str, layer: int, source: str | None, tokens: int | None):
        super().__init__(message)
        self.model, self.layer, self.source, self.tokens = model, layer, source, tokens


def load_second_moment(model, layer: int, *, source: str | None = None, tokens: int | None = None,
                       stats_dir=None) -> torch.Tensor:
    """C = E[k kᵀ] for the rewrite module of `layer`: second_moment (d_mlp, d_mlp) float32 on CPU.

    Without source/tokens: the file with the most tokens (any source; on a tie the default source).
    Raises FacteditError naming the command that creates a missing file.
    """
    layer = check_layer(model, layer)
    name, module = model_name(model), module_name(model, "rewrite", layer)
    folder = stats_dir_of(stats_dir) / name / module
    candidates = [(s, t, p) for s, t, p in result_files(folder)
                  if (source is None or s == source) and (tokens is None or t == tokens)]
    if not candidates:
        others = [p.name for _, _, p in result_files(folder)]
        wanted = "".join([f" source={source}" if source else "", f" tokens={tokens}" if tokens else ""])
        found = f" (found only {', '.join(others)})" if others else ""
        if any(folder.glob("*.partial.safetensors")):
            found += " (an interrupted run left a .partial file: the same command continues it)"
        raise MissingStatistics(f"no key statistics for {name} layer {layer}{wanted}{found}: "
                                f"run `{fix_command(name, layer, source, tokens)}`", name, layer, source, tokens)
    _, _, path = max(candidates, key=lambda c: (c[1], c[0] == DEFAULT_SOURCE))
    second_moment, _ = read_result(path, model, layer)
    return second_moment


def second_moment_for(model, tokenizer, layer: int, stats_cfg) -> torch.Tensor:
    """C of the rewrite module at `layer` as an entry point's `stats:` options ask (dir, source, tokens);
    with stats.auto, a missing file is computed first over stats.auto_tokens tokens."""
    from factedit.stats.collect import compute_second_moment

    where = dict(stats_dir=stats_cfg.get("dir"))
    try:
        return load_second_moment(model, layer, source=stats_cfg.source, tokens=stats_cfg.tokens, **where)
    except FacteditError:
        if not stats_cfg.auto:
            raise
    log.info("no key statistics yet: computing %d tokens first (stats.auto=true)", stats_cfg.auto_tokens)
    compute_second_moment(model, tokenizer, [layer], max_tokens=int(stats_cfg.auto_tokens), **where)
    return load_second_moment(model, layer, **where)


def second_moments(model, layers, load_one) -> dict:
    """{layer: C} for a range of layers, load_one(layer) -> C; every layer without statistics named in
    one error with the one command that computes them all."""
    found, missing = {}, []
    for layer in [check_layer(model, layer) for layer in layers]:
        try:
            found[layer] = load_one(layer)
        except MissingStatistics as error:
            missing.append(error)
    if len(missing) == 1:
        raise missing[0]
    if missing:
        first, layers = missing[0], [error.layer for error in missing]
        raise FacteditError(f"no key statistics for {first.model} layers {', '.join(map(str, layers))}: "
                            f"run `{fix_command(first.model, layers, first.source, first.tokens)}`")  # fmt: skip
    return found


def second_moment_from(stats, model, layer: int) -> torch.Tensor:
    """C for `layer` from what an API caller passed: {layer: C}, a callable layer -> C, or None (the stats file)."""
    if stats is None:
        return load_second_moment(model, layer)
    return stats(layer) if callable(stats) else stats[layer]

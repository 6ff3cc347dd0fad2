"""ROME end to end for a list of facts: templates → v* (and k̄, from the same run at δ = 0) → (u, Λ) → W + Λuᵀ, in order."""
import logging
import time
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from factedit.architectures import as_out_in, check_layer, get_module, module_name
from factedit.errors import FacteditError
from factedit.rome.compute_value import compute_value
from factedit.rome.context import context_templates
from factedit.rome.edits import Edit, WeightBackup, apply_edits
from factedit.rome.facts import Fact, fact_from_config
from factedit.rome.low_precision import resolve_bf16
from factedit.rome.update import rank_one_update

log = logging.getLogger(__name__)
UPDATES = ("fixed", "original", "two_keys")  # see update.py

DEFAULT_HPARAMS = dict(layer=5, v_num_grad_steps=20, v_lr=0.5, v_weight_decay=0.5, clamp_norm_factor=4.0,
                       kl_factor=0.0625, loss_threshold=0.05, stop_on="nll", context_templates=[[5, 10], [10, 10]], update="two_keys",
                       fast=True, fused_activations=True, tf32=True, cuda_graph=True, graph_cache=8, bf16="auto", seed=0, role="rewrite")


class Edits(list):
    """The edits made, in order; `.backup` restores the weights they changed (revert_edits)."""

    backup: WeightBackup


def resolve_hparams(model, hparams=None) -> dict:
    """Defaults, then the model registry entry's `rome:` block, then `hparams`."""
    from factedit.models import model_config

    merged = dict(DEFAULT_HPARAMS)
    name = getattr(model.config, "factedit_name", None)
    if name:
        try:
            merged.update(OmegaConf.to_container(model_config(name).get("rome", {})))
        except FacteditError:
            pass
    if hparams:
        merged.update(OmegaConf.to_container(hparams) if OmegaConf.is_config(hparams) else hparams)
    return merged


def _second_moment(stats, model, layer: int) -> torch.Tensor:
    if stats is None:
        from factedit.stats import load_second_moment

        return load_second_moment(model, layer)
    return stats(layer) if callable(stats) else stats[layer]


def edit_one(model, tokenizer, fact: Fact, second_moment: torch.Tensor, hp: dict, trainer_kwargs=None) -> Edit:
    """Compute one ROME edit on the current weights (the model is left unchanged)."""
    layer = check_layer(model, hp["layer"])
    if hp["update"] not in UPDATES:  # before the v* fit, not after it
        raise FacteditError(f"editor.update must be one of {', '.join(UPDATES)}, not {hp['update']!r}")
    resolve_bf16(hp.get("bf16", False), model.device)  # a bad editor.bf16 fails here, before the work
    timings, start = {}, time.perf_counter()
    templates = context_templates(model, tokenizer, hp["context_templates"], seed=int(hp["seed"]))  # templates[0]: "{}"
    timings["templates"], start = time.perf_counter() - start, time.perf_counter()
    role = hp["role"]  # "rewrite" (the MLP down-projection) or "attn_out" (the attention output projection)
    value = compute_value(model, tokenizer, fact, layer, templates, hp, trainer_kwargs)  # refuses a known target first
    delta = value.delta.detach().double()
    timings["value"], start = time.perf_counter() - start, time.perf_counter()
    keys = value.template_keys.double()  # the v* fit's δ = 0 run computed them (compute_key.py, without that run)
    key = keys.mean(dim=0)  # k̄
    bare_key = keys[0] if hp["update"] != "fixed" else None  # the bare prompt's key
    timings["key"], start = time.perf_counter() - start, time.perf_counter()
    weight = as_out_in(model, get_module(model, module_name(model, role, layer)).weight)
    residual_key = bare_key if hp["update"] == "original" else key  # the reference code: the bare prompt's key
    target_value = weight.double() @ residual_key + delta  # v*: the value the key should now produce
    u, lam = rank_one_update(weight, second_moment, key, target_value, residual_key=residual_key,
                             also_key=bare_key if hp["update"] == "two_keys" else None)
    timings["update"] = time.perf_counter() - start
    info = {"steps": len(value.history), "final_loss": value.history[-1]["loss"] if value.history else None,
            "p_target": value.history[-1]["p_target"] if value.history else None,
            "delta_norm_ratio": float(delta.norm() / value.initial_value.double().norm()),
            "bf16": value.bf16,  # what editor.bf16 (auto) resolved to on this hardware
            "cuda_graph": value.graph_use,  # None (eager), "captured" or "kept" (replayed a graph kept from an earlier edit)
            "seconds": {k: round(v, 3) for k, v in timings.items()},
            "value_seconds": {k: round(v, 3) for k, v in value.seconds.items()},
            "hparams": {k: (list(map(list, v)) if k == "context_templates" else v) for k, v in hp.items()}}
    return Edit(layer, module_name(model, role, layer), u.cpu(), lam.cpu(), fact.to_dict(), info,
                key=key.cpu(), target_value=(weight.double() @ key + lam * (u @ key)).cpu())


def edit(model, tokenizer, facts, stats=None, hparams=None, trainer_kwargs=None) -> Edits:
    """Edit `facts` one after another (each on the already-edited weights) and apply them.

    facts: Fact, mapping, or a list of them. stats: {layer: C}, a callable layer -> C, or None to load
    the precomputed file. Returns the Edits; `revert_edits(model, edits.backup)` undoes them exactly.
    """
    facts = facts if isinstance(facts, (list, tuple)) else [facts]
    facts = [f if isinstance(f, Fact) else fact_from_config(f) for f in facts]
    hp = resolve_hparams(model, hparams)
    second_moment = _second_moment(stats, model, check_layer(model, hp["layer"]))
    edits = Edits()
    edits.backup = WeightBackup()
    for fact in facts:
        made = edit_one(model, tokenizer, fact, second_moment, hp, trainer_kwargs)
        apply_edits(model, [made], edits.backup)
        edits.append(made)
        log.info("edited %r: %s -> %s (layer %d, %.1fs)", fact.name, fact.text, fact.target_new, made.layer,
                 sum(made.info["seconds"].values()))
    return edits

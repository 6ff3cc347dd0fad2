"""ROME end to end, one fact after another: k̄ → v* → (u, Λ) → W + Λuᵀ.

templates  context.py        the bare prompt plus short texts the model writes itself
k̄          compute_key.py    the rewrite module's input at the subject, averaged over templates
v*         compute_value.py  the output that makes the model say the new object
ΔW = Λuᵀ   update.py         the closed-form rank-one write of (k̄, v*), weighted by C = E[k kᵀ]
"""

import logging
import time

import torch

from factedit.architectures import as_out_in, check_layer, get_module, module_name
from factedit.rome.compute_key import compute_key, template_keys
from factedit.rome.compute_value import compute_value
from factedit.rome.context import context_templates
from factedit.rome.edits import Edit, Edits, WeightBackup, apply_edits, revert_edits
from factedit.rome.facts import as_facts, fact_texts
from factedit.rome.fast import value_engine
from factedit.rome.hparams import RomeHparams, resolve_hparams
from factedit.rome.preserve import null_space_projector, without_keys
from factedit.rome.update import rank_one_update
from factedit.rome.value_batch import value_batch
from factedit.stats.files import second_moment_from
from factedit.tokens import check_prompt_lengths

log = logging.getLogger(__name__)


def edit_one(model, tokenizer, fact, second_moment: torch.Tensor, hp: RomeHparams, trainer_kwargs=None,
             projector: torch.Tensor | None = None) -> Edit:  # fmt: skip
    """Compute one ROME edit on the current weights (the model is left unchanged).
    projector: preserve.py's P in place of C⁻¹ (preserve=null_space)."""
    layer, clock = check_layer(model, hp.layer), _Clock()
    templates = context_templates(model, tokenizer, hp.context_templates, seed=hp.seed)  # templates[0]: "{}"
    batch = value_batch(tokenizer, [fact], templates, model.device)
    clock.lap("templates")
    with value_engine(model, layer, batch, hp) as engine:  # the one pass through the model at δ = 0
        clock.lap("prepare")
        keys = template_keys(engine.zero_run.rewrite_input, batch)[0].double()  # k at each template: (T, d_in)
        key, bare_key = compute_key(keys), keys[0]  # k̄, and the bare prompt's key k₀
        clock.lap("key")
        value = compute_value(engine, [fact], trainer_kwargs)  # δ; refuses a known target first
        clock.lap("value")
    weight = as_out_in(model, get_module(model, module_name(model, hp.role, layer)).weight)
    residual_key = bare_key if hp.update == "original" else key  # the reference code: the bare prompt's key
    target_value = weight.double() @ residual_key + value.delta.detach()[0].double()  # v*: what the key should give
    also_key = bare_key if hp.update == "two_keys" else None
    u, lam = rank_one_update(weight, second_moment, key, target_value, residual_key=residual_key, also_key=also_key,
                             projector=projector)  # fmt: skip
    clock.lap("update")
    written = weight.double() @ key + lam * (u @ key)  # (W + ΔW) k̄
    name = module_name(model, hp.role, layer)
    info = _edit_info(value, engine.bf16, hp, clock.seconds)
    written_keys = torch.stack([key, bare_key] if also_key is not None else [key]).cpu()
    return Edit(layer, name, u.cpu(), lam.cpu(), fact.to_dict(), info, key=key.cpu(), target_value=written.cpu(),
                written_keys=written_keys)  # fmt: skip


def _edit_info(value, bf16: bool, hp: RomeHparams, seconds: dict) -> dict:
    """What an Edit records of its v* fit: steps, final loss and P(target), |δ|/|v₀|, precision, timings, options."""
    history, delta, initial = value.histories[0], value.delta.detach()[0].double(), value.objective.initial_value[0]
    return dict(steps=len(history), final_loss=history[-1]["loss"] if history else None,
                p_target=history[-1]["p_target"] if history else None,
                delta_norm_ratio=float(delta.norm() / initial.double().norm()),
                bf16=bf16,  # what editor.bf16 (auto) resolved to on this hardware
                cuda_graph=getattr(value.stepper, "graph_use", None),  # None (eager), "captured" or "kept"
                seconds=seconds, hparams=hp.to_dict())  # fmt: skip


def edit(
    model, tokenizer, facts, stats=None, hparams=None, trainer_kwargs=None, edited_outer: dict | None = None
) -> Edits:
    """Edit `facts` one after another (each on the already-edited weights) and apply them.

    facts: Fact, mapping, or a list of them. stats: {layer: C}, a callable layer -> C, or None to load
    the precomputed file. hparams: overrides of the model's ROME options (hparams.py), a mapping or
    RomeHparams. edited_outer: {layer: Σ k kᵀ} of keys edited earlier in a run (preserve=null_space
    keeps them; updated in place). Returns the Edits; `revert_edits(model, edits.backup)` undoes them
    exactly; on an error the weights are as they were.
    """
    facts = as_facts(facts)
    check_prompt_lengths(tokenizer, model, fact_texts(facts))
    hp = resolve_hparams(model, hparams)
    layer = check_layer(model, hp.layer)
    second_moment = second_moment_from(stats, model, layer)
    edited_outer = {} if edited_outer is None else edited_outer
    edits = Edits()
    edits.backup = WeightBackup()
    try:
        for fact in facts:
            projector = None
            if hp.preserve == "null_space":
                projector = null_space_projector(second_moment, hp.null_space_threshold)
                projector = without_keys(projector, edited_outer.get(layer))
            made = edit_one(model, tokenizer, fact, second_moment, hp, trainer_kwargs, projector)
            apply_edits(model, [made], edits.backup)
            edits.append(made)
            if hp.preserve == "null_space":  # the keys just written (k̄, and k₀ with two_keys) stay as they now are
                keys = made.written_keys.double()
                edited_outer[layer] = keys.T @ keys + edited_outer.get(layer, 0)
            log.info("edited %r: %s -> %s (layer %d, %.1fs)", fact.name, fact.text, fact.target_new, made.layer,
                     sum(made.info["seconds"].values()))  # fmt: skip
    except BaseException:
        revert_edits(model, edits.backup)
        raise
    return edits


class _Clock:
    """Seconds per part of an edit, for `Edit.info["seconds"]`."""

    def __init__(self):
        self.seconds, self._last = {}, time.perf_counter()

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.seconds[part], self._last = round(now - self._last, 3), now

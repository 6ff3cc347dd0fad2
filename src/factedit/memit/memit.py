"""MEMIT (Meng, Sharma, Andonian, Belinkov, Bau, 2023): a batch of facts into the MLPs of several layers.

templates  rome/context.py        as ROME (MEMIT's own: the bare prompt and 5 prefixes of 10 tokens)
z = v₀+δ   rome/compute_value.py  one fit for the whole batch, δ_f added to the residual stream after
                                  the last layer L of `layers`, at fact f's subject (one δ per fact)
then per layer l of `layers`, in order, each on the weights the layers before it changed:
  K_l      rome/compute_key.py    k̄ of every fact at layer l
  R_l      (z − h_L) / (layers left), h_L the residual stream at L now: each layer takes its share
           (both read by memit/passes.py, each pass starting at the layer updated last)
  ΔW_l     memit/update.py        covariance-weighted least squares (preserve=edited: keeping the run's earlier
                                  edits too), or AlphaEdit's null-space update (preserve=null_space)

carry=targets: the run's earlier facts join the reads, and at each layer their keys as the weights now give them
(later batches' edits of the layers below move them) are written again to the value the layer gave them when
they were written, rows of the same least squares as the batch's (residual: that value − W k_now). With
carry=keys (AlphaEdit) the keys are carried as they were written, and only kept, not written again.
"""

import logging
import time

import torch

from factedit.architectures import as_out_in, check_layer, get_module, module_name
from factedit.errors import FacteditError
from factedit.hooks import run_until
from factedit.memit.passes import LayerPasses
from factedit.memit.shard import sharded_targets
from factedit.memit.update import memit_update, null_space_update
from factedit.rome.compute_value import compute_value
from factedit.rome.context import context_templates
from factedit.rome.edits import Edit, WeightBackup, apply_edits
from factedit.rome.facts import Fact, as_facts
from factedit.rome.fast import value_engine
from factedit.rome.hparams import MemitHparams
from factedit.rome.preserve import null_space_projector
from factedit.rome.value_batch import ValueBatch, value_batch

log = logging.getLogger(__name__)


def edit_batch(model, tokenizer, facts, second_moments: dict, hp: MemitHparams, backup: WeightBackup,
               edited_outer: dict | None = None, trainer_kwargs=None, trainer=None,
               earlier=()) -> list[Edit]:  # fmt: skip
    """Write `facts` (one batch) with MEMIT and apply the edits (their weights' originals go to `backup`).

    second_moments: {layer: C}; edited_outer: {layer: Σ k kᵀ} of the keys written earlier in the run
    (preserve=null_space or edited with carry=keys), updated with this batch's; earlier: the run's earlier MEMIT
    edits (carry=targets writes their facts again); trainer: a Trainer of several processes shares the v* fits
    out (memit/shard.py). Returns one Edit per layer, ΔW = V Uᵀ of rank ≤ F (F + earlier facts with carry=targets).
    """
    layers, start = [check_layer(model, layer) for layer in hp.layers], time.perf_counter()
    templates = context_templates(model, tokenizer, hp.context_templates, seed=hp.seed)
    batch = value_batch(tokenizer, facts, templates, model.device)
    if trainer is not None and trainer.world_size > 1:

        def share(indices):
            return fit_targets(model, tokenizer, [facts[i] for i in indices], templates, hp, trainer_kwargs)

        targets, fits = sharded_targets(trainer, share, len(facts), model.config.hidden_size)
    else:
        targets, fits = fit_targets(model, tokenizer, facts, templates, hp, trainer_kwargs, batch)
    targets, fitted = targets.to(model.device), time.perf_counter()  # z: (F, d_model) float64
    written, n_facts = {"facts": [fact.to_dict() for fact in facts]}, len(facts)
    again, values_of = earlier_targets(earlier, layers, facts) if hp.carry == "targets" else ([], {})
    reads = value_batch(tokenizer, facts + again, templates, model.device) if again else batch
    edits, passes = [], LayerPasses(model, reads)  # each read starts at the layer updated last
    for index, layer in enumerate(layers):
        keys = passes.keys(layer)  # (F [+ earlier facts], d_mlp) on the weights as edited so far
        carried = (edited_outer or {}).get(layer) if hp.carry == "keys" else None  # Σ k kᵀ of the earlier keys
        residuals = (targets - passes.residual_stream(layers[-1], n_facts)) / (len(layers) - index)  # the batch's
        if again:  # the earlier facts' values at this layer as first written, against what their keys give now
            weight = as_out_in(model, get_module(model, module_name(model, "rewrite", layer)).weight).double()
            residuals = torch.cat([residuals, values_of[layer].to(keys) - keys[n_facts:] @ weight.T])
        if hp.preserve == "null_space":
            projector = null_space_projector(second_moments[layer], hp.null_space_threshold)
            u, v = null_space_update(projector, keys, residuals, carried, hp.null_space_l2, second_moments[layer],
                                     hp.null_space_cov_weight)  # fmt: skip
        else:
            kept = carried if hp.preserve == "edited" else None  # the run's earlier edits keep their values
            u, v = memit_update(second_moments[layer], keys, residuals, hp.mom2_update_weight, kept)
        info = {"layer_of": len(layers), "hparams": hp.to_dict(), "v_steps": [steps for steps, _ in fits],
                "p_target": [p for _, p in fits], "written_again": len(again)}  # fmt: skip
        name, own = module_name(model, "rewrite", layer), keys[:n_facts].cpu()
        made = Edit(layer, name, u.cpu(), v.cpu(), written, info, key=own, written_keys=keys.cpu())
        apply_edits(model, [made], backup)
        made.target_value = _written_values(model, made).cpu()  # the batch's own: what carry=targets writes again
        edits.append(made)
        if edited_outer is not None and hp.carry == "keys":  # final: a key at l reads only layers < l, written by now
            edited_outer[layer] = keys.T @ keys + (0 if carried is None else carried)
    _log_batch(fits, edits, fitted - start, time.perf_counter() - fitted)
    return edits


def earlier_targets(earlier, layers, facts) -> tuple[list[Fact], dict[int, torch.Tensor]]:
    """The facts of a run's earlier MEMIT edits and, per layer of `layers`, the values each layer gave them when
    they were written ({layer: (N, d_model)}, rows in the order of the facts). A fact written again later (the same
    subject and prompt, in a later batch or in `facts`) keeps only its latest value."""
    batches = []  # [(facts, {layer: values})]: a batch's edits come one per layer, in increasing layer order
    for made in earlier:
        if "facts" not in made.fact or made.target_value is None:
            raise FacteditError("editor.carry=targets writes the run's earlier MEMIT edits again: the earlier edits "
                                "here are not MEMIT batch edits (or lack their values): start a new run")  # fmt: skip
        if not batches or made.layer in batches[-1][1] or made.fact["facts"] != batches[-1][0]:
            batches.append((made.fact["facts"], {}))
        batches[-1][1][made.layer] = made.target_value
    seen, kept, values = {(fact.subject, fact.prompt) for fact in facts}, [], {layer: [] for layer in layers}
    for batch_facts, per_layer in reversed(batches):  # newest first: a later write wins
        if set(per_layer) != set(layers):
            raise FacteditError(f"editor.carry=targets: an earlier batch was written into layers {sorted(per_layer)}, "
                                f"this one into {list(layers)}: keep one layer range for the whole run")  # fmt: skip
        batch_facts = as_facts(batch_facts)
        rows = [i for i, fact in enumerate(batch_facts) if (fact.subject, fact.prompt) not in seen]
        seen |= {(fact.subject, fact.prompt) for fact in batch_facts}
        kept = [batch_facts[i] for i in rows] + kept
        for layer in layers:
            values[layer].insert(0, per_layer[layer].double()[rows])
    return kept, {layer: torch.cat(parts) if parts else torch.zeros(0) for layer, parts in values.items()}


def fit_targets(model, tokenizer, facts, templates, hp: MemitHparams, trainer_kwargs=None, batch=None):
    """z = v₀ + δ of each fact at the residual stream after the last layer of hp.layers, in batched fits
    of hp.facts_per_fit facts: (F, d_model) float64, and [(steps, final P(target))] per fact. A fact the
    model already gives keeps δ = 0."""
    batch = batch if batch is not None else value_batch(tokenizer, facts, templates, model.device)
    size = hp.facts_per_fit or len(facts)
    if size < len(facts):  # facts never interact in the objective: fits of fewer facts at a time give the same z
        # narrow: facts of alike prompt lengths fit together (a fit's rows are padded to its longest)
        order = list(range(len(facts)))
        if hp.narrow:
            order.sort(key=_live_lengths(batch).__getitem__)
        parts = [_fit(model, tokenizer, [facts[i] for i in order[start : start + size]], templates, hp, trainer_kwargs)
                 for start in range(0, len(facts), size)]  # fmt: skip
        targets, fits = torch.cat([targets for targets, _ in parts]), [fit for _, fits in parts for fit in fits]
        unsorted = torch.empty(len(order), dtype=torch.long).scatter_(0, torch.tensor(order), torch.arange(len(order)))
        return targets[unsorted.to(targets.device)], [fits[i] for i in unsorted.tolist()]
    return _fit(model, tokenizer, facts, templates, hp, trainer_kwargs, batch)


def _fit(model, tokenizer, facts, templates, hp: MemitHparams, trainer_kwargs=None, batch=None):
    """fit_targets of `facts` in one batched fit."""
    batch = batch if batch is not None else value_batch(tokenizer, facts, templates, model.device)
    with value_engine(model, hp.layers[-1], batch, hp) as engine:
        value = compute_value(engine, facts, trainer_kwargs, known="keep")
    fits = [(len(history), history[-1]["p_target"] if history else None) for history in value.histories]
    return value.target_value.double(), fits


def _live_lengths(batch: ValueBatch) -> list[int]:
    """Per fact, the longest of its rows from the subject's last token on: what a step computes of it."""
    lengths = batch.attention_mask.sum(dim=1) - batch.subject_pos
    per_fact = torch.zeros(batch.n_facts, dtype=lengths.dtype, device=lengths.device)
    return per_fact.scatter_reduce(0, batch.fact_of_row, lengths, reduce="amax").tolist()


@torch.no_grad()
def residual_stream(model, batch: ValueBatch, layer: int) -> torch.Tensor:
    """h: the output of decoder layer `layer` at each fact's subject in its bare prompt, (F, d_model) float64."""
    bare, name = batch.bare_rows, module_name(model, "layer", layer)
    output = run_until(model, name, retain_input=False, input_ids=batch.input_ids[bare],
                       attention_mask=batch.attention_mask[bare])[name].output  # fmt: skip
    return output[torch.arange(len(bare), device=output.device), batch.subject_pos[bare]].double()


def _written_values(model, edit: Edit) -> torch.Tensor:
    """(W + ΔW) K: what the batch's keys give at this layer now, (F, d_model)."""
    weight = as_out_in(model, get_module(model, edit.module).weight).double()
    return edit.key.to(weight) @ weight.T


def _log_batch(fits, edits: list[Edit], fit_seconds: float, update_seconds: float) -> None:
    steps = [steps for steps, _ in fits]
    log.info("MEMIT: %d facts into layers %s: v* %.1fs (%d-%d steps), update %.1fs", len(steps),
             [e.layer for e in edits], fit_seconds, min(steps), max(steps), update_seconds)  # fmt: skip

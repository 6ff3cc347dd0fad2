"""MEMIT: many facts per edit, written into the MLPs of a range of layers (Meng et al., 2023).

from factedit import load_model, memit
model, tokenizer = load_model("smollm2_135m")
edits = memit.edit(model, tokenizer, facts, batch_size=100)   # stats/ must hold C for each layer
revert_edits(model, edits.backup)                              # bit-exact restore
"""

from factedit.errors import FacteditError
from factedit.memit.memit import edit_batch, residual_stream
from factedit.memit.update import memit_update, null_space_update
from factedit.rome.edits import Edits, WeightBackup, revert_edits
from factedit.rome.facts import as_facts, fact_texts
from factedit.rome.hparams import MemitHparams, resolve_hparams
from factedit.stats.files import second_moment_from, second_moments
from factedit.tokens import check_prompt_lengths

__all__ = ["edit", "edit_batch", "memit_update", "null_space_update", "residual_stream"]


def edit(model, tokenizer, facts, stats=None, hparams=None, *, batch_size: int | None = None,
         edited_outer: dict | None = None, trainer_kwargs=None, trainer=None, earlier=()) -> Edits:  # fmt: skip
    """Write `facts` with MEMIT, `batch_size` at a time (default: all in one batch), and apply them.

    stats: {layer: C}, a callable layer -> C, or None (the stats files of hparams.layers). hparams:
    overrides of the model's MEMIT options (MemitHparams). edited_outer: {layer: Σ k kᵀ} of keys edited
    earlier in a run (preserve=null_space or edited keeps them; updated in place). earlier: the run's MEMIT edits
    made before this call (editor.carry=targets writes their facts again, with the batches of this call).
    trainer: a lightning.Trainer of several processes (strategy ddp) fits each batch's v* spread over them.
    On an error the weights are as they were; `revert_edits(model, edits.backup)` undoes the edits exactly.
    """
    facts = as_facts(facts)
    check_distinct(facts)
    check_prompt_lengths(tokenizer, model, fact_texts(facts))
    hp = resolve_hparams(model, hparams, kind=MemitHparams)
    second_moments = _second_moments(model, stats, hp.layers)
    edited_outer = {} if edited_outer is None and hp.preserve in ("null_space", "edited") else edited_outer
    size = int(batch_size or len(facts))
    if not 1 <= size <= len(facts):
        raise FacteditError(f"batch_size={size} for {len(facts)} facts: use 1..{len(facts)}")
    edits = Edits()
    edits.backup = WeightBackup()
    try:
        for start in range(0, len(facts), size):
            chunk = facts[start : start + size]
            edits += edit_batch(model, tokenizer, chunk, second_moments, hp, edits.backup, edited_outer,
                                trainer_kwargs, trainer, earlier=[*earlier, *edits])  # fmt: skip
    except BaseException:
        revert_edits(model, edits.backup)
        raise
    return edits


def _second_moments(model, stats, layers) -> dict:
    if isinstance(stats, dict) and set(layers) - set(stats):
        missing = sorted(set(layers) - set(stats))
        raise FacteditError(
            f"stats has no C for layers {missing} of the MEMIT range {list(layers)}: pass one per layer"
        )
    return second_moments(model, layers, lambda layer: second_moment_from(stats, model, layer))


def check_distinct(facts) -> None:
    """Two facts with the same subject and prompt but other new objects cannot both be written."""
    seen = {}
    for index, fact in enumerate(facts):
        other = seen.setdefault((fact.subject, fact.prompt), (index, fact))
        if other[1].target_new != fact.target_new:
            raise FacteditError(
                f"facts {other[0]} ({other[1].name}) and {index} ({fact.name}) give {fact.text!r} two new objects "
                f"({other[1].target_new!r}, {fact.target_new!r}): keep one"
            )

"""Editors the evaluation runs per record: `editor(model, tokenizer, record) -> WeightBackup`.

An editor changes the weights in place for one CounterFact record and returns the backup that
`revert_edits` restores bit for bit; when it raises, the weights are as before. `editor.info`
(if set) describes the last edit (steps, loss, seconds) for the record's result line. ROME and
MEMIT also edit sequentially (evaluation/sequential.py): `write(model, tokenizer, records,
edited_outer)` applies a step's edits for good, `modules(model)` names the matrices they change,
and `prepare(model, tokenizer)` makes the context templates from the base weights.

    none       nothing (the unedited model)
    rome       factedit.edit on the MLP down-projection at model.rome.layer with C from the stats file
    memit      factedit.memit.edit: the record (or, sequentially, a batch of records) into model.memit.layers
    attn_late  the same on the attention output projection at a late layer (C over Wikipedia, or C = I)
    ft, ft_l   fine-tuning of the down-projection, unconstrained or clamped to ±ε
    saved      the edits of a checkpoint (`edits=checkpoints/<run>`), applied as saved
"""

import hashlib
import logging

import torch
from omegaconf import OmegaConf

from factedit import memit
from factedit.architectures import module_name
from factedit.baselines import attention_second_moment, attn_late_hparams, fine_tune, identity_second_moment
from factedit.errors import FacteditError
from factedit.rome import MemitHparams, RomeHparams, WeightBackup, apply_edits, edit, resolve_hparams
from factedit.rome.context import context_templates
from factedit.stats import second_moment_for
from factedit.stats.files import second_moments

log = logging.getLogger(__name__)
NAMES = ("rome", "memit", "ft", "ft_l", "attn_late", "none")


class NoEdit:
    name = "none"

    def __call__(self, model, tokenizer, record) -> WeightBackup:
        return WeightBackup()


def nested_trainer_kwargs(model) -> dict:
    """Flags for the Trainer that ROME's v* optimization starts inside a test step: the model's own device."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return {"accelerator": "gpu", "devices": [device.index or 0]}
    return {"accelerator": "cpu", "devices": 1}


class RankOneEdit:
    """ROME (or attn_late) for one record: k̄, v*, the rank-one update with `second_moment`, applied."""

    def __init__(self, name: str, hparams: RomeHparams, second_moment: torch.Tensor):
        self.name, self.hparams, self.second_moment = name, hparams, second_moment
        self.layer = hparams.layer
        self.stats_digest = _digest([second_moment])

    def __call__(self, model, tokenizer, record) -> WeightBackup:
        stats, trainer = {self.layer: self.second_moment}, nested_trainer_kwargs(model)
        edits = edit(model, tokenizer, record.to_fact(), stats=stats, hparams=self.hparams, trainer_kwargs=trainer)
        self.info = {k: edits[0].info[k] for k in ("steps", "final_loss", "p_target", "delta_norm_ratio", "seconds")}
        return edits.backup

    def prepare(self, model, tokenizer) -> None:
        context_templates(model, tokenizer, self.hparams.context_templates, seed=self.hparams.seed)

    def modules(self, model) -> list[str]:
        return [module_name(model, self.hparams.role, self.layer)]

    def write(self, model, tokenizer, records, edited_outer: dict, earlier=()) -> list:
        """ROME's edits of `records`, one after another, kept (a record the model already answers is skipped)."""
        stats, trainer, made = {self.layer: self.second_moment}, nested_trainer_kwargs(model), []
        for record in records:
            try:
                made += edit(model, tokenizer, record.to_fact(), stats, self.hparams, trainer, edited_outer)
            except FacteditError as error:
                log.warning("case %s not edited: %s", record.case_id, error)
        return made


class MemitEdit:
    """MEMIT: one record per evaluation record, or a batch of records per sequential step."""

    name = "memit"

    def __init__(self, hparams: MemitHparams, second_moments: dict[int, torch.Tensor]):
        self.hparams, self.second_moments = hparams, second_moments
        self.stats_digest = _digest(second_moments.values())

    def __call__(self, model, tokenizer, record) -> WeightBackup:
        edits = self._edit(model, tokenizer, [record], None)
        self.info = {"layers": list(self.hparams.layers)}
        return edits.backup

    def prepare(self, model, tokenizer) -> None:
        context_templates(model, tokenizer, self.hparams.context_templates, seed=self.hparams.seed)

    def modules(self, model) -> list[str]:
        return [module_name(model, "rewrite", layer) for layer in self.hparams.layers]

    def write(self, model, tokenizer, records, edited_outer: dict, earlier=()) -> list:
        """The batch `records` (one sequential step); earlier: the run's edits so far (editor.carry=targets)."""
        return list(self._edit(model, tokenizer, records, edited_outer, earlier))

    def _edit(self, model, tokenizer, records, edited_outer, earlier=()):
        facts = [record.to_fact() for record in records]
        return memit.edit(model, tokenizer, facts, self.second_moments, self.hparams, edited_outer=edited_outer,
                          trainer_kwargs=nested_trainer_kwargs(model), earlier=earlier)  # fmt: skip


def _digest(tensors) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class FineTune:
    """FT (norm_constraint None) or FT-L on the rewrite module of `layer`."""

    def __init__(
        self, name: str, layer: int, lr: float, steps: int, norm_constraint: float | None, loss_threshold: float
    ):
        self.name, self.layer = name, layer
        self.options = dict(lr=lr, steps=steps, norm_constraint=norm_constraint, loss_threshold=loss_threshold)

    def __call__(self, model, tokenizer, record) -> WeightBackup:
        self.info = {}
        return fine_tune(model, tokenizer, record.to_fact(), self.layer, info=self.info, **self.options)


class SavedEdits:
    """The edits of a checkpoint, all applied for every record (the saved edited model)."""

    name = "saved"

    def __init__(self, edits: list, path: str):
        self.edits, self.path = edits, path

    def __call__(self, model, tokenizer, record) -> WeightBackup:
        backup = WeightBackup()
        try:
            apply_edits(model, self.edits, backup)
        except BaseException:
            from factedit.rome import revert_edits

            revert_edits(model, backup)
            raise
        return backup


def rome_hparams(cfg, model) -> RomeHparams:
    """ROME's options for this run: defaults ← the model's `rome:` block ← cfg.editor (as src/edit.py)."""
    own = ("second_moment", "stats_tokens")  # attn_late's options of its own
    editor = {k: v for k, v in OmegaConf.to_container(cfg.editor, resolve=True).items() if k not in own}
    return resolve_hparams(model, {**editor, "seed": int(cfg.seed)}, model_rome=cfg.model.get("rome"))


def make_editor(cfg, model, tokenizer):
    """The editor named by cfg.editor.name, with its statistics loaded."""
    name = cfg.editor.get("name")
    if name == "none":
        return NoEdit()
    if name == "memit":
        options = {**OmegaConf.to_container(cfg.editor, resolve=True), "seed": int(cfg.seed)}
        hparams = resolve_hparams(model, options, model_rome=cfg.model.get("memit"), kind=MemitHparams)
        return MemitEdit(
            hparams,
            second_moments(model, hparams.layers, lambda layer: second_moment_for(model, tokenizer, layer, cfg.stats)),
        )
    if name == "rome":
        hparams = rome_hparams(cfg, model)
        return RankOneEdit("rome", hparams, second_moment_for(model, tokenizer, hparams.layer, cfg.stats))
    if name == "attn_late":
        hparams = attn_late_hparams(model, rome_hparams(cfg, model), cfg.editor.get("layer"))
        kind = cfg.editor.get("second_moment", "wikipedia")
        if kind not in ("wikipedia", "identity"):
            raise FacteditError(f"editor.second_moment must be 'wikipedia' or 'identity', not {kind!r}")
        second_moment = (
            identity_second_moment(model, hparams.layer)
            if kind == "identity"
            else attention_second_moment(
                model, tokenizer, hparams.layer, tokens=int(cfg.editor.get("stats_tokens", 20_000))
            )
        )
        return RankOneEdit("attn_late", hparams, second_moment)
    if name in ("ft", "ft_l"):
        layer = cfg.editor.get("layer")
        layer = int(cfg.model.rome.layer if layer is None else layer)
        constraint = cfg.editor.get("norm_constraint")
        if name == "ft_l" and constraint is None:
            raise FacteditError("editor=ft_l needs editor.norm_constraint=<epsilon> (e.g. 5e-4)")
        return FineTune(
            name,
            layer,
            float(cfg.editor.lr),
            int(cfg.editor.steps),
            None if constraint is None else float(constraint),
            float(cfg.editor.loss_threshold),
        )
    raise FacteditError(f"unknown editor {name!r}: use editor= one of {', '.join(NAMES)}")

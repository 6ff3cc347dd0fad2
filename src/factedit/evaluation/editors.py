"""Editors the evaluation runs per record: `editor(model, tokenizer, record) -> WeightBackup`.

An editor changes the weights in place for one CounterFact record and returns the backup that
`revert_edits` restores bit for bit; when it raises, the weights are as before. `editor.info`
(if set) describes the last edit (steps, loss, seconds) for the record's result line.

    none       nothing (the unedited model)
    rome       factedit.edit on the MLP down-projection at model.rome.layer with C from the stats file
    attn_late  the same on the attention output projection at a late layer (C over Wikipedia, or C = I)
    ft, ft_l   fine-tuning of the down-projection, unconstrained or clamped to ±ε
    saved      the edits of a checkpoint (`edits=checkpoints/<run>`), applied as saved
"""
import hashlib
import logging

import torch
from omegaconf import OmegaConf

from factedit.baselines import attention_second_moment, attn_late_hparams, fine_tune, identity_second_moment
from factedit.errors import FacteditError
from factedit.rome import WeightBackup, apply_edits, edit

log = logging.getLogger(__name__)
NAMES = ("rome", "ft", "ft_l", "attn_late", "none")


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

    def __init__(self, name: str, hparams: dict, second_moment: torch.Tensor):
        self.name, self.hparams, self.second_moment = name, hparams, second_moment
        self.layer = int(hparams["layer"])
        self.stats_digest = hashlib.sha256(second_moment.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]

    def __call__(self, model, tokenizer, record) -> WeightBackup:
        edits = edit(model, tokenizer, record.to_fact(), stats={self.layer: self.second_moment}, hparams=self.hparams,
                     trainer_kwargs=nested_trainer_kwargs(model))
        self.info = {k: edits[0].info[k] for k in ("steps", "final_loss", "p_target", "delta_norm_ratio", "seconds")}
        return edits.backup


class FineTune:
    """FT (norm_constraint None) or FT-L on the rewrite module of `layer`."""

    def __init__(self, name: str, layer: int, lr: float, steps: int, norm_constraint: float | None, loss_threshold: float):
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


def rome_hparams(cfg) -> dict:
    """The editor config with the model's `rome:` block merged over it, as src/edit.py does."""
    editor = {k: v for k, v in OmegaConf.to_container(cfg.editor, resolve=True).items() if k != "name"}
    return {**editor, **OmegaConf.to_container(cfg.model.get("rome", {}), resolve=True), "seed": int(cfg.seed)}


def second_moment_for(cfg, model, tokenizer, layer: int) -> torch.Tensor:
    """C of the rewrite module at `layer` from the stats file (computed first when cfg.stats.auto)."""
    from factedit.stats import compute_second_moment, load_second_moment

    try:
        return load_second_moment(model, layer, source=cfg.stats.source, tokens=cfg.stats.tokens)
    except FacteditError:
        if not cfg.stats.auto:
            raise
    log.info("no key statistics yet: computing %d tokens first (stats.auto=true)", cfg.stats.auto_tokens)
    compute_second_moment(model, tokenizer, [layer], max_tokens=int(cfg.stats.auto_tokens))
    return load_second_moment(model, layer)


def make_editor(cfg, model, tokenizer):
    """The editor named by cfg.editor.name, with its statistics loaded."""
    name = cfg.editor.get("name")
    if name == "none":
        return NoEdit()
    if name == "rome":
        hparams = rome_hparams(cfg)
        return RankOneEdit("rome", hparams, second_moment_for(cfg, model, tokenizer, int(hparams["layer"])))
    if name == "attn_late":
        own = ("layer", "role", "second_moment", "stats_tokens")
        hparams = attn_late_hparams(model, {k: v for k, v in rome_hparams(cfg).items() if k not in own}, cfg.editor.get("layer"))
        kind = cfg.editor.get("second_moment", "wikipedia")
        if kind not in ("wikipedia", "identity"):
            raise FacteditError(f"editor.second_moment must be 'wikipedia' or 'identity', not {kind!r}")
        second_moment = identity_second_moment(model, hparams["layer"]) if kind == "identity" else \
            attention_second_moment(model, tokenizer, hparams["layer"], tokens=int(cfg.editor.get("stats_tokens", 20_000)))
        return RankOneEdit("attn_late", hparams, second_moment)
    if name in ("ft", "ft_l"):
        layer = cfg.editor.get("layer")
        layer = int(cfg.model.rome.layer if layer is None else layer)
        constraint = cfg.editor.get("norm_constraint")
        if name == "ft_l" and constraint is None:
            raise FacteditError("editor=ft_l needs editor.norm_constraint=<epsilon> (e.g. 5e-4)")
        return FineTune(name, layer, float(cfg.editor.lr), int(cfg.editor.steps), None if constraint is None else float(constraint),
                        float(cfg.editor.loss_threshold))
    raise FacteditError(f"unknown editor {name!r}: use editor= one of {', '.join(NAMES)}")

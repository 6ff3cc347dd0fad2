"""`python src/edit.py`: edit facts, report probes before/after, save the edits (or resume/revert)."""

import logging
import time
from pathlib import Path

import lightning
import torch
from omegaconf import OmegaConf

from factedit import memit
from factedit.errors import FacteditError
from factedit.io import write_json
from factedit.models import load_model, model_fingerprint
from factedit.paths import CHECKPOINT_DIR
from factedit.probes import next_token_logits, probe, probe_prompts, probe_table
from factedit.rome.edits import apply_edits, facts_of, load_edits, revert_edits, save_edits
from factedit.rome.facts import fact_from_config, fact_texts, load_facts
from factedit.rome.hparams import MemitHparams, RomeHparams, resolve_hparams
from factedit.rome.rome import edit
from factedit.stats import second_moment_for
from factedit.stats.files import second_moments
from factedit.tokens import check_prompt_lengths

log = logging.getLogger("factedit.edit")


def _output_dir(cfg) -> Path:
    out = Path(str(cfg.out_dir)) if cfg.get("out_dir") else CHECKPOINT_DIR / str(cfg.run)  # run: a name (options.py)
    if (out / "edits.safetensors").exists():
        raise FacteditError(f"{out} already holds edits: choose another run=NAME (saved work is never overwritten)")
    return out


def show_revert(cfg, model, tokenizer, prior) -> None:
    """Apply the saved edits, then revert them, and check the original logits come back bit for bit."""
    facts = [fact_from_config(fact) for fact in facts_of(prior)]
    prompts, kinds = probe_prompts(facts)
    base_logits = next_token_logits(model, tokenizer, prompts)
    backup = apply_edits(model, prior)
    edited = probe(model, tokenizer, prompts, **cfg.probe)
    revert_edits(model, backup)
    exact = torch.equal(base_logits, next_token_logits(model, tokenizer, prompts))
    print(
        probe_table(edited, probe(model, tokenizer, prompts, **cfg.probe), kinds).replace(
            "| before | after |", "| edited | reverted |"
        )
    )
    print(f"reverted {len(prior)} edit(s): original logits restored {'exactly' if exact else 'NOT exactly'}")
    if not exact:
        raise FacteditError("revert did not restore the original weights exactly")


def run(cfg) -> Path | None:
    use_gpu = cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    model, tokenizer = load_model(cfg.model, device="cuda" if use_gpu else "cpu")
    base_fingerprint = model_fingerprint(model)
    prior = []
    if cfg.resume:
        prior, _ = load_edits(cfg.resume, base_fingerprint=base_fingerprint)
        log.info("resuming from %s: %d saved edit(s)", cfg.resume, len(prior))
    if cfg.revert:
        if not prior:
            raise FacteditError("revert=true needs resume=checkpoints/<run> with saved edits")
        show_revert(cfg, model, tokenizer, prior)
        return None
    out = _output_dir(cfg)
    facts = load_facts(cfg.facts) if cfg.facts else [fact_from_config(cfg.fact)]
    check_prompt_lengths(tokenizer, model, fact_texts(facts))
    write, trainer = _writer(cfg, model, tokenizer)  # C of the base weights, as ROME and MEMIT
    apply_edits(model, prior)
    prompts, kinds = probe_prompts(facts)
    before = probe(model, tokenizer, prompts, **cfg.probe)
    start = time.perf_counter()
    new = write(facts)
    seconds = time.perf_counter() - start
    if trainer is not None and trainer.global_rank != 0:
        return None  # the other processes only fitted their share of v*: process 0 reports and saves
    after = probe(model, tokenizer, prompts, **cfg.probe)
    table = probe_table(before, after, kinds)
    print(table)
    probes = [{"kind": k, "before": b, "after": a} for k, b, a in zip(kinds, before, after)]
    save_run(cfg, out, model, tokenizer, prior + list(new), facts, probes, table, base_fingerprint, seconds)
    log.info("%d edit(s) in %.1fs; saved %s (%d edits in all)%s", len(new), seconds, out / "edits.safetensors",
             len(prior) + len(new), "; full model in " + str(out / "model") if cfg.save_model else "")  # fmt: skip
    return out


def _writer(cfg, model, tokenizer):
    """The configured editor as facts -> Edits (applied): ROME one fact after another, MEMIT in batches;
    and the Trainer of several processes that MEMIT's v* fits are shared out over (None: one process)."""
    options, trainer = (
        {**OmegaConf.to_container(cfg.editor, resolve=True), "seed": cfg.seed},
        {"enable_progress_bar": True},
    )
    name = cfg.editor.get("name")
    if name not in ("rome", "memit"):
        raise FacteditError(f"src/edit.py edits with editor=rome or editor=memit, not {name!r}")
    kind = MemitHparams if name == "memit" else RomeHparams
    hparams = resolve_hparams(model, options, model_rome=cfg.model.get(name), kind=kind)
    log.info("%s options: %s", name.upper(), ", ".join(f"{k}={v}" for k, v in hparams.to_dict().items()))
    layers = hparams.layers if name == "memit" else [hparams.layer]
    stats = second_moments(model, layers, lambda layer: second_moment_for(model, tokenizer, layer, cfg.stats))
    if name == "memit":
        processes = _processes_trainer(cfg)
        return lambda facts: memit.edit(model, tokenizer, facts, stats, hparams, batch_size=cfg.get("batch_size"),
                                        trainer_kwargs=trainer, trainer=processes), processes  # fmt: skip
    return lambda facts: edit(model, tokenizer, facts, stats, hparams, trainer), None


def _processes_trainer(cfg) -> lightning.Trainer | None:
    """With `trainer=ddp trainer.devices=N` (N > 1, or several nodes): the Trainer whose processes share
    MEMIT's v* fits. Its first use starts the other processes, which run this command up to there."""
    flags = OmegaConf.to_container(cfg.trainer, resolve=True)
    if "ddp" not in str(flags.get("strategy", "")):
        return None
    trainer = lightning.Trainer(**{"logger": False, **flags, "inference_mode": False, "enable_progress_bar": False})
    return trainer if trainer.world_size > 1 else None


def save_run(cfg, out: Path, model, tokenizer, edits, facts, probes, table, base_fingerprint, seconds) -> None:
    """edits.safetensors (each new edit with the probes of its fact), probes.json and .md, the model if asked."""
    one_per_fact = all("facts" not in made.fact for made in edits[len(edits) - len(facts) :])  # ROME (MEMIT: per layer)
    for made, fact in zip(edits[len(edits) - len(facts) :] if one_per_fact else [], facts):
        texts = {fact.text, *fact.generalization_probes, *fact.specificity_probes}
        made.info["probes"] = [p for p in probes if p["before"]["prompt"] in texts]
    save_edits(out / "edits.safetensors", edits, base_fingerprint=base_fingerprint, model_name=str(cfg.model.name))
    write_json(
        out / "probes.json", {"facts": [f.to_dict() for f in facts], "seconds": round(seconds, 2), "probes": probes}
    )
    (out / "probes.md").write_text(table + "\n")
    if cfg.save_model:
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")

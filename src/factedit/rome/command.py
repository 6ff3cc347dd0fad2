"""`python src/edit.py`: edit facts, report probes before/after, save the edits (or resume/revert)."""
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from factedit.errors import FacteditError
from factedit.io import write_json
from factedit.models import load_model, model_fingerprint
from factedit.paths import CHECKPOINT_DIR
from factedit.probes import next_token_logits, probe, probe_table
from factedit.rome.edits import apply_edits, load_edits, revert_edits, save_edits
from factedit.rome.facts import fact_from_config, load_facts
from factedit.rome.rome import edit

log = logging.getLogger("factedit.edit")


def _probe_prompts(facts) -> tuple[list[str], list[str]]:
    prompts, kinds = [], []
    for fact in facts:
        for kind, items in (("edit", [fact.text]), ("generalization", fact.generalization_probes),
                            ("specificity", fact.specificity_probes)):
            prompts += list(items)
            kinds += [kind] * len(items)
    return prompts, kinds


def _second_moment(cfg, model, tokenizer, layer: int) -> torch.Tensor:
    from factedit.stats import compute_second_moment, load_second_moment

    try:
        return load_second_moment(model, layer, source=cfg.stats.source, tokens=cfg.stats.tokens, stats_dir=cfg.stats.dir)
    except FacteditError:
        if not cfg.stats.auto:
            raise
    log.info("no key statistics yet: computing %d tokens first (stats.auto=true)", cfg.stats.auto_tokens)
    compute_second_moment(model, tokenizer, [layer], max_tokens=int(cfg.stats.auto_tokens), stats_dir=cfg.stats.dir)
    return load_second_moment(model, layer, stats_dir=cfg.stats.dir)


def _output_dir(cfg) -> Path:
    out = Path(cfg.run) if Path(str(cfg.run)).is_absolute() else CHECKPOINT_DIR / str(cfg.run)
    if (out / "edits.safetensors").exists():
        raise FacteditError(f"{out} already holds edits: choose another run=NAME (saved work is never overwritten)")
    return out


def show_revert(cfg, model, tokenizer, prior) -> None:
    """Apply the saved edits, then revert them, and check the original logits come back bit for bit."""
    facts = [fact_from_config(e.fact) for e in prior]
    prompts, kinds = _probe_prompts(facts)
    base_logits, base = next_token_logits(model, tokenizer, prompts), probe(model, tokenizer, prompts, **cfg.probe)
    backup = apply_edits(model, prior)
    edited = probe(model, tokenizer, prompts, **cfg.probe)
    revert_edits(model, backup)
    exact = torch.equal(base_logits, next_token_logits(model, tokenizer, prompts))
    print(probe_table(edited, probe(model, tokenizer, prompts, **cfg.probe), kinds).replace("| before | after |", "| edited | reverted |"))
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
    hparams = {**OmegaConf.to_container(cfg.editor), **OmegaConf.to_container(cfg.model.get("rome", {})), "seed": cfg.seed}
    second_moment = _second_moment(cfg, model, tokenizer, int(hparams["layer"]))  # of the base weights, as ROME
    backup = apply_edits(model, prior)
    prompts, kinds = _probe_prompts(facts)
    before = probe(model, tokenizer, prompts, **cfg.probe)
    start = time.perf_counter()
    new = edit(model, tokenizer, facts, stats={int(hparams["layer"]): second_moment}, hparams=hparams,
               trainer_kwargs={"enable_progress_bar": True})
    seconds = time.perf_counter() - start
    after = probe(model, tokenizer, prompts, **cfg.probe)
    table = probe_table(before, after, kinds)
    print(table)
    for made, fact in zip(new, facts):
        made.info["probes"] = [{"kind": k, "before": b, "after": a} for k, b, a in zip(kinds, before, after)
                               if b["prompt"] in {fact.text, *fact.generalization_probes, *fact.specificity_probes}]
    save_edits(out / "edits.safetensors", prior + list(new), base_fingerprint=base_fingerprint, model_name=str(cfg.model.name))
    write_json(out / "probes.json", {"facts": [f.to_dict() for f in facts], "seconds": round(seconds, 2),
                                     "probes": [{"kind": k, "before": b, "after": a} for k, b, a in zip(kinds, before, after)]})
    (out / "probes.md").write_text(table + "\n")
    if cfg.save_model:
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
    log.info("%d edit(s) in %.1fs; saved %s (%d edits in all)%s", len(new), seconds, out / "edits.safetensors",
             len(prior) + len(new), "; full model in " + str(out / "model") if cfg.save_model else "")
    del backup
    return out

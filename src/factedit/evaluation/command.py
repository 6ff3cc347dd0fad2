"""`python src/evaluate.py`: CounterFact evaluation of an editor under `trainer.test` (see configs/evaluate.yaml)."""
import json
import logging
import time
import warnings
from pathlib import Path

import lightning
import torch
from omegaconf import OmegaConf

from factedit.data.counterfact import DEV_FILE, CounterFactDataModule, Record, Skipped, load_records, relations_of
from factedit.errors import FacteditError
from factedit.evaluation.editors import SavedEdits, make_editor
from factedit.evaluation.module import CounterFactEvaluator, drop_incomplete_line, read_lines
from factedit.evaluation.report import build_summary, change_from_unedited, compare, write_run_report
from factedit.io import write_json
from factedit.models import load_model, model_fingerprint
from factedit.rome.low_precision import resolve_bf16
from factedit.paths import CHECKPOINT_DIR, REPO_ROOT
from factedit.tokens import special_prefix

log = logging.getLogger("factedit.evaluate")
LOG_ROOT = REPO_ROOT / "logs" / "evaluate"


def editor_name(cfg, editor) -> str:
    """The editor's name; saved edits are named after their checkpoint folder."""
    if cfg.edits:
        path = Path(editor.path)
        return f"saved-{path.parent.name if path.is_file() else path.name}"
    return editor.name


def output_dir(cfg, name: str) -> Path:
    """out_dir, or logs/evaluate/<run> with run = <editor>-<model>-<data file>[-nogen] by default."""
    if cfg.out_dir:
        return Path(cfg.out_dir)
    run = cfg.run or f"{name}-{cfg.model.name}-{Path(str(cfg.data.path or DEV_FILE)).stem}" + ("" if cfg.gen else "-nogen")
    return LOG_ROOT / str(run)


def run_settings(cfg, model, tokenizer, editor) -> dict:
    """What must not change when a run is resumed (stats: a digest of the editor's C, when it has one)."""
    return {"model": str(cfg.model.name), "fingerprint": model_fingerprint(model), "special_prefix": special_prefix(tokenizer),
            "editor": editor_name(cfg, editor),
            "stats": getattr(editor, "stats_digest", None),
            "editor_config": outcome_config(OmegaConf.to_container(cfg.editor, resolve=True), model.device, model.dtype),
            "model_rome": OmegaConf.to_container(cfg.model.get("rome", {}), resolve=True),
            "data": str(cfg.data.path or DEV_FILE), "gen": OmegaConf.to_container(cfg.gen, resolve=True) if cfg.gen else False,
            "pre": bool(cfg.pre), "seed": int(cfg.seed), "edits": str(cfg.edits) if cfg.edits else None}


EXECUTION_ONLY = {"cuda_graph", "graph_cache", "fused_activations"}  # how v* steps run, not what they compute (equal to rounding)
GPU_ONLY = {"tf32"}  # changes the numbers on a GPU only


def outcome_config(editor_config: dict, device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """The editor options that can change a run's numbers on this device (a run resumes across the
    others); bf16 as it resolves here for a model of `dtype` (auto: whether this hardware has bfloat16)."""
    ignored = EXECUTION_ONLY | (set() if device.type == "cuda" else GPU_ONLY)
    config = {k: v for k, v in editor_config.items() if k not in ignored}
    if "bf16" in config:
        config["bf16"] = resolve_bf16(config["bf16"], device, dtype)
    return config


# Options an editor gained after runs were already saved, with the behaviour a saved run had without
# them: a saved config that lacks one of these is read with this value (not today's default, which may differ).
# bf16 was GPU-only before, so a CPU run saved then has none and ran in float32.
ADDED_OPTIONS = {"rome": {"stop_on": "loss", "bf16": False}, "attn_late": {"stop_on": "loss", "bf16": False}}


def _as_now(saved: dict, current: dict, editor: str) -> dict:
    """A saved run's editor options as this version would write them: without execution-only options
    (older runs kept them), and with each option added since (ADDED_OPTIONS) at the value that keeps the old behaviour."""
    kept = {k: v for k, v in saved.items() if k in current or k not in EXECUTION_ONLY | GPU_ONLY}
    added = {k: v for k, v in ADDED_OPTIONS.get(editor, {}).items() if k in current and k not in saved}
    return {**kept, **added}


def check_settings(out_dir: Path, settings: dict) -> None:
    """Write settings.json for a new run; refuse to resume a run made with other settings."""
    path = out_dir / "settings.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if isinstance(saved.get("editor_config"), dict):
            saved["editor_config"] = _as_now(saved["editor_config"], settings["editor_config"], str(saved.get("editor")))
        changed = sorted(k for k in settings if saved.get(k, "(absent)") != settings[k])
        if changed:
            raise FacteditError(f"{out_dir} holds a run with other settings ({', '.join(changed)} differ): "
                                f"choose another run=NAME or out_dir=, or delete {out_dir} to start over")
    else:
        write_json(path, settings)


def resolve_checkpoint(path) -> Path:
    for candidate in (Path(str(path)), REPO_ROOT / str(path), CHECKPOINT_DIR / str(path)):
        if candidate.exists():
            return candidate
    raise FacteditError(f"edits={path} does not exist: give checkpoints/<run> made by src/edit.py")


def saved_editor(cfg, model, records: list[Record], skipped: list[Skipped]):
    """SavedEdits for edits=checkpoints/<run>, and the records to measure: the data records of its
    facts (by name caseN, or subject and target_new), else records made from the saved facts."""
    from factedit.rome import load_edits

    path = resolve_checkpoint(cfg.edits)
    edits, _ = load_edits(path, base_fingerprint=model_fingerprint(model))
    facts = [e.fact for e in edits]
    names = {f.get("name") for f in facts}
    pairs = {(f.get("subject"), f.get("target_new")) for f in facts}
    matched = [r for r in records if f"case{r.case_id}" in names or (r.subject, r.target_new) in pairs]
    if not matched:
        for index, fact in enumerate(facts):
            if not fact.get("target_true"):
                skipped.append(Skipped(f"edit {index}", "the saved fact has no target_true to compare against"))
                continue
            matched.append(Record(index, fact["subject"], fact["prompt"], fact["target_new"], fact["target_true"],
                                  paraphrase_prompts=list(fact.get("generalization_probes") or []),
                                  neighborhood_prompts=list(fact.get("specificity_probes") or [])))
    log.info("edits=%s: %d saved edit(s), %d record(s) to measure", path, len(edits), len(matched))
    return SavedEdits(edits, str(path)), matched


def make_trainer(trainer_cfg: dict) -> lightning.Trainer:
    for message in (".*DistributedSampler.*", ".*does not have many workers.*", ".*test_step. returned .None.*"):
        warnings.filterwarnings("ignore", message=message)
    return lightning.Trainer(**{"logger": False, **trainer_cfg, "inference_mode": False})


def run(cfg) -> Path | None:
    if cfg.compare:
        chart = Path(cfg.compare_chart) if cfg.compare_chart else LOG_ROOT / "compare.png"
        table = compare(list(cfg.compare), LOG_ROOT, chart)
        print(table)
        (chart.with_suffix(".md")).write_text(table + "\n")
        return None
    model, tokenizer = load_model(cfg.model)
    records, skipped = load_records(cfg.data.path or DEV_FILE, cfg.data.limit)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if cfg.edits:
        editor, records = saved_editor(cfg, model, records, skipped)
    else:
        editor = make_editor(cfg, model, tokenizer)
    if not records:
        raise FacteditError(f"no valid records to evaluate in {cfg.data.path or DEV_FILE} ({len(skipped)} skipped)")
    name = editor_name(cfg, editor)
    out_dir = output_dir(cfg, name)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_settings(out_dir, run_settings(cfg, model, tokenizer, editor))
    wanted = {r.case_id for r in records}
    drop_incomplete_line(out_dir / "records.jsonl")
    prior = {r["case_id"]: r for r in read_lines(out_dir / "records.jsonl") if r.get("case_id") in wanted}
    if prior:
        log.info("resuming %s: %d of %d records already done", out_dir, len(prior), len(records))
    datamodule = CounterFactDataModule(records, done=set(prior))
    gen = OmegaConf.to_container(cfg.gen, resolve=True) if cfg.gen else None
    evaluator = CounterFactEvaluator(model, tokenizer, editor, relations_of(records), records_file=out_dir / "records.jsonl",
                                     gen=gen, pre=cfg.pre, prior=list(prior.values()), seed=int(cfg.seed))
    start = time.perf_counter()
    if datamodule.records:
        trainer = make_trainer(trainer_cfg)
        trainer.test(evaluator, datamodule=datamodule, verbose=False)
        if trainer.global_rank != 0:
            return None
        devices = trainer.world_size
    else:  # every record is done: only the summary is written again
        evaluator.summarize(prior=True)
        devices = 0
    seconds = time.perf_counter() - start
    results = {r["case_id"]: r for r in read_lines(out_dir / "records.jsonl") if r.get("case_id") in wanted}
    failed = sorted(case for case, r in results.items() if r.get("error"))
    new = len(datamodule.records)
    info = {"run": out_dir.name, "editor": name, "label": cfg.label or name, "model": str(cfg.model.name), "data": str(cfg.data.path or DEV_FILE),
            "limit": cfg.data.limit, "devices": devices, "gen": gen, "seconds_this_run": round(seconds, 1),
            "records_this_run": new, "records_per_second": round(new / seconds, 4) if new else None}
    summary = build_summary(evaluator.summary, info=info, skipped=skipped, failed_ids=failed,
                            change=change_from_unedited(results.values(), seed=int(cfg.seed)))
    print(write_run_report(out_dir, summary))
    log.info("wrote %s (summary.json, summary.md, summary.png, records.jsonl)", out_dir)
    return out_dir

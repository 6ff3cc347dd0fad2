"""`python src/evaluate.py`: CounterFact evaluation of an editor under `trainer.test` (see configs/evaluate.yaml)."""

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
from factedit.evaluation.module import CounterFactEvaluator
from factedit.evaluation.report import build_summary, change_from_unedited, compare, write_run_report
from factedit.io import drop_incomplete_line, read_json, read_lines, write_json
from factedit.models import load_model, model_fingerprint
from factedit.paths import CHECKPOINT_DIR, REPO_ROOT
from factedit.rome.fast.low_precision import resolve_bf16
from factedit.rome.hparams import EXECUTION_ONLY, GPU_ONLY, NEUTRAL
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
    run = cfg.run or f"{name}-{cfg.model.name}-{data_file(cfg).stem}" + ("" if cfg.gen else "-nogen")
    return LOG_ROOT / str(run)


def run_settings(cfg, model, tokenizer, editor) -> dict:
    """What must not change when a run is resumed (stats: a digest of the editor's C, when it has one)."""
    return {
        "model": str(cfg.model.name),
        "fingerprint": model_fingerprint(model),
        "special_prefix": special_prefix(tokenizer),
        "editor": editor_name(cfg, editor),
        "stats": getattr(editor, "stats_digest", None),
        "editor_config": outcome_config(editor_options(cfg, editor), model.device, model.dtype),
        "data": str(data_file(cfg)),
        "gen": OmegaConf.to_container(cfg.gen, resolve=True) if cfg.gen else False,
        "pre": bool(cfg.pre),
        "seed": int(cfg.seed),
        "edits": str(cfg.edits) if cfg.edits else None,
    }


def editor_options(cfg, editor) -> dict:
    """The editor's options as it runs them: ROME's resolved hyperparameters, or the editor config."""
    hparams = getattr(editor, "hparams", None)
    if hparams is not None:
        return hparams.to_dict()
    return {k: v for k, v in OmegaConf.to_container(cfg.editor, resolve=True).items() if k != "name"}


def outcome_config(options: dict, device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """The editor options that can change a run's numbers on this device (a run resumes across the
    others, and across options added later at their neutral value); bf16 as it resolves here for a model of
    `dtype` (auto: whether this hardware has bfloat16)."""
    ignored = set(EXECUTION_ONLY) | (set() if device.type == "cuda" else set(GPU_ONLY))
    config = {k: v for k, v in options.items() if k not in ignored and (k not in NEUTRAL or v != NEUTRAL[k])}
    if "bf16" in config:
        config["bf16"] = resolve_bf16(config["bf16"], device, dtype)
    return config


def check_settings(out_dir: Path, settings: dict, growable: str | None = None) -> None:
    """Write settings.json for a new run; refuse to resume a run made with other settings. A larger
    `growable` count (a sequential run's records) extends the run: its first records are the same."""
    path = out_dir / "settings.json"
    if path.is_file():
        saved = read_json(path, fix=f"delete {out_dir} to start the run over, or choose another run=NAME")
        changed = sorted(k for k in settings if saved.get(k, "(absent)") != settings[k])
        if growable and changed == [growable] and 0 <= int(saved[growable] or 0) < settings[growable]:
            log.info("%s: extending the run from %d to %d %s", out_dir, saved[growable], settings[growable], growable)
            write_json(path, settings)
            return
        if changed:
            raise FacteditError(
                f"{out_dir} holds a run with other settings ({', '.join(changed)} differ): "
                f"choose another run=NAME or out_dir=, or delete {out_dir} to start over"
            )
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
    from factedit.rome import facts_of, load_edits

    path = resolve_checkpoint(cfg.edits)
    edits, _ = load_edits(path, base_fingerprint=model_fingerprint(model))
    facts = facts_of(edits)
    names = {f.get("name") for f in facts}
    pairs = {(f.get("subject"), f.get("target_new")) for f in facts}
    matched = [r for r in records if f"case{r.case_id}" in names or (r.subject, r.target_new) in pairs]
    if not matched:
        for index, fact in enumerate(facts):
            if not fact.get("target_true"):
                skipped.append(Skipped(f"edit {index}", "the saved fact has no target_true to compare against"))
                continue
            matched.append(
                Record(
                    index,
                    fact["subject"],
                    fact["prompt"],
                    fact["target_new"],
                    fact["target_true"],
                    paraphrase_prompts=list(fact.get("generalization_probes") or []),
                    neighborhood_prompts=list(fact.get("specificity_probes") or []),
                )
            )
    log.info("edits=%s: %d saved edit(s), %d record(s) to measure", path, len(edits), len(matched))
    return SavedEdits(edits, str(path)), matched


def make_trainer(trainer_cfg: dict) -> lightning.Trainer:
    for message in (".*DistributedSampler.*", ".*does not have many workers.*", ".*test_step. returned .None.*"):
        warnings.filterwarnings("ignore", message=message)
    return lightning.Trainer(**{"logger": False, **trainer_cfg, "inference_mode": False})


def run(cfg) -> Path | None:
    if cfg.compare:
        return _compare(cfg)
    model, tokenizer = load_model(cfg.model)
    if cfg.sequential:
        return run_lifelong(cfg, model, tokenizer)
    records, skipped = load_data(cfg, cfg.data.limit)
    if cfg.edits:
        editor, records = saved_editor(cfg, model, records, skipped)
    else:
        editor = make_editor(cfg, model, tokenizer)
    if not records:
        raise FacteditError(f"no valid records to evaluate in {data_file(cfg)} ({len(skipped)} skipped)")
    out_dir = output_dir(cfg, editor_name(cfg, editor))
    out_dir.mkdir(parents=True, exist_ok=True)
    check_settings(out_dir, run_settings(cfg, model, tokenizer, editor))
    return evaluate_records(cfg, model, tokenizer, editor, records, skipped, out_dir)


def is_zsre(cfg) -> bool:
    """Whether the configured data is zsRE (data=zsre), scored by token accuracy."""
    return cfg.data.get("kind") == "zsre"


def data_file(cfg) -> Path:
    """The file the configured data reads: data.path, or the default file of its kind."""
    if cfg.data.path:
        return Path(str(cfg.data.path))
    if is_zsre(cfg):
        from factedit.data.zsre import ZSRE_FILE

        return ZSRE_FILE
    return DEV_FILE


def load_data(cfg, limit):
    """(records, skipped) of the configured data: CounterFact (either format) or zsRE."""
    if is_zsre(cfg):
        from factedit.data.zsre import load_zsre

        return load_zsre(data_file(cfg), limit)
    if cfg.data.get("kind", "counterfact") != "counterfact":
        raise FacteditError(f"data.kind={cfg.data.kind!r}: use counterfact or zsre (data=counterfact, data=zsre)")
    return load_records(data_file(cfg), limit)


def run_lifelong(cfg, model, tokenizer) -> Path:
    """sequential=true: the first data.limit records edited in steps, the file's last control_records measured."""
    from factedit.evaluation.sequential import run_sequential

    if cfg.edits or cfg.editor.get("name") not in ("rome", "memit"):
        raise FacteditError("sequential=true runs editor=rome or editor=memit (not saved edits or other editors)")
    edited, control = lifelong_records(cfg)
    editor = make_editor(cfg, model, tokenizer)
    default = f"seq-{editor.name}-{cfg.model.name}-{Path(str(cfg.data.path or cfg.data.kind)).stem}"
    out_dir = Path(cfg.out_dir) if cfg.out_dir else LOG_ROOT / str(cfg.run or default)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {**run_settings(cfg, model, tokenizer, editor), "gen": False, "pre": False, "records": len(edited)}
    options = "batch_size checkpoint_every control_records perplexity_tokens generation_prompts generation_tokens"
    settings["sequential"] = {key: cfg[key] for key in options.split()}
    check_settings(out_dir, settings, growable="records")
    return run_sequential(cfg, model, tokenizer, editor, edited, control, out_dir, settings["fingerprint"])


def lifelong_records(cfg) -> tuple[list[Record], list[Record]]:
    """(edited, control) of a sequential run: the first data.limit records in file order, and the file's last
    control_records, never edited."""
    records, _ = load_data(cfg, None)
    n_control = int(cfg.control_records)
    if n_control < 0 or n_control >= len(records):
        raise FacteditError(f"control_records={n_control}: use 0..{len(records) - 1} (the file holds {len(records)})")
    control = records[len(records) - n_control :]
    return records[: len(records) - n_control][: None if cfg.data.limit is None else int(cfg.data.limit)], control


def _compare(cfg) -> None:
    """compare=[...]: the side-by-side table of finished runs, or their curves when they are sequential runs."""
    chart = Path(cfg.compare_chart) if cfg.compare_chart else LOG_ROOT / "compare.png"
    runs = [Path(str(r)) if Path(str(r)).is_dir() else LOG_ROOT / str(r) for r in cfg.compare]
    if all((run / "curve.jsonl").is_file() for run in runs):
        from factedit.evaluation.curves import compare_curves

        table = compare_curves(runs, chart)
    else:
        table = compare(list(cfg.compare), LOG_ROOT, chart)
    print(table)
    (chart.with_suffix(".md")).write_text(table + "\n")
    return None


def evaluate_records(cfg, model, tokenizer, editor, records: list[Record], skipped: list[Skipped], out_dir: Path):
    """The records not yet in out_dir/records.jsonl through trainer.test; then the summary of all of them."""
    wanted, lines = {r.case_id for r in records}, out_dir / "records.jsonl"
    drop_incomplete_line(lines)
    prior = {r["case_id"]: r for r in read_lines(lines) if r.get("case_id") in wanted}
    if prior:
        log.info("resuming %s: %d of %d records already done", out_dir, len(prior), len(records))
    datamodule = CounterFactDataModule(records, done=set(prior))
    gen = OmegaConf.to_container(cfg.gen, resolve=True) if cfg.gen else None
    evaluator = CounterFactEvaluator(model, tokenizer, editor, relations_of(records), records_file=lines, gen=gen,
                                     pre=cfg.pre, prior=list(prior.values()), seed=int(cfg.seed),
                                     zsre=is_zsre(cfg))  # fmt: skip
    start, devices = time.perf_counter(), 0
    if datamodule.records:
        trainer = make_trainer(OmegaConf.to_container(cfg.trainer, resolve=True))
        trainer.test(evaluator, datamodule=datamodule, verbose=False)
        if trainer.global_rank != 0:
            return None
        devices = trainer.world_size
    else:  # every record is done: only the summary is written again
        evaluator.summarize(prior=True)
    seconds, new = time.perf_counter() - start, len(datamodule.records)
    name = editor_name(cfg, editor)
    info = dict(run=out_dir.name, editor=name, label=cfg.label or name, model=str(cfg.model.name),
                data=str(data_file(cfg)), limit=cfg.data.limit, devices=devices, gen=gen,
                seconds_this_run=round(seconds, 1), records_this_run=new,
                records_per_second=round(new / seconds, 4) if new else None)  # fmt: skip
    results = {r["case_id"]: r for r in read_lines(lines) if r.get("case_id") in wanted}
    failed = sorted(case for case, r in results.items() if r.get("error"))
    change = change_from_unedited(results.values(), seed=int(cfg.seed))
    summary = build_summary(evaluator.summary, info=info, skipped=skipped, failed_ids=failed, change=change)
    print(write_run_report(out_dir, summary))
    log.info("wrote %s (summary.json, summary.md, summary.png, records.jsonl)", out_dir)
    return out_dir

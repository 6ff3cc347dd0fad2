"""What `src/trace.py` runs: model and settings from the config, the trace, its figures and JSON."""

import logging
import re
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from factedit.architectures import get_module, module_name
from factedit.errors import FacteditError
from factedit.io import write_json
from factedit.models import load_model, model_fingerprint
from factedit.options import check_trace_fact
from factedit.paths import SHARED_DATA_DIR
from factedit.tokens import check_prompt_lengths, fill_prompt
from factedit.tracing.aggregate import average_effects, known_facts, read_counterfact, trace_facts
from factedit.tracing.causal_trace import check_settings, embedding_std, trace_fact
from factedit.tracing.plots import plot_effect_heatmaps, plot_effect_lines, plot_heatmap

log = logging.getLogger(__name__)
DEFAULT_COUNTERFACT = SHARED_DATA_DIR / "counterfact" / "counterfact_original_format.json"


def run(cfg: DictConfig) -> None:
    modes = {"single": trace_single, "aggregate": trace_aggregate}
    if cfg.mode not in modes:
        raise FacteditError(f"mode={cfg.mode!r}: use one of {', '.join(modes)}")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    modes[cfg.mode](cfg)


# ---------------------------------------------------------------- settings shared by both modes


def _counterfact_path(cfg) -> Path:
    return Path(cfg.data.path) if cfg.data.get("path") else DEFAULT_COUNTERFACT


def noise_basis(model, tokenizer, cfg, subjects: list[str] | None) -> dict:
    """Embedding std (noise = cfg.noise × std) and the tokens `corruption=replace` draws from.

    subjects: ROME's basis, the std over the embeddings of CounterFact subjects; vocab: over every token.
    """
    if cfg.noise_std_from not in ("subjects", "vocab"):
        raise FacteditError(f"noise_std_from={cfg.noise_std_from!r}: use subjects or vocab")
    embed = get_module(model, module_name(model, "embed"))
    if cfg.noise_std_from == "subjects" and not subjects:
        log.warning(
            "no CounterFact file at %s: measuring the embedding std over the whole vocabulary", _counterfact_path(cfg)
        )
    texts = subjects if cfg.noise_std_from == "subjects" and subjects else None
    if texts:
        ids = sorted({i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]})
        replacement_ids = torch.tensor(ids)
    else:
        replacement_ids = torch.arange(embed.weight.shape[0])
    return {
        "embed_std": embedding_std(model, tokenizer, texts),
        "replacement_ids": replacement_ids,
        "embedding_weight_std": float(embed.weight.std()),
    }


def trace_settings(cfg, basis: dict) -> dict:
    """Keyword arguments of trace_fact from the config."""
    kinds = list(cfg.kinds)
    return {
        "samples": int(cfg.samples),
        "noise": float(cfg.noise),
        "embed_std": basis["embed_std"],
        "window": int(cfg.window),
        "corruption": str(cfg.corruption),
        "replacement_ids": basis["replacement_ids"],
        "kinds": kinds,
        "seed": int(cfg.seed),
        "batch_size": int(cfg.batch_size),
    }


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "fact"


def fact_from_config(cfg) -> dict:
    """subject, prompt, target_true (optional) and a name for the output folder."""
    check_trace_fact(cfg.fact)
    fact = {key: cfg.fact.get(key) for key in ("subject", "prompt", "target_true", "name")}
    if not fact["name"] or _fact_overridden():
        fact["name"] = _slug(fact["subject"])
    return fact


def _fact_overridden() -> bool:
    """Whether the fact's subject or prompt came from the command line (then the config's name is wrong)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except (ImportError, ValueError):
        return False
    return any(o.lstrip("+~").startswith(("fact.subject=", "fact.prompt=")) for o in overrides)


# ---------------------------------------------------------------- single fact


def trace_single(cfg: DictConfig) -> dict:
    """Trace the configured fact: three heatmaps (PNG, PDF) and trace.json in the output folder."""
    fact = fact_from_config(cfg)
    model, tokenizer = load_model(cfg.model)
    check_prompt_lengths(tokenizer, model, [fill_prompt(fact["prompt"], fact["subject"])])
    check_settings(model, cfg.samples, cfg.window, cfg.corruption, cfg.noise, cfg.kinds)
    path = _counterfact_path(cfg)
    subjects = [f["subject"] for f in read_counterfact(path)] if path.is_file() else None
    basis = noise_basis(model, tokenizer, cfg, subjects)
    settings = dict(force=bool(cfg.force), min_prob=float(cfg.min_prob), **trace_settings(cfg, basis))
    result = trace_fact(
        model, tokenizer, fact["prompt"], fact["subject"], fact.get("target_true"), **settings
    ).to_dict()
    out_dir = Path(cfg.out_dir) if cfg.get("out_dir") else Path("logs") / "trace" / fact["name"] / str(cfg.model.name)
    result.update(model=str(cfg.model.name), fact_name=fact["name"], embedding_std=basis["embed_std"],
                  embedding_weight_std=basis["embedding_weight_std"])  # fmt: skip
    write_json(out_dir / "trace.json", result)
    for kind in result["scores"]:
        plot_heatmap(result, kind, out_dir / kind, model_name=str(cfg.model.name))
    _log_result(result)
    log.info("wrote %s", out_dir)
    return result


def _log_result(result: dict) -> None:
    """The clean and corrupted probabilities and each kind's strongest restoration."""
    log.info("%s: P(%r) clean %.3f, corrupted %.3f (noise %.3f = %.1f × embedding std %.4f)", result["text"],
             result["target"], result["clean_prob"], result["corrupted_prob"], result["noise_std"], result["noise"],
             result["embedding_std"])  # fmt: skip
    for kind, scores in result["scores"].items():
        scores = np.array(scores)
        token, layer = np.unravel_index(scores.argmax(), scores.shape)
        log.info("  %-6s strongest restoration: token %d %r, layer %d, p=%.3f", kind, token, result["tokens"][token],
                 layer, scores[token, layer])  # fmt: skip


# ---------------------------------------------------------------- many facts


def trace_aggregate(cfg: DictConfig) -> dict | None:
    """Trace known CounterFact facts (Lightning predict) and average their indirect effects."""
    model, tokenizer = load_model(cfg.model)
    check_settings(model, cfg.samples, cfg.window, cfg.corruption, cfg.noise, cfg.kinds)
    records = read_counterfact(_counterfact_path(cfg))
    limit = int(cfg.data.limit) if cfg.data.get("limit") is not None else None
    facts = known_facts(model, tokenizer, records, limit)
    if not facts:
        raise FacteditError(f"{cfg.model.name} answers none of the CounterFact records correctly: nothing to trace")
    log.info("tracing %d CounterFact facts that %s answers correctly", len(facts), cfg.model.name)
    basis = noise_basis(model, tokenizer, cfg, [r["subject"] for r in records])
    settings = trace_settings(cfg, basis)
    tag = {key: value for key, value in settings.items() if key != "replacement_ids"}
    tag.update(model=str(cfg.model.name), fingerprint=model_fingerprint(model))
    out_dir = Path(cfg.out_dir) if cfg.get("out_dir") else Path("logs") / "trace" / "aggregate" / str(cfg.model.name)
    results = trace_facts(
        model, tokenizer, facts, settings, out_dir, tag, OmegaConf.to_container(cfg.trainer, resolve=True)
    )
    if results is None:  # not rank 0
        return None
    summary = average_effects(results, str(cfg.model.name))
    summary.update(embedding_std=basis["embed_std"], embedding_weight_std=basis["embedding_weight_std"])
    write_json(out_dir / "aggregate.json", summary)
    plot_effect_lines(summary, out_dir / "aie_lines")
    plot_effect_heatmaps(summary, out_dir / "aie_heatmaps")
    log.info(
        "%d facts: P(true) clean %.3f, corrupted %.3f, total effect %.3f",
        summary["n_facts"],
        summary["clean_prob"],
        summary["corrupted_prob"],
        summary["total_effect"],
    )
    for name, value in summary["peaks"].items():
        log.info("  peak AIE of %-28s layer %2d  (%.3f)", name + ":", value["layer"], value["aie"])
    log.info("wrote %s", out_dir)
    return summary

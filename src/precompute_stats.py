"""Precompute C = E[k kᵀ] at the edit layer(s): `python src/precompute_stats.py [model=...] [layers=[...]]`.

`report=true` prints the convergence report (cosine of u = C⁻¹k at n tokens against all tokens).
"""

from omegaconf import DictConfig, OmegaConf

from factedit.cli import entry
from factedit.models import load_model
from factedit.stats import compute_second_moment


def run(cfg: DictConfig) -> None:
    model, tokenizer = load_model(cfg.model)
    layers = cfg.model.rome.layer if cfg.layers is None else cfg.layers
    layers = [int(layers)] if isinstance(layers, (int, str)) else [int(layer) for layer in layers]
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    data = dict(
        source=cfg.data.source,
        max_tokens=cfg.data.max_tokens,
        seq_len=cfg.data.seq_len,
        batch_size=cfg.data.batch_size,
        seed=cfg.seed,
    )
    if cfg.report:
        from factedit.stats.convergence import convergence_report

        data["max_tokens"] = cfg.report_max_tokens
        convergence_report(
            model,
            tokenizer,
            layers[0],
            subjects=cfg.report_subjects,
            reference_source=cfg.report_reference_source,
            trainer_kwargs=trainer_kwargs,
            **data,
        )
        return
    compute_second_moment(
        model,
        tokenizer,
        layers,
        save_every=cfg.data.save_every,
        trainer_kwargs=trainer_kwargs,
        stats_dir=cfg.stats_dir,
        force=cfg.force,
        **data,
    )


if __name__ == "__main__":
    entry("precompute_stats", run)

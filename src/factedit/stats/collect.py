"""One Lightning pass over Wikipedia rows that accumulates C = E[k kᵀ] at several rewrite modules.

The forward stops at the deepest requested rewrite module (hooks.Trace(stop=True)), so a layer-5
edit of a 30-layer model runs 6 layers. Every `save_every` batches the sums and the data position
are written to `<result>.partial.safetensors`; rerunning the same command continues from there
and gives the same C as an uninterrupted run.
"""
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import OmegaConf

from factedit.architectures import check_layer, module_name
from factedit.data.wikipedia import WikipediaDataModule
from factedit.hooks import Trace
from factedit.models import model_fingerprint
from factedit.paths import CONFIG_DIR
from factedit.stats.files import (FORMAT, code_version, key_dim, model_name, partial_path, read_partial, read_result,
                                  stats_path, write_partial, write_result)
from factedit.stats.second_moment import SecondMoment

log = logging.getLogger(__name__)


def trainer_defaults() -> dict:
    """configs/trainer/gpu.yaml when CUDA is available, else cpu.yaml."""
    name = "gpu" if torch.cuda.is_available() else "cpu"
    return OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "trainer" / f"{name}.yaml"))


@dataclass
class LayerJob:
    """One rewrite module whose C this pass accumulates.

    path: the result file to write (None: keep C in memory only, as the convergence report does).
    start_row: rows 0..start_row-1 are already summed in resume_state = (key_outer_sum, count).
    """

    layer: int
    module: str
    path: Path | None
    metadata: dict
    start_row: int = 0
    resume_state: tuple[torch.Tensor, torch.Tensor] | None = None


class StatsCollector(lightning.LightningModule):
    """predict_step: forward up to the deepest rewrite module, then SecondMoment.update per layer.

    batch: {"input_ids": (batch, seq_len), "row": (batch,) global row index, -1 for padding}.
    After the pass, `second_moments[layer]` holds C: (d_mlp, d_mlp) float64 on CPU.
    """

    def __init__(self, model, jobs: list[LayerJob], *, num_rows: int, skip_rows: int, batch_size: int, save_every: int = 0):
        super().__init__()
        self.model, self.jobs = model, jobs
        self.moments = torch.nn.ModuleDict({str(job.layer): SecondMoment(key_dim(model, job.layer)) for job in jobs})
        self.num_rows, self.skip_rows, self.batch_size, self.save_every = num_rows, skip_rows, batch_size, save_every
        self.batches_done, self.started, self.seconds = 0, time.perf_counter(), 0.0
        self.second_moments: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self.written: dict[int, Path] = {}

    def on_predict_start(self) -> None:
        self.started = time.perf_counter()
        if self.global_rank == 0:  # the saved sums enter once; other ranks start from zero
            for job in self.jobs:
                if job.resume_state is not None:
                    self.moments[str(job.layer)].load_state(*job.resume_state)

    def predict_step(self, batch, batch_idx):
        names = [job.module for job in self.jobs]
        with torch.no_grad(), Trace(self.model, names, retain_input=True, retain_output=False, stop=True) as trace:
            self.model(input_ids=batch["input_ids"], use_cache=False)
        for job in self.jobs:
            keep = batch["row"] >= job.start_row  # rows a resumed state already holds, and padding, are skipped
            self.moments[str(job.layer)].update(trace[job.module].input[keep])  # keys: (rows, seq_len, d_mlp)
        self.batches_done += 1

    def rows_done(self) -> int:
        """Rows 0..rows_done-1 are in the sums of all ranks together."""
        world = self.trainer.world_size if self._trainer is not None else 1
        return min(self.skip_rows + self.batches_done * self.batch_size * world, self.num_rows)

    def on_predict_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.save_every and self.batches_done % self.save_every == 0 and self.rows_done() < self.num_rows:
            self.save(final=False)

    def on_predict_epoch_end(self) -> None:
        self.seconds = time.perf_counter() - self.started  # the loop only, without process start-up
        self.save(final=True)

    def save(self, final: bool) -> None:
        """Sum the states over ranks; rank 0 writes partial or result files. Every rank must call it."""
        rows_done = self.rows_done()
        for job in self.jobs:
            moment = self.moments[str(job.layer)]
            with moment.sync_context():
                key_outer_sum, count = moment.key_outer_sum.cpu().clone(), moment.count.cpu().clone()
            if final:
                self.second_moments[job.layer], self.counts[job.layer] = key_outer_sum / count, int(count)
            if self.global_rank != 0 or job.path is None:
                continue
            if not final:
                write_partial(job.path, key_outer_sum, count, job.metadata, rows_done=max(rows_done, job.start_row))
                continue
            path = job.path
            if int(count) != int(job.metadata["tokens"]):  # a streamed source that ended early
                path = path.with_name(f"{job.metadata['source']}-{int(count)}.safetensors")
            write_result(path, key_outer_sum, count, job.metadata)
            partial_path(job.path).unlink(missing_ok=True)
            self.written[job.layer] = path
        if self._trainer is not None:
            self.trainer.strategy.barrier("second_moment_saved")


class TokenRateBar(TQDMProgressBar):
    """Lightning's progress bar for the predict loop, with keys counted in tokens/s."""

    def __init__(self, tokens_per_batch: int, **kwargs):
        super().__init__(**kwargs)
        self.tokens_per_batch = tokens_per_batch
        self.started = time.perf_counter()

    @property
    def predict_description(self) -> str:
        return "C = E[k kᵀ]"

    def on_predict_start(self, trainer, pl_module) -> None:
        super().on_predict_start(trainer, pl_module)
        self.started = time.perf_counter()

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        self.predict_progress_bar.set_description("C = E[k kᵀ]")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        tokens = (batch_idx + 1) * self.tokens_per_batch * trainer.world_size
        rate = tokens / max(time.perf_counter() - self.started, 1e-9)
        self.predict_progress_bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)


def make_trainer(trainer_kwargs: dict | None, tokens_per_batch: int, callbacks=()) -> lightning.Trainer:
    """lightning.Trainer(**trainer_kwargs) without logger, checkpoints or summary, with the tokens/s bar."""
    kwargs = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
              **(trainer_defaults() if trainer_kwargs is None else dict(trainer_kwargs))}
    callbacks = [*(kwargs.pop("callbacks", None) or []), *callbacks]
    if kwargs.get("enable_progress_bar", True):
        callbacks.append(TokenRateBar(tokens_per_batch))
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (".*does not have many workers.*", ".*IterableDataset. has .__len__. defined.*",
                    ".*predict returned None.*", ".*treespec, LeafSpec.*"):
        warnings.filterwarnings("ignore", message=message)
    return lightning.Trainer(**kwargs, callbacks=callbacks)


def plan_jobs(model, layers, datamodule: WikipediaDataModule, precision: str, *, stats_dir=None, force=False,
              write=True) -> tuple[list[LayerJob], dict[int, Path]]:
    """Jobs for the layers still to compute, and the result files that already exist for this model."""
    fingerprint, name, tokens = model_fingerprint(model), model_name(model), datamodule.num_tokens
    jobs, existing = [], {}
    for layer in sorted({check_layer(model, layer) for layer in layers}):
        module = module_name(model, "rewrite", layer)
        metadata = {"format": FORMAT, "code_version": code_version(), "model": name, "fingerprint": fingerprint,
                    "module": module, "layer": layer, "source": datamodule.source, "tokens": tokens,
                    "seq_len": datamodule.seq_len, "seed": datamodule.seed, "precision": precision}
        if not write:
            jobs.append(LayerJob(layer, module, None, metadata))
            continue
        path = stats_path(stats_dir, name, module, datamodule.source, tokens)
        if path.is_file() and not force:
            read_result(path, model, layer, fingerprint)  # refuses a file of other weights, naming force=true
            log.info("%s exists (force=true recomputes it)", path)
            existing[layer] = path
            continue
        resumed = None if force else read_partial(path, metadata)
        if resumed is not None:
            log.info("continuing %s from row %d of %d", partial_path(path), resumed[2], datamodule.num_rows)
        jobs.append(LayerJob(layer, module, path, metadata, start_row=resumed[2] if resumed else 0,
                             resume_state=resumed[:2] if resumed else None))
    return jobs, existing


def run_pass(model, datamodule: WikipediaDataModule, jobs: list[LayerJob], *, save_every: int = 0,
             trainer_kwargs: dict | None = None, callbacks=()) -> StatsCollector:
    """trainer.predict over the rows not yet in every job's sums; the model returns to its device after."""
    datamodule.skip_rows = min(job.start_row for job in jobs)
    collector = StatsCollector(model, jobs, num_rows=datamodule.num_rows, skip_rows=datamodule.skip_rows,
                               batch_size=datamodule.batch_size, save_every=save_every)
    trainer = make_trainer(trainer_kwargs, datamodule.batch_size * datamodule.seq_len, callbacks)
    device = next(model.parameters()).device
    try:
        trainer.predict(collector, datamodule=datamodule, return_predictions=False)
    finally:
        model.to(device)
    return collector


def compute_second_moment(model, tokenizer, layers, *, source: str = "wiki_offline", max_tokens: int | None = 524_288,
                          seq_len: int = 512, batch_size: int = 16, trainer_kwargs: dict | None = None, seed: int = 0,
                          save_every: int = 20, stats_dir=None, force: bool = False) -> dict[int, Path]:
    """Write C = E[k kᵀ] for the rewrite module of each layer in `layers`; return {layer: file}.

    The defaults are those of configs/data/wikipedia.yaml (a test keeps them equal); max_tokens=None
    takes all of a local source. trainer_kwargs are lightning.Trainer flags (default
    configs/trainer/cpu.yaml, or gpu.yaml with CUDA). Files that exist for these weights are kept
    (force=True recomputes them); the partial file of an interrupted run is continued.
    """
    layers = [layers] if isinstance(layers, int) else list(layers)
    trainer_kwargs = trainer_defaults() if trainer_kwargs is None else dict(trainer_kwargs)
    datamodule = WikipediaDataModule(tokenizer, source, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, seed=seed)
    jobs, existing = plan_jobs(model, layers, datamodule, str(trainer_kwargs.get("precision", "32-true")),
                               stats_dir=stats_dir, force=force)
    if not jobs:
        return existing
    collector = run_pass(model, datamodule, jobs, save_every=save_every, trainer_kwargs=trainer_kwargs)
    new_tokens = (datamodule.num_rows - datamodule.skip_rows) * seq_len
    for layer, path in collector.written.items():  # rank 0 only
        log.info("wrote %s: %d tokens (%d in this run) in %.1f s, %.0f tokens/s",
                 path, collector.counts[layer], new_tokens, collector.seconds, new_tokens / collector.seconds)
    written = collector.written or {job.layer: job.path for job in jobs}
    return {**existing, **written}

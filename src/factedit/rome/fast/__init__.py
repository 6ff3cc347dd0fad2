"""How the v* steps run, apart from what they compute (compute_value.py holds the loss and the fit).

`value_engine(model, layer, batch, hparams)` is the one entry point, a context manager that yields
an `Engine`. Inside the block:

  * the model runs only what δ can reach: the layers below L and the positions before each subject
    are computed once (frozen_prefix.py), GPT-2 / GPT-J activations are one kernel
    (fused_activations.py), and float32 products use TF32 on a GPU;
  * `engine.zero_run` is the edit's one pass through the unedited model (δ = 0): the frozen run, or
    the full forward where the model cannot be frozen or hparams.fast is false;
  * `engine.fit(trainer, module)` runs Trainer.fit with bfloat16 copies of the weights δ reaches
    (low_precision.py), and `engine.stepper(...)` runs each optimization step eagerly (`EagerSteps`)
    or as a CUDA graph replay kept from one fit to the next (step_graph.py).

Every one of these computes the same function as the straightforward loop (tested in float64, or
bitwise where only casts move); they make it cheaper.
"""

import contextlib
import logging
from dataclasses import dataclass

import lightning
import torch

from factedit.architectures import module_name
from factedit.cli import quiet_warnings
from factedit.hooks import Trace
from factedit.rome.fast.frozen_prefix import LiveBatch, can_freeze, frozen_context
from factedit.rome.fast.fused_activations import fused_activations
from factedit.rome.fast.low_precision import bf16_autocast, bf16_fit, resolve_bf16
from factedit.rome.fast.step_graph import GraphSteps, graph_signature, graphs_of
from factedit.rome.hparams import RomeHparams
from factedit.rome.value_batch import ValueBatch, ZeroRun

__all__ = ["EagerSteps", "Engine", "full_zero_run", "value_engine"]
log = logging.getLogger(__name__)
_FIT_TRAINER = dict(max_epochs=1, devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                    enable_progress_bar=False, num_sanity_val_steps=0)  # fmt: skip


class EagerSteps:
    """Each step runs as it is called, and its losses are read at once."""

    graph_use = None  # no graph (GraphSteps: "captured" or "kept")

    def __init__(self, step, optimizer, state):
        self._step, self._optimizer, self._state = step, optimizer, state

    def step(self) -> list[list]:
        """Run one step; the losses of the steps finished since the last call (here: this one)."""
        return [self._step(self._optimizer).tolist()]

    def stop_facts(self, facts: list[int]) -> None:
        """These facts reached the threshold at the step just read: keep their δ from now on, and leave
        their rows out of the next steps."""
        self._state.active[facts] = False
        self._state.narrow_to_active()

    def finish(self) -> list[list]:
        return []


@dataclass
class Engine:
    """The prepared v* run of one ValueBatch (see the module docstring). `live` is None on the
    straightforward path (full forward each step); `fast` also unembeds only the positions read."""

    model: torch.nn.Module
    layer: int
    batch: ValueBatch
    live: LiveBatch | None
    zero_run: ZeroRun
    bf16: bool
    fast: bool
    hparams: RomeHparams

    @property
    def inputs(self) -> dict:
        """The model's keyword arguments for one step."""
        if self.live is not None:
            return self.live.inputs
        return {"input_ids": self.batch.input_ids, "attention_mask": self.batch.attention_mask}

    @property
    def positions(self) -> ValueBatch | LiveBatch:
        """Where a step's rows hold the subject and the targets (subject_pos, target_pos, target_ids, target_weight)."""
        return self.live if self.live is not None else self.batch

    @property
    def cuda_graph(self) -> bool:
        return self.hparams.cuda_graph and self.live is not None and self.model.device.type == "cuda"

    def autocast(self):
        """Around each step's forward and backward: bfloat16 products when the fit is bfloat16."""
        return bf16_autocast(self.model.device, self.bf16)

    def fit(self, module: lightning.LightningModule, trainer_kwargs: dict | None = None) -> None:
        """Trainer.fit(module) on the model's own device, with the weights δ reaches as bfloat16 copies (when bf16)."""
        quiet_warnings()
        accelerator = "gpu" if self.model.device.type == "cuda" else "cpu"  # never move the model elsewhere
        trainer = lightning.Trainer(**{**_FIT_TRAINER, **(trainer_kwargs or {}), "accelerator": accelerator})
        graphs = graphs_of(self.model, self.hparams.graph_cache) if self.cuda_graph else None
        with bf16_fit(self.model, self.layer, self.bf16, kept=graphs.bf16_weights if graphs else None):
            trainer.fit(module)
        module.to(self.model.device)  # Lightning's teardown moved the module's δ to the CPU

    def stepper(self, step, optimizer, state, step_inputs: list[torch.Tensor]):
        """EagerSteps, or GraphSteps on a GPU. step(optimizer) -> losses runs one step on `state`
        (δ, delta_before, active); step_inputs: what it reads besides the live batch and the weights."""
        if not self.cuda_graph:
            return EagerSteps(step, optimizer, state)
        inputs = self.live.step_inputs(self.layer) + step_inputs
        hp, rewrite = self.hparams, module_name(self.model, self.hparams.role, self.layer)
        options = (
            self.layer,
            rewrite,
            self.fast and hp.fused_activations,
            self.bf16,
            hp.v_lr,
            hp.v_weight_decay,
            hp.clamp_norm_factor,
            hp.kl_factor,
        )
        kept = graphs_of(self.model, hp.graph_cache)
        return GraphSteps(step, optimizer, state, inputs, graph_signature(self.model, options, inputs), kept)


@contextlib.contextmanager
def value_engine(model, layer: int, batch: ValueBatch, hparams: RomeHparams):
    """Yield the Engine of `batch` at `layer`: the one pass at δ = 0 is made on entry."""
    bf16 = resolve_bf16(hparams.bf16, model.device, model.dtype)
    freeze = hparams.fast and can_freeze(model, batch)
    if hparams.fast and not freeze:
        log.warning(
            "attention %r, sliding window %s: v* runs the full forward each step",
            model.config._attn_implementation,
            getattr(model.config, "sliding_window", None),
        )
    fuse = hparams.fast and hparams.fused_activations
    keep_graphs = model.device.type == "cuda" and hparams.cuda_graph and hparams.graph_cache > 0  # pad to shared shapes
    with contextlib.ExitStack() as stack:
        stack.enter_context(matmul_precision(model, hparams.tf32))  # the frozen run in TF32 too
        if fuse:
            stack.enter_context(fused_activations(model))  # around the frozen run too: one function
        live = (
            stack.enter_context(frozen_context(model, layer, batch, bf16, keep_graphs, hparams.role))
            if freeze
            else None
        )
        run = live.zero_run if live is not None else full_zero_run(model, batch, layer, hparams.role)
        yield Engine(model, layer, batch, live, run, bf16, hparams.fast, hparams)


def full_zero_run(model, batch: ValueBatch, layer: int, role: str = "rewrite") -> ZeroRun:
    """One full forward of `batch` at δ = 0 (the straightforward path, and the tests' reference)."""
    rewrite, final = module_name(model, role, layer), module_name(model, "final_norm")
    with torch.no_grad(), Trace(model, [rewrite, final], retain_input=True, stop=True) as trace:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return ZeroRun(trace[rewrite].input, trace[rewrite].output, trace[final].output)


@contextlib.contextmanager
def matmul_precision(model, tf32: bool):
    """On a GPU with tf32=True, float32 matrix products use TF32 inside the block (restored after)."""
    if model.device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)

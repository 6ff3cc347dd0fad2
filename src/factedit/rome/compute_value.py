"""v* = v₀ + δ: the value that makes the model say the new object (ROME eq. 4), as a LightningModule.

The only trainable parameter is δ, added to the rewrite module's output at the subject's last
token of every prompt. Loss = mean NLL of target_new over the context-templated prompts
+ kl_factor · KL(edited ‖ original) on "{subject} is a" + weight decay on ‖δ‖.
"""
import contextlib
import logging
import math
import time

import lightning
import torch
import torch.nn.functional as F

from factedit.architectures import get_module, module_name
from factedit.cli import quiet_warnings
from factedit.errors import FacteditError
from factedit.hooks import Trace, add_at_positions
from factedit.rome.frozen_prefix import LiveBatch, can_freeze, frozen_context
from factedit.rome.fused_activations import fused_activations
from factedit.rome.low_precision import bf16_autocast, bf16_fit, resolve_bf16
from factedit.rome.step_graph import StepGraph, clear_cublas_workspaces, graphs_of, inputs_signature, weights_signature
from factedit.tokens import fill_subject, subject_token_range

log = logging.getLogger(__name__)
KL_PROMPTS = ["{} is a"]
LOSS_NAMES = ("loss", "nll", "kl", "weight_decay", "p_target")
GRAPH_WARMUP = 1  # eager steps before a CUDA graph is captured (they are steps of the optimization too)


def logits_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """Unembed final-norm outputs (…, d_model) -> (…, vocab), with Gemma-style soft-capping."""
    logits = get_module(model, module_name(model, "lm_head"))(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def build_value_batch(tokenizer, prompt: str, subject: str, target_new: str, context_templates: list[str], device=None) -> dict:
    """Tokens and positions for the value loss.

    Rows 0..T-1: context_t + prompt + target tokens but the last (T = len(context_templates));
    the last row(s): the KL prompt(s). Returns input_ids, attention_mask: (rows, seq);
    subject_pos: (rows,) the subject's last token; target_ids: (n_target,);
    target_pos: (T, n_target) positions whose logits predict each target token.
    """
    target_ids = tokenizer(" " + target_new, add_special_tokens=False)["input_ids"]
    if not target_ids:
        raise FacteditError(f"target_new {target_new!r} tokenizes to nothing; give a non-empty object")
    templates = [c.format(prompt) if "{}" in c else c for c in context_templates] + [k for k in KL_PROMPTS]
    rows, subject_pos, target_pos = [], [], []
    for index, template in enumerate(templates):
        text, start = fill_subject(template, subject)
        prompt_ids = tokenizer(text)["input_ids"]
        subject_pos.append(subject_token_range(tokenizer, text, subject, start)[1] - 1)
        if index < len(context_templates):
            target_pos.append([len(prompt_ids) - 1 + j for j in range(len(target_ids))])
            prompt_ids = prompt_ids + target_ids[:-1]
        rows.append(prompt_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "subject_pos": torch.tensor(subject_pos, device=device),
            "target_ids": torch.tensor(target_ids, device=device), "target_pos": torch.tensor(target_pos, device=device)}


class ValueOptimizer(lightning.LightningModule):
    """Optimizes δ (d_model,) for one fact; `target_value` = v₀ + δ after Trainer.fit.

    live: the LiveBatch of `frozen_context` (each step then runs only the positions and layers δ
    reaches); fast=True also unembeds only the positions the loss reads. fast=False, live=None is
    the straightforward full forward with logits at every position, for comparison.
    cuda_graph (GPU and live only): after GRAPH_WARMUP eager steps, each step — forward, backward,
    Adam, clamp — is one CUDA graph replay, and the host reads a step's losses while the next one
    replays. graph_cache > 0 keeps that many captured graphs per model (step_graph.py): a later fit
    with the same shapes replays from its first step. Optimization is manual (one `step` holds all
    of it), so a replayed step does not pass through Lightning's optimizer wrapper:
    trainer.global_step does not count graphed fits; `history` has every step.
    """

    def __init__(self, model, batch: dict, layer: int, *, live: LiveBatch | None = None, role="rewrite", v_lr=0.5,
                 v_weight_decay=0.5, clamp_norm_factor=4.0, kl_factor=0.0625, loss_threshold=0.05, stop_on="nll", fast=True,
                 v_num_grad_steps=20, cuda_graph=False, graph_cache=0, fused_activations=True, bf16=False, **_unused):
        super().__init__()
        self.automatic_optimization = False
        self._frozen_model = (model,)  # not a submodule: Lightning moves its module to the CPU after fit
        self.batch, self.layer, self.live = batch, layer, live
        self.subject_pos = live.subject_pos if live else batch["subject_pos"]
        self.target_pos = live.target_pos if live else batch["target_pos"]
        self.target_ids = live.target_ids if live else batch["target_ids"]
        self.target_weight = live.target_weight if live else torch.ones(self.target_ids.shape, device=self.target_ids.device)
        self.rewrite = module_name(model, role, layer)  # the module whose output δ shifts
        self.final_norm = module_name(model, "final_norm")
        self.lr, self.weight_decay, self.clamp, self.kl_factor = v_lr, v_weight_decay, clamp_norm_factor, kl_factor
        self.loss_threshold, self.fast, self.steps = loss_threshold, fast, int(v_num_grad_steps)
        if stop_on not in ("loss", "nll"):
            raise FacteditError(f"stop_on={stop_on!r}: loss_threshold bounds the whole loss (stop_on=loss, ROME) or the target NLL (stop_on=nll)")
        self.stop_on = stop_on
        self.n_prompts = batch["target_pos"].shape[0]
        with torch.no_grad():
            if live is not None:  # the frozen run already went through the model at δ = 0
                initial_value, keys, kl_hidden, prompt_hidden = (live.initial_value, live.template_keys,
                                                                 live.initial_final_hidden[self.n_prompts:], live.prompt_final_hidden)
            else:
                initial_value, keys, kl_hidden, prompt_hidden = self._initial_run()
            self.register_buffer("initial_value", initial_value.clone())  # v₀
            self.register_buffer("initial_kl_log_probs", logits_from_hidden(model, kl_hidden).log_softmax(-1))
            self.template_keys = keys  # (T, d_in): k at each templated prompt's subject token; k̄ is their mean
            self.prompt_prediction = logits_from_hidden(model, prompt_hidden).argmax(-1)  # (n_target,) row 0's greedy tokens
        self.delta = torch.nn.Parameter(torch.zeros_like(self.initial_value))
        self.history: list[dict] = []
        self.cuda_graph = bool(cuda_graph) and live is not None and self.initial_value.is_cuda
        self.bf16, self.fused = bool(bf16), bool(fused_activations) and fast  # bf16: resolved by compute_value (resolve_bf16)
        self.kept_graphs = graphs_of(model, int(graph_cache)) if self.cuda_graph else None
        self._graph: StepGraph | None = None
        self.graph_use = None  # "captured" (this fit captured its graph) or "kept" (it replayed one kept from an earlier fit)
        self._eager_steps, self._pending = 0, None  # _pending: the replayed step whose losses are not read yet

    @property
    def model(self):
        return self._frozen_model[0]

    # ------------------------------------------------------------------ forward pieces
    def _model_inputs(self):
        if self.live is not None:
            return self.live.inputs
        return {"input_ids": self.batch["input_ids"], "attention_mask": self.batch["attention_mask"]}

    def _initial_run(self):
        """Without a frozen run: one full forward at δ = 0 for v₀ (d_model,), the keys (T, d_in), and
        the final-norm outputs the KL term (KL rows, d_model) and the known-answer check (n_target, d_model) read."""
        with Trace(self.model, [self.rewrite, self.final_norm], retain_input=True, stop=True) as trace:
            self.model(**self._model_inputs())
        rewrite, hidden, subject = trace[self.rewrite], trace[self.final_norm].output, self.subject_pos
        prompts, kl_rows = (torch.arange(a, b, device=hidden.device) for a, b in ((0, self.n_prompts), (self.n_prompts, len(hidden))))
        return (rewrite.output[0, subject[0]], rewrite.input[prompts, subject[prompts]], hidden[kl_rows, subject[kl_rows]],
                hidden[0, self.batch["target_pos"][0]])

    def _final_hidden(self, delta: torch.Tensor) -> torch.Tensor:
        """Final-norm output (rows, seq, d_model) with δ added at each row's subject position."""
        rows = torch.arange(self.batch["input_ids"].shape[0], device=delta.device)
        add_delta = lambda name, hidden: add_at_positions(hidden, rows, self.subject_pos, delta) if name == self.rewrite else hidden
        with Trace(self.model, [self.rewrite, self.final_norm], edit_output=add_delta, stop=True, detach=False) as trace:
            self.model(**self._model_inputs())
        return trace[self.final_norm].output

    def _kl_logits(self, hidden):
        kl_rows = torch.arange(self.n_prompts, hidden.shape[0], device=hidden.device)
        return logits_from_hidden(self.model, hidden[kl_rows, self.subject_pos[kl_rows]])

    def losses(self, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self._final_hidden(delta)
        target_ids, target_pos, weight = self.target_ids, self.target_pos, self.target_weight
        rows = torch.arange(self.n_prompts, device=hidden.device)[:, None]
        if self.fast:
            target_logits = logits_from_hidden(self.model, hidden[rows, target_pos])  # (T, n_target, vocab)
        else:
            target_logits = logits_from_hidden(self.model, hidden)[rows, target_pos]
        target_log_probs = target_logits.log_softmax(-1).gather(-1, target_ids.expand(self.n_prompts, -1)[..., None])[..., 0]
        mean_log_probs = (target_log_probs * weight).sum(dim=1) / weight.sum()  # (T,) over the target's tokens (weight 0: padding)
        nll = -mean_log_probs.mean()
        kl_log_probs = self._kl_logits(hidden).log_softmax(-1)
        kl = F.kl_div(self.initial_kl_log_probs, kl_log_probs, log_target=True, reduction="batchmean")  # KL(edited ‖ original)
        decay = self.weight_decay * delta.norm() / self.initial_value.norm() ** 2
        return {"loss": nll + self.kl_factor * kl + decay, "nll": nll, "kl": kl, "weight_decay": decay,
                "p_target": mean_log_probs.exp().mean()}

    # ------------------------------------------------------------------ one optimization step
    def step(self, optimizer) -> torch.Tensor:
        """Losses at the current δ, dloss/dδ, one Adam step, δ clamped to clamp_norm_factor·‖v₀‖.

        Returns the losses before the update, stacked in LOSS_NAMES order (no host sync), so the
        whole step can be captured as one CUDA graph.
        """
        self.delta.grad = None
        with bf16_autocast(self.delta.device, self.bf16):
            parts = self.losses(self.delta)
        parts["loss"].backward()
        optimizer.step()
        with torch.no_grad():  # a scale factor instead of a branch on the norm: no host sync
            self.delta.mul_((self.clamp * self.initial_value.norm() / self.delta.norm()).clamp(max=1.0))
        return torch.stack([parts[name].detach() for name in LOSS_NAMES])

    def graphed_step(self) -> torch.Tensor:
        """`step` replayed from a CUDA graph. A graph kept from an earlier fit of the same shapes
        (step_graph.py) replays from the first step. Otherwise the first GRAPH_WARMUP steps run
        eagerly on a side stream (capture needs warmed-up kernels and optimizer state) and count as
        real steps; the graph is captured after them and replays every later step with the same
        tensors. Each replay first keeps the δ it starts from (see `training_step`)."""
        if self._graph is not None:
            self._graph.graph.replay()
            return self._graph.losses
        if self._eager_steps == 0 and self.kept_graphs is not None:
            self._signature = self._graph_signature()
            kept = self.kept_graphs.get(self._signature)
            if kept is not None:
                kept.start_fit(self._step_inputs())
                self._graph, self.graph_use = kept, "kept"
                return self.graphed_step()
        optimizer = self.optimizers().optimizer  # the torch optimizer: Lightning's wrapper cannot be replayed
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            losses = self.step(optimizer)
        torch.cuda.current_stream().wait_stream(side)
        self._eager_steps += 1
        if self._eager_steps == GRAPH_WARMUP:
            graph, delta_before = torch.cuda.CUDAGraph(), torch.empty_like(self.delta)
            clear_cublas_workspaces()  # this graph's cuBLAS workspace in its own pool, not one cached from another graph
            try:
                with torch.cuda.graph(graph, pool=self.kept_graphs.pool if self.kept_graphs else None):
                    delta_before.copy_(self.delta)
                    graph_losses = self.step(optimizer)
            except RuntimeError as error:  # a kernel that cannot be captured: the later steps run eagerly
                log.warning("v* runs without CUDA graphs (%s)", str(error).splitlines()[0])
                self.cuda_graph = False
                return losses
            state = optimizer.state[self.delta]  # Adam's step, exp_avg, exp_avg_sq (tensors on the GPU: capturable)
            self._graph = StepGraph(graph, self._step_inputs(), self.delta.detach(), delta_before, graph_losses,
                                    [t for t in state.values() if torch.is_tensor(t)])
            self.graph_use = "captured"
            if self.kept_graphs is not None:
                self.kept_graphs.put(self._signature, self._graph)
        return losses

    def _step_inputs(self) -> list[torch.Tensor]:
        """What a step reads besides the weights and δ (a kept graph's inputs are overwritten with these)."""
        return self.live.step_inputs(self.layer) + [self.initial_value, self.initial_kl_log_probs]

    def _graph_signature(self) -> tuple:
        """What a kept graph must have been captured with to replay this fit's steps."""
        model = self.model
        return (self.layer, self.rewrite, self.fused, self.bf16, torch.get_float32_matmul_precision(),
                model.config._attn_implementation, self.lr, self.weight_decay, self.clamp, self.kl_factor,
                inputs_signature(self._step_inputs()), weights_signature(model))

    # ------------------------------------------------------------------ Lightning hooks
    def train_dataloader(self):
        """One epoch of `steps` dummy batches: the data is the fixed prompt batch held by the module."""
        return torch.utils.data.DataLoader([0] * self.steps, batch_size=1)

    def configure_optimizers(self):
        return torch.optim.Adam([self.delta], lr=self.lr, capturable=self.cuda_graph)

    def on_train_start(self):
        self.model.eval()  # the Trainer put everything in train mode; the frozen model has dropout

    def training_step(self, _batch, _index):
        """One step. Once the graph replays, step i's losses are read while step i + 1 already runs
        on the GPU (the host's per-step work overlaps the replay); when step i's loss is below the
        threshold, step i + 1 is undone (δ goes back to the graph's `delta_before`), so δ and `history` are
        those of the fit that stopped after step i."""
        if self._graph is None:  # eager steps, and the warm-up step before the capture
            losses = self.graphed_step() if self.cuda_graph else self.step(self.optimizers())
            self._record(losses.tolist())
            return
        self.graphed_step()
        previous, self._pending = self._pending, _copy_to_host(self._graph.losses)
        if previous is not None:
            self._record(_read(previous))
            if self.trainer.should_stop:
                with torch.no_grad():
                    self._graph.delta.copy_(self._graph.delta_before)
                self._pending = None

    def _record(self, losses: list[float], log_it=True):
        """Keep one step's losses (LOSS_NAMES order) in `history`; stop below the loss threshold."""
        values = dict(zip(LOSS_NAMES, losses))
        if not math.isfinite(values["loss"]):
            raise FacteditError(f"the value optimization diverged (loss {values['loss']}): lower editor v_lr or model.rome.v_lr")
        self.history.append({k: round(v, 5) for k, v in values.items()})
        if log_it:
            self.log("loss", values["loss"], on_step=True, prog_bar=True)  # each logged value costs ~1 ms of Lightning
            if self.trainer.loggers:
                self.log_dict({k: v for k, v in values.items() if k != "loss"}, on_step=True)
        if values[self.stop_on] < self.loss_threshold:
            self.trainer.should_stop = True

    def on_train_end(self):
        if self._pending is not None:  # the last replayed step's losses (Lightning allows no logging here)
            self._record(_read(self._pending), log_it=False)
        if self._graph is not None and self._graph.delta.data_ptr() != self.delta.data_ptr():  # a kept graph's δ
            with torch.no_grad():
                self.delta.copy_(self._graph.delta)
        freed = self._graph is not None and self.kept_graphs is None
        self._graph = self._pending = self.delta.grad = None  # unless kept (graph_cache), frees the graph and its pool
        if freed:
            clear_cublas_workspaces()

    @property
    def target_value(self) -> torch.Tensor:
        """v* = v₀ + δ, shape (d_model,)."""
        return (self.initial_value + self.delta).detach()


def _copy_to_host(losses: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
    """Queue a copy of a step's losses to pinned host memory; returns the buffer and its event."""
    buffer = torch.empty(losses.shape, dtype=losses.dtype, pin_memory=True)
    buffer.copy_(losses, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return buffer, done


def _read(pending: tuple[torch.Tensor, torch.cuda.Event]) -> list[float]:
    """Wait for a `_copy_to_host` copy only (not for the work queued after it) and read it."""
    buffer, done = pending
    done.synchronize()
    return buffer.tolist()


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


def compute_value(model, tokenizer, fact, layer: int, context_templates: list[str], hparams: dict,
                  trainer_kwargs: dict | None = None) -> ValueOptimizer:
    """Fit δ with a real Lightning Trainer; returns the fitted module (δ, v₀, loss history, and
    `template_keys`: the keys k at each templated prompt's subject token, from the same δ = 0 run).
    Refuses (FacteditError, before any step) a target the model already predicts after the first
    template's prompt: context_templates()[0] is the bare prompt "{}".

    fast (default true): the frozen context (frozen_prefix.py), logits only where the loss reads
    them, and (fused_activations, default true) one-kernel activations; fast=false is the straightforward loop.
    On a GPU: hparams tf32 (default true) lets the v* matrix products use TF32, and cuda_graph
    replays each whole step (forward, backward, Adam, clamp) as one CUDA graph; graph_cache (default
    8) keeps that many graphs per model for later fits of the same (bucketed) shapes. bf16 (true, false,
    auto: where the hardware has it, GPU or CPU) runs the frozen run and each step's forward and
    backward under bfloat16 autocast with the reached weights and biases cast once (low_precision.py); δ, Adam
    and the update stay float32/64.
    """
    start = time.perf_counter()
    batch = build_value_batch(tokenizer, fact.prompt, fact.subject, fact.target_new, context_templates, model.device)
    fast = hparams.get("fast", True)
    freeze = fast and can_freeze(model, batch)
    if fast and not freeze:
        log.warning("attention %r, sliding window %s: v* runs the full forward each step",
                    model.config._attn_implementation, getattr(model.config, "sliding_window", None))
    fuse = fast and hparams.get("fused_activations", True)
    fused = fused_activations(model) if fuse else contextlib.nullcontext()  # around the frozen run too: one function
    bf16 = resolve_bf16(hparams.get("bf16", False), model.device, model.dtype)
    keep_graphs = model.device.type == "cuda" and bool(hparams.get("cuda_graph", False)) and int(hparams.get("graph_cache", 0)) > 0
    frozen = frozen_context(model, layer, batch, bf16, keep_graphs, hparams.get("role", "rewrite")) if freeze else contextlib.nullcontext()
    with matmul_precision(model, bool(hparams.get("tf32", True))), fused, frozen as live:  # the frozen run in TF32 too
        quiet_warnings()
        module = ValueOptimizer(model, batch, layer, live=live, **{k: v for k, v in hparams.items() if k not in ("layer", "bf16")}, bf16=bf16)
        if torch.equal(module.prompt_prediction, batch["target_ids"]):
            raise FacteditError(f"the model already answers {fact.target_new!r} for {fact.text!r}: pick another target_new")
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        prepared = time.perf_counter()
        accelerator = "gpu" if model.device.type == "cuda" else "cpu"  # never move the model elsewhere
        trainer = lightning.Trainer(**{**_VALUE_TRAINER, **(trainer_kwargs or {}), "accelerator": accelerator, "max_epochs": 1})
        with bf16_fit(model, layer, bf16, kept=module.kept_graphs.bf16_weights if module.kept_graphs else None):
            trainer.fit(module)
    module.to(model.device)  # Lightning's teardown moved δ and v₀ to the CPU
    module.seconds = {"prepare": prepared - start, "fit": time.perf_counter() - prepared}  # frozen context + v₀; Trainer
    last = module.history[-1] if module.history else {}
    log.info("v*: %d steps in %s, loss %.4f, P(target) %.3f, |δ|/|v₀| %.2f", len(module.history),
             "bfloat16" if bf16 else str(model.dtype).removeprefix("torch."), last.get("loss", math.nan),
             last.get("p_target", math.nan), (module.delta.norm() / module.initial_value.norm()).item())
    return module


_VALUE_TRAINER = dict(devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                      enable_progress_bar=False, num_sanity_val_steps=0)

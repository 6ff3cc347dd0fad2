"""v* = v₀ + δ: the value that makes the model say the new object (ROME eq. 4), fitted by a LightningModule.

δ_f (one row per fact) is added to the rewrite module's output at the subject's last token of every
prompt of fact f. Per fact, minimized with Adam and clamped to clamp_norm_factor · ‖v₀_f‖:

    loss_f = NLL of target_new over the fact's templated prompts
           + kl_factor · KL(edited ‖ original) of the next token after "{subject} is a"
           + v_weight_decay · ‖δ_f‖ / ‖v₀_f‖²

Facts never interact (δ_f reaches only fact f's rows, and Adam works elementwise), so a batch of
facts fits what each fact would fit alone. How the steps run (frozen prefix, bfloat16, CUDA graphs)
is the Engine's business (rome/fast/); this file is the objective and the loop.
"""

import logging
import math
from statistics import fmean

import lightning
import torch
import torch.nn.functional as F
from einops import rearrange

from factedit.architectures import module_name, unembed
from factedit.errors import FacteditError
from factedit.hooks import Trace, add_at_positions
from factedit.rome.hparams import RomeHparams
from factedit.rome.value_batch import KL_PROMPTS, ValueBatch, ZeroRun, check_not_known, known_facts

log = logging.getLogger(__name__)
LOSS_NAMES = ("loss", "nll", "kl", "weight_decay", "p_target")


class ValueObjective:
    """ROME's v* loss over the F facts of a ValueBatch, given δ (F, d_model).

    run: the δ = 0 pass over the batch (v₀ and the KL reference come from it); live: the frozen
    context's LiveBatch (a step then runs only what δ reaches), or None for the full forward;
    hparams: role, kl_factor, v_weight_decay; fast: unembed only the positions the loss reads (else
    logits everywhere, the straightforward loop).
    """

    def __init__(self, model, batch: ValueBatch, layer: int, run: ZeroRun, *, live=None, hparams=None, fast=True):
        hp = hparams or RomeHparams()
        self.model, self.batch, self.live, self.fast = model, batch, live, fast
        self.whole_live = live  # `narrow` cuts from it
        self.kl_factor, self.weight_decay = hp.kl_factor, hp.v_weight_decay
        self.rewrite, self.final_norm = module_name(model, hp.role, layer), module_name(model, "final_norm")
        # where a step's rows hold the subject and the targets (subject_pos, target_pos, target_ids, target_weight)
        self.at = live if live is not None else batch
        bare, kl_rows, subject = batch.bare_rows, batch.kl_rows, batch.subject_pos
        with torch.no_grad():
            self.initial_value = run.rewrite_output[bare, subject[bare]]  # v₀: (F, d_model) at each bare prompt
            self.initial_kl_log_probs = unembed(model, run.final_hidden[kl_rows, subject[kl_rows]]).log_softmax(-1)
        # the rows a step runs: all, until `narrow` leaves out the facts that have stopped
        self.facts, self.fact_of_row, self.kl_rows = None, batch.fact_of_row, kl_rows  # facts: None = all
        self.kl_reference = self.initial_kl_log_probs  # (rows' KL prompts, vocab) the unedited next-token log-probs

    def narrow(self, facts: torch.Tensor) -> None:
        """From now on run only the rows of `facts` ((n,) ascending fact indices): the others have stopped
        and keep their δ, so their rows would be computed for nothing. Their losses come back NaN.
        The frozen path only (the rows are cut from the live batch); a fit of one fact never narrows."""
        batch, n_kl = self.batch, len(KL_PROMPTS)
        templated = (facts[:, None] * batch.n_prompts + torch.arange(batch.n_prompts, device=facts.device)).flatten()
        kl_index = (facts[:, None] * n_kl + torch.arange(n_kl, device=facts.device)).flatten()
        rows = torch.cat([templated, batch.n_facts * batch.n_prompts + kl_index])
        self.live = self.at = self.whole_live.narrowed(rows, len(templated))
        self.facts, self.fact_of_row = facts, batch.fact_of_row[rows]
        self.kl_rows = torch.arange(len(templated), len(rows), device=facts.device)
        self.kl_reference = self.initial_kl_log_probs[kl_index]

    def _final_hidden(self, delta: torch.Tensor) -> torch.Tensor:
        """Final-norm output (rows, seq, d_model) with δ_f added at the subject of every row of fact f."""
        batch = self.batch
        inputs = (
            self.live.inputs if self.live else {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        )
        rows = torch.arange(len(self.at.subject_pos), device=delta.device)
        # one fact: the same δ broadcast to every row (what the float64 and bitwise tests pin down)
        per_row = delta[0] if batch.n_facts == 1 else delta[self.fact_of_row]

        def add_delta(name, hidden):
            return add_at_positions(hidden, rows, self.at.subject_pos, per_row) if name == self.rewrite else hidden

        names = [self.rewrite, self.final_norm]
        with Trace(self.model, names, edit_output=add_delta, stop=True, detach=False) as trace:
            self.model(**inputs)
        return trace[self.final_norm].output

    def losses(self, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each term per fact, (F,); delta: (F, d_model), or (d_model,) for one fact."""
        delta = delta.reshape(self.batch.n_facts, -1)
        hidden = self._final_hidden(delta)
        at, rows = self.at, torch.arange(len(self.at.target_pos), device=hidden.device)[:, None]
        if self.fast:
            target_logits = unembed(self.model, hidden[rows, at.target_pos])  # (F·T, n_target, vocab)
        else:
            target_logits = unembed(self.model, hidden)[rows, at.target_pos]
        target_log_probs = target_logits.log_softmax(-1).gather(-1, at.target_ids[..., None])[..., 0]
        weight = at.target_weight  # 0: padding
        mean_log_probs = (target_log_probs * weight).sum(dim=1) / weight.sum(dim=1)  # (F·T,) over each target's tokens
        n_facts = self.batch.n_facts if self.facts is None else len(self.facts)
        per_fact = "(facts prompts) -> facts prompts"
        mean_log_probs = rearrange(mean_log_probs, per_fact, facts=n_facts)
        nll = -mean_log_probs.mean(dim=1)
        kl_rows = self.kl_rows
        kl_log_probs = unembed(self.model, hidden[kl_rows, at.subject_pos[kl_rows]]).log_softmax(-1)
        kl_terms = F.kl_div(self.kl_reference, kl_log_probs, log_target=True, reduction="none").sum(-1)
        kl = rearrange(kl_terms, per_fact, facts=n_facts).mean(dim=1)  # KL(edited ‖ original)
        fitted, initial = delta, self.initial_value
        if self.facts is not None:
            fitted, initial = delta[self.facts], initial[self.facts]
        decay = self.weight_decay * fitted.norm(dim=-1) / initial.norm(dim=-1) ** 2
        p_target = mean_log_probs.exp().mean(dim=1)
        parts = dict(loss=nll + self.kl_factor * kl + decay, nll=nll, kl=kl, weight_decay=decay, p_target=p_target)
        if self.facts is None:
            return parts
        every = torch.full((self.batch.n_facts,), float("nan"), dtype=nll.dtype, device=nll.device)
        return {name: every.index_put((self.facts,), value) for name, value in parts.items()}


class ValueOptimizer(lightning.LightningModule):
    """Fits δ (F, d_model) with Adam under a real Trainer; `target_value` = v₀ + δ after Trainer.fit.

    Each fact stops on its own once its `stop_on` loss is below loss_threshold (its δ then stays);
    the fit ends when every fact has stopped or after v_num_grad_steps. Optimization is manual: one
    `step` (forward, backward, Adam, clamp) is what the engine runs eagerly or replays as a CUDA graph.
    `histories[f]`: fact f's losses at each step it took.
    """

    def __init__(self, objective: ValueObjective, engine, hparams: RomeHparams):
        super().__init__()
        self.automatic_optimization = False
        self.objective, self.engine, self.hp = objective, engine, hparams
        n_facts = len(objective.initial_value)
        self.delta = torch.nn.Parameter(torch.zeros_like(objective.initial_value))
        self.register_buffer("delta_before", torch.zeros_like(objective.initial_value))  # δ as the last step found it
        self.register_buffer("active", torch.ones(n_facts, dtype=torch.bool, device=self.delta.device))  # still fitted
        self.histories: list[list[dict]] = [[] for _ in range(n_facts)]
        self.stepper = None

    def step(self, optimizer) -> torch.Tensor:
        """Losses at the current δ (len(LOSS_NAMES), F), then one Adam step; δ_f clamped to
        clamp_norm_factor·‖v₀_f‖, and stopped facts keep theirs. No host sync: it can be a CUDA graph."""
        self.delta.grad = None
        with torch.no_grad():
            self.delta_before.copy_(self.delta)
        with self.engine.autocast():
            parts = self.objective.losses(self.delta)
        parts["loss"].sum().backward()  # a sum: each δ_f gets its own fact's gradient
        optimizer.step()
        with torch.no_grad():  # a scale factor instead of a branch on the norm: no host sync
            limit = self.hp.clamp_norm_factor * self.objective.initial_value.norm(dim=-1, keepdim=True)
            self.delta.mul_((limit / self.delta.norm(dim=-1, keepdim=True)).clamp(max=1.0))
            self.delta.copy_(torch.where(self.active[:, None], self.delta, self.delta_before))
        return torch.stack([parts[name].detach() for name in LOSS_NAMES])

    def narrow_to_active(self) -> None:
        """Steps from now on compute only the facts still fitted (the frozen path; a graph keeps its shapes)."""
        eager = self.objective.live is not None and not self.engine.cuda_graph
        if eager and self.hp.narrow and 0 < int(self.active.sum()) < len(self.active):
            self.objective.narrow(self.active.nonzero()[:, 0])

    def train_dataloader(self):
        """One epoch of v_num_grad_steps dummy batches: the data is the fixed batch of the objective."""
        return torch.utils.data.DataLoader([0] * self.hp.v_num_grad_steps, batch_size=1)

    def configure_optimizers(self):
        return torch.optim.Adam([self.delta], lr=self.hp.v_lr, capturable=self.engine.cuda_graph)

    def on_train_start(self):
        self.objective.model.eval()  # the Trainer put everything in train mode; the frozen model has dropout

    def training_step(self, _batch, _index):
        if self.stepper is None:  # the torch optimizer: Lightning's wrapper cannot be replayed in a graph
            reads = [self.objective.initial_value, self.objective.initial_kl_log_probs]
            self.stepper = self.engine.stepper(self.step, self.optimizers().optimizer, self, reads)
        for losses in self.stepper.step():
            self._record(losses)

    def on_train_end(self):
        for losses in self.stepper.finish() if self.stepper else []:
            self._record(losses, log_it=False)  # (Lightning allows no logging here)
        self.delta.grad = None

    def _record(self, losses: list[list[float]], log_it: bool = True) -> None:
        """Keep one step's losses (LOSS_NAMES × F) of the facts still fitted; stop those below the threshold."""
        per_fact = [dict(zip(LOSS_NAMES, values)) for values in zip(*losses)]
        fitted = [f for f, on in enumerate(self.active.tolist()) if on]
        for f in fitted:
            if not math.isfinite(per_fact[f]["loss"]):
                raise FacteditError(f"the value optimization diverged (loss {per_fact[f]['loss']}): lower editor.v_lr")
            self.histories[f].append({k: round(v, 5) for k, v in per_fact[f].items()})
        if log_it and fitted:  # each logged value costs ~1 ms of Lightning
            means = {k: sum(per_fact[f][k] for f in fitted) / len(fitted) for k in LOSS_NAMES}
            self.log("loss", means.pop("loss"), on_step=True, prog_bar=True)
            if self.trainer.loggers:
                self.log_dict(means, on_step=True)
        done = [f for f in fitted if per_fact[f][self.hp.stop_on] < self.hp.loss_threshold]
        if done:
            self.stepper.stop_facts(done)
        if len(done) == len(fitted):
            self.trainer.should_stop = True

    @property
    def target_value(self) -> torch.Tensor:
        """v* = v₀ + δ, (F, d_model)."""
        return (self.objective.initial_value + self.delta).detach()


def value_optimizer(engine) -> ValueOptimizer:
    """The objective of the engine's batch under its hyperparameters, and the module that fits δ."""
    objective = ValueObjective(engine.model, engine.batch, engine.layer, engine.zero_run, live=engine.live,
                               hparams=engine.hparams, fast=engine.fast)  # fmt: skip
    return ValueOptimizer(objective, engine, engine.hparams)


def compute_value(engine, facts, trainer_kwargs: dict | None = None, known: str = "error") -> ValueOptimizer:
    """Fit δ for `facts` (the engine's batch) with a real Lightning Trainer; returns the fitted module.
    known: "error" refuses a fact the model already answers; "keep" leaves its δ at 0 (a batch's other facts go on)."""
    module = value_optimizer(engine)
    if known == "error":
        check_not_known(engine.model, engine.batch, engine.zero_run, facts)
    else:
        module.active &= ~known_facts(engine.model, engine.batch, engine.zero_run)
        module.narrow_to_active()  # a fact the model already gives is never stepped
    engine.fit(module, trainer_kwargs)
    ratios = (module.delta.norm(dim=-1) / module.objective.initial_value.norm(dim=-1)).tolist()
    last = [history[-1] for history in module.histories if history]
    log.info("v*: %d fact(s), %d steps in %s, loss %.4f, P(target) %.3f, |δ|/|v₀| %.2f", len(facts),
             max(map(len, module.histories)), "bfloat16" if engine.bf16 else str(engine.model.dtype)[6:],
             fmean(h["loss"] for h in last), fmean(h["p_target"] for h in last), fmean(ratios))  # fmt: skip
    return module

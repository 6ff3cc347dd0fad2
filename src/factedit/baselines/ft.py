"""FT and FT-L baselines (ROME §4): fine-tune one weight matrix so the model says target_new.

FT optimizes the rewrite module's weight W (the MLP down-projection ROME edits) with Adam on the
mean NLL of the target tokens after the edit prompt, unconstrained. FT-L (ROME's "FT+L", after
Zhu et al. 2020) clamps the change to an L∞ ball after every step: |W − W₀| ≤ ε elementwise.
Defaults follow ROME's FT hyperparameters: 25 steps, Adam lr 5e-4, no weight decay, stop at loss < 0.01.
"""

import torch

from factedit.architectures import check_layer, get_module, module_name
from factedit.errors import FacteditError
from factedit.rome.edits import WeightBackup
from factedit.tokens import target_token_ids


def target_batch(tokenizer, text: str, target: str, device=None) -> dict[str, torch.Tensor]:
    """input_ids (1, prompt + target − 1), the positions that predict the target and its ids (n_target,)."""
    prompt_ids, target_ids = tokenizer(text)["input_ids"], target_token_ids(tokenizer, target)
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(target_ids), device=device)
    return {
        "input_ids": torch.tensor([prompt_ids + target_ids[:-1]], device=device),
        "positions": positions,
        "target_ids": torch.tensor(target_ids, device=device),
    }


def target_nll(model, batch: dict) -> torch.Tensor:
    """Mean token NLL of the target (a scalar with a graph to the trainable weight)."""
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits[0, batch["positions"]]
    return -logits.float().log_softmax(-1).gather(-1, batch["target_ids"][:, None]).mean()


def fine_tune(model, tokenizer, fact, layer: int, *, role: str = "rewrite", lr: float = 5e-4, steps: int = 25,
              norm_constraint: float | None = None, loss_threshold: float = 1e-2, weight_decay: float = 0.0,
              info: dict | None = None) -> WeightBackup:  # fmt: skip
    """Fine-tune the `role` module's weight at `layer` in place on `fact`; returns the backup to revert.

    norm_constraint: ε of FT-L (None for unconstrained FT). On an error the weight is restored.
    info: filled with the steps taken, the first and last loss and max |W − W₀|.
    """
    name = module_name(model, role, check_layer(model, layer))
    weight = get_module(model, name).weight
    backup = WeightBackup({name: weight.detach().clone()})
    batch = target_batch(tokenizer, fact.text, fact.target_new, weight.device)
    optimizer = torch.optim.Adam([weight], lr=lr, weight_decay=weight_decay)
    try:
        losses = _descend(model, weight, batch, optimizer, int(steps), loss_threshold, backup[name], norm_constraint)
    except BaseException:
        with torch.no_grad():
            weight.copy_(backup[name])
        raise
    info = {} if info is None else info
    info.update(steps=len(losses), first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
                max_change=(weight.detach() - backup[name]).abs().max().item())  # fmt: skip
    return backup


def _descend(model, weight, batch, optimizer, steps: int, loss_threshold: float, original, norm_constraint) -> list:
    """Adam steps on the target NLL until it falls below loss_threshold; with a norm_constraint ε each step
    ends with W clamped to original ± ε (FT-L). Returns the loss before each step."""
    losses = []
    weight.requires_grad_(True)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                loss = target_nll(model, batch)
                losses.append(round(loss.item(), 5))
                if not torch.isfinite(loss):
                    raise FacteditError(f"fine-tuning diverged (loss {loss.item()}): lower editor.lr")
                if loss.item() < loss_threshold:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if norm_constraint is not None:
                    with torch.no_grad():
                        weight.copy_(weight.clamp(original - norm_constraint, original + norm_constraint))
    finally:
        weight.requires_grad_(False)
        weight.grad = None
    return losses

"""A MEMIT batch's v* fits spread over the processes of a Lightning Trainer (`trainer=ddp trainer.devices=N`).

Process r fits the facts r, r + N, r + 2N, ... (each fit a nested single-device Trainer, as one
process would fit them: facts never interact in the objective), then every process gathers every
fact's z = v₀ + δ and runs the same closed-form update: the edits one process would make, on all.
"""

import math
import warnings

import lightning
import torch


class ShardedTargets(lightning.LightningModule):
    """Trainer.predict(this): `fit_share(indices) -> (z (len, d_model) float64, [(steps, p_target)] per fact)`
    runs on each process for its share; afterwards `targets` (F, d_model) and `fits` hold every fact's."""

    def __init__(self, fit_share, n_facts: int, d_model: int):
        super().__init__()
        self.fit_share, self.n_facts, self.d_model = fit_share, n_facts, d_model
        self.targets, self.fits = None, None

    def predict_dataloader(self):
        return torch.utils.data.DataLoader(list(range(self.trainer.world_size)), batch_size=1)  # one item a process

    def predict_step(self, _batch, _index):
        rank, world = self.global_rank, self.trainer.world_size
        per_process = math.ceil(self.n_facts / world)
        share = list(range(rank, self.n_facts, world))
        padded = torch.zeros(per_process, self.d_model + 2, dtype=torch.float64)  # z, steps, P(target)
        if share:
            targets, fits = self.fit_share(share)
            padded[: len(share), : self.d_model] = targets.cpu()
            padded[: len(share), self.d_model :] = torch.tensor(
                [[s, -1.0 if p is None else p] for s, p in fits], dtype=torch.float64
            )
        gathered = self.all_gather(padded.to(self.device)).cpu().reshape(world, per_process, -1)
        everything = torch.empty(self.n_facts, self.d_model + 2, dtype=torch.float64)
        for process in range(world):
            facts = range(process, self.n_facts, world)
            everything[list(facts)] = gathered[process, : len(facts)]
        self.targets = everything[:, : self.d_model]
        self.fits = [(int(s), None if p < 0 else float(p)) for s, p in everything[:, self.d_model :].tolist()]


def sharded_targets(trainer: lightning.Trainer, fit_share, n_facts: int, d_model: int):
    """(z (F, d_model) float64, [(steps, p_target)]) of every fact, fitted over `trainer`'s processes."""
    module = ShardedTargets(fit_share, n_facts, d_model)
    with warnings.catch_warnings():
        quiet = "DistributedSampler|does not have many workers|predict returned None|all_gather is deprecated"
        warnings.filterwarnings("ignore", message=f".*({quiet}).*")
        trainer.predict(module, return_predictions=False)
    return module.targets, module.fits

"""SecondMoment: the running sum of k kᵀ over keys and their count, reduced by sum across processes.

ROME's update solves with C = E[k kᵀ], the uncentered second moment of the rewrite module's input k
over text. With keys: (tokens, d_mlp) of a batch,

    key_outer_sum += keysᵀ keys          (d_mlp, d_mlp), float64
    count         += tokens
    C = key_outer_sum / count            second_moment: (d_mlp, d_mlp)

Each batch's keysᵀ keys is formed in float32 (float64 keys stay float64) and added to float64
state, so the error does not grow with the number of batches. Both states reduce by "sum", so
DDP over N processes gives the same C as one process.
"""
import torch
from torchmetrics import Metric


class SecondMoment(Metric):
    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.add_state("key_outer_sum", default=torch.zeros(dim, dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, keys: torch.Tensor) -> None:
        """keys: (..., d_mlp), every leading position one token."""
        keys = keys.detach().reshape(-1, self.dim)
        with torch.autocast(device_type=keys.device.type, enabled=False):
            keys = keys if keys.dtype == torch.float64 else keys.float()
            self.key_outer_sum += (keys.T @ keys).to(torch.float64)
        self.count += keys.shape[0]

    def compute(self) -> torch.Tensor:
        """C = E[k kᵀ]: (d_mlp, d_mlp) float64."""
        return self.key_outer_sum / self.count

    def load_state(self, key_outer_sum: torch.Tensor, count: torch.Tensor | int) -> None:
        """Continue from saved sums (a resumed pass): states become exactly the given values."""
        if tuple(key_outer_sum.shape) != (self.dim, self.dim):
            raise ValueError(f"key_outer_sum has shape {tuple(key_outer_sum.shape)}, expected ({self.dim}, {self.dim})")
        self.key_outer_sum = key_outer_sum.to(self.key_outer_sum.device, torch.float64).clone()
        self.count = torch.as_tensor(count, dtype=torch.long, device=self.count.device).clone()

    def _apply(self, fn, exclude_state=()):
        """Move with the module, but never lose float64: `.to(bfloat16)` of a parent leaves the sums in float64."""
        this = super()._apply(fn, exclude_state)
        this.key_outer_sum = this.key_outer_sum.to(torch.float64)
        this._defaults["key_outer_sum"] = this._defaults["key_outer_sum"].to(torch.float64)
        return this

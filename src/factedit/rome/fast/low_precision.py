"""bfloat16 v* steps where the hardware multiplies bfloat16 natively (editor.bf16).

Under `torch.autocast` every v* step casts each float32 weight it multiplies to bfloat16 again,
because autocast caches casts of trainable weights only and the model's are frozen: at SmolLM2-135M
that is ~95M weights read and written per step, a sixth of a CPU step. `bf16_fit` casts the
matrices of the layers δ reaches (L and above, and the unembedding) once for the whole fit and
puts the original float32 tensors back afterwards, so the weights are bitwise those of before.
The biases those products add (Linear, GPT-2's Conv1D) are cast once too: autocast would cast them
at every product as well, to the same bits. Norms and the residual stream stay float32 (autocast
casts each product's input). The copies take 2 bytes per weight; a GPU without that much free
memory keeps casting per step instead.
Where CUDA graphs are kept from one fit to the next (step_graph.py), so are the copies they read:
each fit then refreshes them from the float32 weights in place.

On the CPU, PyTorch's fused attention kernel is ~7× slower backward in bfloat16 than in float32
at these shapes (a few queries against a few dozen keys), so attention there runs through the
math backend, whose matrix products are bfloat16 too.
"""

import contextlib
import logging

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.pytorch_utils import Conv1D

from factedit.architectures import architecture_of, get_module, module_name
from factedit.errors import FacteditError

log = logging.getLogger(__name__)
_CPU_FLAGS = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 products run in hardware here: a GPU that has them, or a CPU with
    AVX512-BF16 or AMX (elsewhere oneDNN emulates bfloat16, far slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and any(getattr(torch.cpu, flag, lambda: False)() for flag in _CPU_FLAGS)


def bf16_autocast(device: torch.device, enabled: bool = True):
    """bfloat16 autocast on `device` (a no-op when not enabled), for the frozen run and each v* step.
    No cast cache: the frozen weights are never cached anyway, and a cache would not survive a CUDA graph."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=False)


def resolve_bf16(setting, device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """editor.bf16: true/false, or "auto" (bfloat16 where `native_bf16`). true on hardware without
    native bfloat16 falls back to float32: emulated bfloat16 would only be slower. Only a float32
    model runs its v* in bfloat16 (float64 is for reference runs; half-precision models already are)."""
    if setting == "auto" or setting is True:
        return native_bf16(device) and dtype == torch.float32
    if setting is False or setting is None:
        return False
    raise FacteditError(f"editor.bf16={setting!r}: use true, false or auto")


def _product_parameters(model, first_layer: int) -> list[tuple[torch.nn.Module, str, torch.nn.Parameter]]:
    """(module, name, parameter) of every 2-D weight in layers first_layer.. and of the unembedding,
    and the bias of each such Linear / Conv1D (whose forward hands it to the product, F.linear or addmm)."""
    layers = get_module(model, architecture_of(model).layers)
    modules = [m for i in range(first_layer, len(layers)) for m in layers[i].modules()]
    modules.append(get_module(model, module_name(model, "lm_head")))
    found = []
    for module in modules:
        weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and not isinstance(module, torch.nn.Embedding):
            found.append((module, "weight", weight))
            if isinstance(module, (torch.nn.Linear, Conv1D)) and isinstance(bias, torch.Tensor):
                found.append((module, "bias", bias))
    return found


def _room_for(model, parameters) -> bool:
    """Whether bfloat16 copies of `parameters` fit in the GPU's free memory with 1 GiB to spare (always on a CPU)."""
    if model.device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(model.device)
    return free > 2 * sum(weight.numel() for *_, weight in parameters) + (1 << 30)


def _bf16_copies(originals, kept: dict | None) -> list[torch.nn.Parameter]:
    """bfloat16 copies of the weights: new ones, or (kept: id(weight) -> (weight, copy)) the kept
    copies refreshed in place, so that the tensors a kept CUDA graph reads stay where they are."""
    if kept is None:
        return [torch.nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False) for *_, weight in originals]
    copies = []
    with torch.no_grad():
        for *_, weight in originals:
            entry = kept.get(id(weight))
            if entry is None or entry[0] is not weight:
                entry = kept[id(weight)] = (
                    weight,
                    torch.nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False),
                )
            else:
                entry[1].copy_(weight)  # edits change the float32 weights in place between fits
            copies.append(entry[1])
    return copies


@contextlib.contextmanager
def bf16_fit(model, first_layer: int, enabled: bool = True, kept: dict | None = None):
    """Inside the block: the weights δ reaches are bfloat16 copies (kept: reused from, and stored
    in, this dict), and (CPU) attention uses the math backend. The float32 parameters themselves
    are put back afterwards (also after an error)."""
    if not enabled:
        yield
        return
    originals = _product_parameters(model, first_layer)
    new = [entry for entry in originals if kept is None or id(entry[2]) not in kept]
    if new and not _room_for(model, new):
        log.info("bf16 v*: no GPU memory for bfloat16 weight copies; autocast casts the weights each step")
        originals = []
    attention = sdpa_kernel([SDPBackend.MATH]) if model.device.type == "cpu" else contextlib.nullcontext()
    try:
        for (module, name, _), copy in zip(originals, _bf16_copies(originals, kept)):
            module._parameters[name] = copy
        with attention:
            yield
    finally:
        for module, name, original in originals:
            module._parameters[name] = original

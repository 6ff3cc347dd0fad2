"""Editor hyperparameters: one typed source of defaults, and one merge.

    defaults (RomeHparams / MemitHparams) ← the model's `rome:` / `memit:` block (configs/model/<name>.yaml)
                                          ← overrides

Overrides are `editor.<option>=...` on the command line (configs/editor/rome.yaml and memit.yaml
hold every option unset, see `register_configs`) or `hparams={...}` in the Python API. An unknown
option or a value of the wrong type is a one-line FacteditError naming the valid ones.
"""

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from factedit.errors import FacteditError

UPDATES = ("fixed", "original", "two_keys")  # see update.py
STOP_ON = ("nll", "loss")
ROLES = ("rewrite", "attn_out", "layer")
PRESERVE = ("none", "null_space", "edited")
CARRY = ("keys", "targets")  # how MEMIT keeps a run's earlier edits (memit/memit.py)
# How the v* steps run, not what they compute (the same numbers up to rounding): a saved evaluation
# run resumes across changes of these; tf32 changes numbers on a GPU only.
EXECUTION_ONLY = ("cuda_graph", "graph_cache", "fused_activations", "facts_per_fit", "narrow")
# Options added after runs were saved, with the value at which they change nothing: a run's settings leave
# them out at that value, so a saved run (its settings.json without them) still resumes and extends.
NEUTRAL = {"null_space_cov_weight": 0.0, "carry": "keys"}
GPU_ONLY = ("tf32",)


@dataclass(frozen=True)
class ValueHparams:
    """The options of the v* fit (compute_value.py) and of how its steps run (rome/fast/), shared by ROME and MEMIT."""

    role: str = "rewrite"  # where δ is added: rewrite (MLP down-projection), attn_out (attention output), layer
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5  # weight of ‖δ‖ / ‖v₀‖² in the loss
    clamp_norm_factor: float = 4.0  # ‖δ‖ ≤ clamp_norm_factor · ‖v₀‖ after every step
    kl_factor: float = 0.0625  # weight of KL(edited ‖ original) on "{subject} is a"
    loss_threshold: float = 0.05
    stop_on: str = "nll"  # what loss_threshold bounds: the target's NLL (nll) or the whole loss (loss, ROME)
    context_templates: tuple = ((5, 10), (10, 10))  # (tokens, count) of self-written prefixes (context.py)
    seed: int = 0  # of the context templates
    # Keep what the model knows (preserve.py): none, or null_space (AlphaEdit): updates orthogonal to the
    # keys of Wikipedia text (C's eigenvectors with eigenvalue < null_space_threshold · mean eigenvalue)
    # and to the keys edited before in the same run; or (MEMIT) edited: MEMIT's least squares, which keeps
    # Wikipedia's keys through λC, also keeps the keys edited before in the run (memit/update.py).
    preserve: str = "none"
    null_space_threshold: float = 0.01
    # How the v* steps run (rome/fast/): the same function, faster.
    fast: bool = True  # compute once what δ cannot reach; logits only where the loss reads them
    fused_activations: bool = True  # GPT-2 / GPT-J's spelled-out tanh-GELU as one kernel
    # a batch's steps leave out the rows of facts that have stopped (eager steps), and MEMIT's fits of
    # facts_per_fit group facts of alike prompt lengths
    narrow: bool = True
    bf16: Any = "auto"  # steps in bfloat16 where the hardware has it: auto | true | false
    tf32: bool = True  # GPU: float32 products in TF32
    cuda_graph: bool = True  # GPU: each step is one CUDA graph replay
    graph_cache: int = 8  # GPU: captured steps kept per model for later edits of the same shapes

    def __post_init__(self):
        for option in fields(self):
            object.__setattr__(self, option.name, _checked(option.name, getattr(self, option.name), option.default))

    def to_dict(self) -> dict:
        """The options as plain JSON values (saved with every edit)."""
        plain = {"context_templates": lambda v: [list(p) for p in v], "layers": list}
        return {k: plain.get(k, lambda v: v)(v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class RomeHparams(ValueHparams):
    """ROME: one fact, one rank-one write at one layer (the ROME paper's defaults)."""

    layer: int = 5  # L: the decoder layer whose MLP down-projection W is rewritten
    update: str = "two_keys"  # two_keys | fixed | original (the reference code's); see update.py

    def __post_init__(self):
        super().__post_init__()
        if self.preserve == "edited":
            raise FacteditError("editor.preserve=edited is MEMIT's (editor=memit); ROME keeps a run's edits with "
                                "editor.preserve=null_space")  # fmt: skip


@dataclass(frozen=True)
class MemitHparams(ValueHparams):
    """MEMIT: a batch of facts, v* at the residual stream after the last layer of `layers`, the residual
    spread over the layers' MLPs by covariance-weighted least squares (the MEMIT paper's GPT-J defaults)."""

    layers: tuple = (3, 4, 5, 6, 7, 8)  # the MLPs written, in order; v* is fitted after the last one
    mom2_update_weight: float = 15000.0  # λ in ΔW = R Kᵀ (λC + KKᵀ)⁻¹
    null_space_l2: float = 10.0  # α of AlphaEdit's regularizer when preserve=null_space
    null_space_cov_weight: float = 0.0  # μ: preserve=null_space also weighs ‖ΔW C^½‖² (memit/update.py); 0: AlphaEdit
    role: str = "layer"
    clamp_norm_factor: float = 0.75  # of the residual stream's norm
    v_num_grad_steps: int = 25
    context_templates: tuple = ((10, 5),)  # MEMIT: the bare prompt and 5 prefixes of 10 tokens
    # v* of a batch fitted this many facts at a time (0: all at once): the same z up to rounding (the facts
    # never interact in the objective); fewer facts hold less memory, and each fit stops with its slowest fact.
    facts_per_fit: int = 0
    # How preserve=null_space / edited keep the run's earlier edits: keys (AlphaEdit: Σ k kᵀ of their keys as they
    # were written, kept unchanged) or targets (their keys read again on the current weights, and written again
    # to the value each layer first gave them, in the same least squares as the batch)
    carry: str = "keys"

    def __post_init__(self):
        super().__post_init__()
        if self.carry == "targets" and self.preserve == "none":
            raise FacteditError("editor.carry=targets keeps a run's earlier edits: use it with editor.preserve="
                                "null_space or editor.preserve=edited")  # fmt: skip


KINDS = {"rome": RomeHparams, "memit": MemitHparams}
_CHOICES = {"stop_on": STOP_ON, "update": UPDATES, "role": ROLES, "preserve": PRESERVE, "carry": CARRY,
            "bf16": ("auto", True, False)}  # fmt: skip
_POSITIVE = ("v_num_grad_steps", "v_lr", "clamp_norm_factor", "null_space_threshold", "mom2_update_weight")
_NON_NEGATIVE = ("layer", "v_weight_decay", "kl_factor", "loss_threshold", "graph_cache", "seed", "null_space_l2",
                 "facts_per_fit", "null_space_cov_weight")  # fmt: skip


def _checked(name: str, value, default):
    """`value` as the type of `default`, in range; else a one-line error."""
    if name in _CHOICES:
        value = {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value
        if value not in _CHOICES[name] or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            choices = "true, false or auto" if name == "bf16" else f"one of {', '.join(_CHOICES[name])}"
            raise FacteditError(f"editor.{name}={value!r}: use {choices}")
        return value
    if name == "context_templates":
        return _templates_spec(value)
    if name == "layers":
        return _layers(value)
    kind = type(default)
    if kind is bool:
        if not isinstance(value, bool):
            raise FacteditError(f"editor.{name}={value!r}: use true or false")
        return value
    try:
        converted = kind(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        converted = None
    if converted is None or (kind is int and converted != value) or not math.isfinite(converted):
        raise FacteditError(f"editor.{name}={value!r}: must be a finite {'integer' if kind is int else 'number'}")
    if (name in _POSITIVE and converted <= 0) or (name in _NON_NEGATIVE and converted < 0):
        raise FacteditError(f"editor.{name}={value!r}: must be {'> 0' if name in _POSITIVE else '>= 0'}")
    return converted


def _templates_spec(value) -> tuple:
    """context_templates as ((tokens, count), ...) of positive integers."""
    try:
        spec = tuple((int(tokens), int(count)) for tokens, count in value)
    except (TypeError, ValueError):
        spec = ()
    if not spec or any(n <= 0 or c <= 0 for pair in spec for n, c in [pair]):
        raise FacteditError(f"editor.context_templates={value!r}: give [[tokens, count], ...] of positive integers")
    return spec


def _layers(value) -> tuple:
    """layers as increasing non-negative integers."""
    try:
        layers = tuple(int(v) for v in value) if isinstance(value, (list, tuple, ListConfig)) else ()
    except (TypeError, ValueError):
        layers = ()
    if not layers or any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 0:
        raise FacteditError(f"editor.layers={value!r}: give increasing layer indices, e.g. [1,2,3]")
    return layers


def _as_dict(options, kind) -> dict:
    if options is None:
        return {}
    if isinstance(options, ValueHparams):
        options = options.to_dict()
    data = OmegaConf.to_container(options, resolve=True) if isinstance(options, DictConfig) else dict(options)
    names = {f.name for f in fields(kind)}
    unknown = sorted(set(data) - names - {"name"})
    if unknown:
        editor = next(k for k, v in KINDS.items() if v is kind)
        raise FacteditError(f"unknown {editor} option {unknown[0]!r}: the options are {', '.join(sorted(names))}")
    return {k: v for k, v in data.items() if k != "name" and v is not None}  # None: not set here


def resolve_hparams(model=None, overrides=None, *, model_rome=None, kind=RomeHparams):
    """Defaults ← the model's `rome:` (or `memit:`) block ← `overrides` (a mapping, DictConfig or
    hyperparameters; None values unset). kind: RomeHparams or MemitHparams.

    model_rome: that block itself; by default that of the registry entry `model` was loaded from.
    """
    if model_rome is None and model is not None:
        model_rome = _registry_block(model, next(k for k, v in KINDS.items() if v is kind))
    return kind(**{**_as_dict(model_rome, kind), **_as_dict(overrides, kind)})


def _registry_block(model, block: str) -> dict | None:
    from factedit.models import model_config

    name = getattr(model.config, "factedit_name", None)
    if not name:
        return None
    try:
        return model_config(name).get(block)
    except FacteditError:  # a Hugging Face id: no registry entry
        return None


def register_configs() -> None:
    """Hydra's `options/rome`, `options/memit` and `options/attn_late` nodes (configs/editor/*.yaml):
    every option unset (null), so `editor.<option>=...` overrides exactly the options given and the
    defaults stay in the dataclasses. Registered when this module is imported (any `import factedit`)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, kind in (*KINDS.items(), ("attn_late", RomeHparams)):
        unset = [("name", Any, None)] + [(f.name, Any, None) for f in fields(kind)]
        if name == "attn_late":  # its own options (baselines/attn_late.py)
            unset += [("second_moment", Any, "wikipedia"), ("stats_tokens", Any, 20_000)]
        store.store(group="options", name=name, node=dataclasses.make_dataclass(f"{name.title()}Options", unset))


register_configs()

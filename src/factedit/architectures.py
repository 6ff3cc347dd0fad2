"""The one place where model families differ: the dotted module names that ROME and tracing need.

Every other file asks `architecture_of(model)` and formats a template with the layer index, so no
code branches on the model family. To support a new family, add a row to `ARCHITECTURES`.
"""

from dataclasses import dataclass

import torch

from factedit.errors import FacteditError


@dataclass(frozen=True)
class Architecture:
    """Module paths for one family; `{}` stands for the layer index.

    rewrite:  the MLP down-projection that ROME edits (input = key k, output = value v).
    attn_out: the attention output projection (the `attn_late` baseline edits it).
    attn:     the attention block whose output tracing restores.
    weight_layout: "out_in" when the rewrite weight is stored (d_model, d_mlp) like nn.Linear,
                   "in_out" when it is stored (d_mlp, d_model) like GPT-2's Conv1D.
    """

    embed: str
    layers: str
    layer: str
    mlp: str
    rewrite: str
    attn: str
    attn_out: str
    final_norm: str
    lm_head: str
    weight_layout: str = "out_in"


_GPT2 = Architecture(
    embed="transformer.wte",
    layers="transformer.h",
    layer="transformer.h.{}",
    mlp="transformer.h.{}.mlp",
    rewrite="transformer.h.{}.mlp.c_proj",
    attn="transformer.h.{}.attn",
    attn_out="transformer.h.{}.attn.c_proj",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    weight_layout="in_out",
)
_GPTJ = Architecture(
    embed="transformer.wte",
    layers="transformer.h",
    layer="transformer.h.{}",
    mlp="transformer.h.{}.mlp",
    rewrite="transformer.h.{}.mlp.fc_out",
    attn="transformer.h.{}.attn",
    attn_out="transformer.h.{}.attn.out_proj",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
)
_NEOX = Architecture(
    embed="gpt_neox.embed_in",
    layers="gpt_neox.layers",
    layer="gpt_neox.layers.{}",
    mlp="gpt_neox.layers.{}.mlp",
    rewrite="gpt_neox.layers.{}.mlp.dense_4h_to_h",
    attn="gpt_neox.layers.{}.attention",
    attn_out="gpt_neox.layers.{}.attention.dense",
    final_norm="gpt_neox.final_layer_norm",
    lm_head="lm_head",
)
# Llama, Mistral, Qwen2 and Gemma 3 (text) share the module names of LlamaForCausalLM.
_LLAMA = Architecture(
    embed="model.embed_tokens",
    layers="model.layers",
    layer="model.layers.{}",
    mlp="model.layers.{}.mlp",
    rewrite="model.layers.{}.mlp.down_proj",
    attn="model.layers.{}.self_attn",
    attn_out="model.layers.{}.self_attn.o_proj",
    final_norm="model.norm",
    lm_head="lm_head",
)

ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": _GPT2,
    "gptj": _GPTJ,
    "gpt_neox": _NEOX,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma3_text": _LLAMA,
}


def architecture_of(model: torch.nn.Module) -> Architecture:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise FacteditError(
            f"unknown architecture {model_type!r}: add its module names to ARCHITECTURES in "
            f"src/factedit/architectures.py (known: {', '.join(sorted(ARCHITECTURES))})"
        )
    return ARCHITECTURES[model_type]


def num_layers(model: torch.nn.Module) -> int:
    return len(get_module(model, architecture_of(model).layers))


def check_layer(model: torch.nn.Module, layer: int) -> int:
    n = num_layers(model)
    if not 0 <= int(layer) < n:
        raise FacteditError(f"layer {layer} is out of range: this model has layers 0..{n - 1}")
    return int(layer)


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise FacteditError(
            f"module {name!r} not found in {type(model).__name__}; fix its row in ARCHITECTURES"
        ) from None


def module_name(model: torch.nn.Module, role: str, layer: int | None = None) -> str:
    """Dotted name of `role` ("rewrite", "mlp", "attn", "layer", ...), for `layer` when per-layer."""
    template = getattr(architecture_of(model), role)
    return template.format(check_layer(model, layer)) if "{}" in template else template


def rewrite_weight(model: torch.nn.Module, layer: int) -> torch.Tensor:
    """W of the rewrite module as stored (its parameter, not a copy)."""
    return get_module(model, module_name(model, "rewrite", layer)).weight


def unembed(model: torch.nn.Module, hidden: torch.Tensor, at_least_float32: bool = False) -> torch.Tensor:
    """Logits (…, vocab) of final-norm outputs (…, d_model), soft-capped where the family does (Gemma)."""
    logits = get_module(model, module_name(model, "lm_head"))(hidden)
    if at_least_float32:
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def as_out_in(model: torch.nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """View a stored rewrite-shaped matrix as (d_model, d_mlp): W maps keys to values, v = W k."""
    return matrix.T if architecture_of(model).weight_layout == "in_out" else matrix

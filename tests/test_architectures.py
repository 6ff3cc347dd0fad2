import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from factedit import FacteditError
from factedit.architectures import (
    ARCHITECTURES,
    architecture_of,
    as_out_in,
    get_module,
    module_name,
    num_layers,
    rewrite_weight,
)
from factedit.hooks import Trace

# fmt: off
TINY = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_inner=80),
    "gptj": dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_inner=80),
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80),
    "llama": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=80
    ),
    "mistral": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=80
    ),
    "qwen2": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=80
    ),
    "gemma3_text": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=80, head_dim=8),
}
# fmt: on


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_architecture_resolves_on_a_tiny_model(model_type):
    config = AutoConfig.for_model(model_type, vocab_size=100, **TINY[model_type])
    model = AutoModelForCausalLM.from_config(config).eval()
    assert num_layers(model) == 2
    for role in ("embed", "layers", "final_norm", "lm_head"):
        get_module(model, module_name(model, role))
    for role in ("layer", "mlp", "rewrite", "attn", "attn_out"):
        get_module(model, module_name(model, role, 1))
    weight = as_out_in(model, rewrite_weight(model, 1))
    assert weight.shape == (32, 80)  # (d_model, d_mlp) whatever the storage layout
    name = module_name(model, "rewrite", 1)
    with torch.no_grad(), Trace(model, name, retain_input=True) as trace:
        model(input_ids=torch.tensor([[1, 2, 3]]))
    key, value = trace[name].input[0, -1], trace[name].output[0, -1]
    bias = getattr(get_module(model, name), "bias", None)
    assert torch.allclose(weight @ key + (0 if bias is None else bias), value, atol=1e-5)


def test_unknown_architecture_names_the_table():
    config = AutoConfig.for_model(
        "bert", vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    model = torch.nn.Linear(2, 2)  # any module carrying a config of an unlisted family
    model.config = config
    with pytest.raises(
        FacteditError, match="unknown architecture 'bert'.*ARCHITECTURES in src/factedit/architectures.py"
    ):
        architecture_of(model)


def test_layer_out_of_range(tiny_llama):
    with pytest.raises(FacteditError, match="layer 9 is out of range: this model has layers 0..3"):
        module_name(tiny_llama[0], "rewrite", 9)

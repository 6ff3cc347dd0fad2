import pytest
import torch

from factedit.architectures import get_module, module_name
from factedit.errors import FacteditError
from factedit.hooks import Trace, add_at_positions, run_until


def _inputs(tokenizer, text="The Eiffel Tower is located in the city of"):
    return dict(tokenizer(text, return_tensors="pt"))


def test_captured_keys_equal_manual_recomputation(smollm2):
    model, tokenizer = smollm2
    mlp, rewrite = module_name(model, "mlp", 5), module_name(model, "rewrite", 5)
    with torch.no_grad(), Trace(model, [mlp, rewrite], retain_input=True) as trace:
        model(**_inputs(tokenizer))
    block = get_module(model, mlp)
    x = trace[mlp].input.double()
    manual = torch.nn.functional.silu(x @ block.gate_proj.weight.double().T) * (x @ block.up_proj.weight.double().T)
    assert torch.allclose(trace[rewrite].input.double(), manual, atol=1e-4)


def test_added_vector_changes_exactly_the_chosen_positions(tiny_llama):
    model, tokenizer = tiny_llama
    name, inputs = module_name(model, "rewrite", 1), _inputs(tokenizer)
    with torch.no_grad(), Trace(model, name) as clean:
        clean_logits = model(**inputs).logits
    delta = torch.randn(model.config.hidden_size)
    edit = lambda _, hidden: add_at_positions(hidden, torch.tensor([0]), torch.tensor([4]), delta)
    with torch.no_grad(), Trace(model, name, edit_output=edit) as patched:
        patched_logits = model(**inputs).logits
    changed = (patched[name].output - clean[name].output).abs().amax(dim=-1)[0]
    assert changed.nonzero().flatten().tolist() == [4]
    assert torch.allclose(patched[name].output[0, 4] - clean[name].output[0, 4], delta, atol=1e-6)
    assert torch.equal(patched_logits[0, :4], clean_logits[0, :4])  # causal: earlier positions untouched
    assert not torch.allclose(patched_logits[0, 4:], clean_logits[0, 4:])


def test_stop_forward_captures_the_same_tensor(smollm2):
    model, tokenizer = smollm2
    name, inputs = module_name(model, "rewrite", 5), _inputs(tokenizer)
    with torch.no_grad(), Trace(model, name, retain_input=True) as full:
        model(**inputs)
    stopped = run_until(model, name, **inputs)
    assert torch.equal(stopped[name].input, full[name].input)


def test_hooks_are_removed_after_an_exception(tiny_llama):
    model, tokenizer = tiny_llama
    names = [module_name(model, "rewrite", i) for i in range(4)]
    with pytest.raises(RuntimeError, match="boom"), Trace(model, names, retain_input=True):
        raise RuntimeError("boom")
    assert all(not get_module(model, n)._forward_hooks for n in names)
    with pytest.raises(FacteditError, match="not found"), Trace(model, names + ["model.no_such_module"]):
        pass
    assert all(not get_module(model, n)._forward_hooks for n in names)

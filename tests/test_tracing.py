"""Causal tracing: subject tokens, batched restorations against the one-cell-per-forward loop, the
aggregate, the figures and the entry point."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from factedit import FacteditError, load_model
from factedit.architectures import module_name, num_layers
from factedit.hooks import Trace
from factedit.paths import REPO_ROOT
from factedit.tokens import fill_prompt, special_prefix, subject_token_range
from factedit.tracing.aggregate import average_effects, bucket_tokens, trace_facts
from factedit.tracing.causal_trace import (
    KINDS,
    clean_run,
    corrupted_run,
    corrupted_subject_embeddings,
    embedding_std,
    encode_prompt,
    grid_cells,
    reference_restored_probability,
    restored_grid,
    trace_fact,
    window_layers,
)
from factedit.tracing.command import run
from factedit.tracing.plots import plot_effect_heatmaps, plot_effect_lines

EIFFEL = ("{} is located in the city of", "Eiffel Tower", "Paris")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run op by op: one thread avoids waiting on a busy second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- subject tokens


def test_subject_token_range_finds_the_subject_tokens(tiny_llama):
    _, tokenizer = tiny_llama
    text = "The Eiffel Tower is located in the city of"
    start, end = subject_token_range(tokenizer, text, "Eiffel Tower")
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids[start:end]).strip() == "Eiffel Tower"
    assert start == len(special_prefix(tokenizer)) + 1  # after BOS and "The"


def test_subject_token_range_keeps_a_token_merged_with_what_follows(tiny_llama):
    _, tokenizer = tiny_llama  # SmolLM2's tokenizer: BOS "Daniel" "le" " Dar" "rie" "ux" "'s" ...
    text = "Danielle Darrieux's mother tongue is"
    b = len(special_prefix(tokenizer))
    assert subject_token_range(tokenizer, text, "Danielle Darrieux") == (b, b + 5)
    assert subject_token_range(tokenizer, text, "Daniell") == (b, b + 2)  # "le" holds the subject's last character
    assert subject_token_range(tokenizer, text, "Darrieux's") == (b + 2, b + 6)


def test_subject_not_in_prompt_is_a_clear_error(tiny_llama):
    _, tokenizer = tiny_llama
    with pytest.raises(FacteditError, match="not in the prompt"):
        subject_token_range(tokenizer, "Paris is nice", "Eiffel Tower")
    with pytest.raises(FacteditError, match="not in the prompt"):
        fill_prompt("Paris is nice", "Eiffel Tower")
    assert fill_prompt("{} is tall", "Eiffel Tower") == "Eiffel Tower is tall"


# ---------------------------------------------------------------- batched restorations are the loop's numbers


def _loop_grid(model, prompt, embeds, kind, window, target_id):
    n_tokens, n_layers = prompt.input_ids.shape[1], num_layers(model)
    cells = grid_cells(kind, n_tokens, n_layers, window)
    scores = [reference_restored_probability(model, prompt, embeds, kind, cell, target_id) for cell in cells]
    return torch.tensor(scores, dtype=torch.float64).view(n_tokens, n_layers)


@pytest.mark.parametrize(
    "name, corruption, kinds",
    [("tiny_llama", "noise", KINDS), ("tiny_gpt2", "noise", KINDS), ("tiny_llama", "replace", ["mlp"])],
)
def test_batched_restorations_equal_the_one_cell_loop_in_float64(name, corruption, kinds):
    model, tokenizer = load_model(name, dtype=torch.float64)
    prompt = encode_prompt(tokenizer, "The {} is in", *EIFFEL[1:])  # a token before the subject
    clean = clean_run(model, prompt)
    assert clean.calls.can_skip_prefix  # the prefix shortcut is exercised
    embeds = corrupted_subject_embeddings(
        model, prompt, 3, corruption, noise_std=2.0, replacement_ids=torch.arange(1000, 2000), seed=1
    )
    corrupted = corrupted_run(model, prompt, embeds, clean.calls)
    for kind in kinds:
        expected = _loop_grid(model, prompt, embeds, kind, 3, prompt.target_id)
        for shortcuts in (True, False):
            got = restored_grid(
                model, clean, corrupted, kind, prompt, prompt.target_id, window=3, batch_size=16, shortcuts=shortcuts
            )
            assert torch.allclose(got, expected, rtol=1e-11, atol=0), (kind, shortcuts)
        assert expected.std() > 0  # restorations change the score: the comparison is not trivial


def test_window_convention_matches_rome():
    assert window_layers(0, 10, 30) == (0, 5)
    assert window_layers(12, 10, 30) == (7, 17)
    assert window_layers(29, 10, 30) == (24, 30)
    assert window_layers(3, 1, 30) == (3, 4)


def test_corruption_is_seeded_and_scaled(tiny_llama):
    model, tokenizer = tiny_llama
    prompt = encode_prompt(tokenizer, *EIFFEL)
    a = corrupted_subject_embeddings(model, prompt, 200, "noise", noise_std=0.5, seed=3)
    b = corrupted_subject_embeddings(model, prompt, 200, "noise", noise_std=0.5, seed=3)
    clean = model.get_submodule(module_name(model, "embed"))(prompt.input_ids)[0, :3]
    assert torch.equal(a, b)
    assert abs(float((a - clean).std()) - 0.5) < 0.02
    assert embedding_std(model, tokenizer, ["Eiffel Tower", "Toko Yasuda"]) > 0


# ---------------------------------------------------------------- bad input


def test_bad_settings_are_clear_errors(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(FacteditError, match="window=5 does not fit"):
        trace_fact(model, tokenizer, *EIFFEL, window=5, force=True)
    with pytest.raises(FacteditError, match="samples=0"):
        trace_fact(model, tokenizer, *EIFFEL, samples=0, window=2, force=True)
    with pytest.raises(FacteditError, match="corruption='blur'"):
        trace_fact(model, tokenizer, *EIFFEL, corruption="blur", window=2, force=True)
    with pytest.raises(FacteditError, match="not in the prompt"):
        trace_fact(model, tokenizer, "Paris is nice", "Eiffel Tower", "Paris", window=2, force=True)


def test_unknown_fact_stops_unless_forced(tiny_llama, caplog):
    model, tokenizer = tiny_llama  # random weights: it knows nothing
    with pytest.raises(FacteditError, match="does not know this fact.*force=true"):
        trace_fact(model, tokenizer, *EIFFEL, samples=2, window=2)
    result = trace_fact(model, tokenizer, *EIFFEL, samples=2, window=2, kinds=["hidden"], force=True)
    assert not result.known and "does not know" in caplog.text
    assert np.array(result.scores["hidden"]).shape == (len(special_prefix(tokenizer)) + 9, 4)


# ---------------------------------------------------------------- aggregate


def test_token_buckets():
    assert bucket_tokens((1, 4), 8) == {
        "first subject token": [1],
        "middle subject tokens": [2],
        "last subject token": [3],
        "first subsequent token": [4],
        "further tokens": [5, 6],
        "last token": [7],
    }
    one = bucket_tokens((0, 1), 2)  # a one-token subject followed by the last token only
    assert one["first subject token"] == one["last subject token"] == [0]
    assert one["first subsequent token"] == [] and one["further tokens"] == [] and one["last token"] == [1]


def test_average_effects_averages_buckets_then_facts(tmp_path):
    def fake(scores, corrupted, clean, subject_range):
        return {
            "scores": {"mlp": scores},
            "corrupted_prob": corrupted,
            "clean_prob": clean,
            "window": 1,
            "samples": 1,
            "noise": 3.0,
            "noise_std": 0.3,
            "corruption": "noise",
            "subject_range": subject_range,
            "subject": "s",
            "text": "t",
            "target": " x",
        }

    a = fake([[0.1, 0.1], [0.5, 0.9], [0.2, 0.3]], 0.1, 0.8, (0, 2))  # last subject token = 1
    b = fake([[0.3, 0.6], [0.2, 0.2], [0.2, 0.2]], 0.2, 0.6, (0, 1))  # last subject token = 0
    summary = average_effects([a, b], "m")
    last_subject = summary["effects"]["mlp"]["last subject token"]
    assert np.allclose(last_subject["aie"], [(0.4 + 0.1) / 2, (0.8 + 0.4) / 2]) and last_subject["count"] == 2
    assert summary["effects"]["mlp"]["middle subject tokens"]["count"] == 0
    assert summary["total_effect"] == pytest.approx((0.7 + 0.4) / 2)
    assert summary["peaks"]["mlp at last subject token"] == {"layer": 1, "aie": pytest.approx(0.6)}
    paths = plot_effect_lines(summary, tmp_path / "lines") + plot_effect_heatmaps(summary, tmp_path / "heat")
    assert all(p.stat().st_size > 1000 for p in paths)


def test_predict_traces_each_fact_once_and_reads_it_back(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    facts = [
        {"case_id": 7, "subject": "Eiffel Tower", "prompt": "{} is located in", "target_true": "Paris"},
        {"case_id": 9, "subject": "Toko Yasuda", "prompt": "{}, the", "target_true": "guitar"},
    ]
    settings = {"samples": 2, "window": 2, "kinds": ["hidden", "mlp"], "noise": 3.0, "embed_std": 0.1}
    trainer = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    results = trace_facts(model, tokenizer, facts, settings, tmp_path, {"run": 1}, trainer)
    assert [r["case_id"] for r in results] == [7, 9] and (tmp_path / "facts" / "9.json").is_file()
    (tmp_path / "facts" / "9.json").write_text(json.dumps({**results[1], "clean_prob": -1.0}))
    again = trace_facts(model, tokenizer, facts, settings, tmp_path, {"run": 1}, trainer)
    assert again[1]["clean_prob"] == -1.0  # same tag: read back, not traced again
    fresh = trace_facts(model, tokenizer, facts, settings, tmp_path, {"run": 2}, trainer)
    assert fresh[1]["clean_prob"] == results[1]["clean_prob"]  # other settings: traced again


def test_two_processes_split_the_facts_and_give_the_numbers_of_one(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    facts = [
        {"case_id": i, "subject": s, "prompt": p, "target_true": t}
        for i, (s, p, t) in enumerate(
            [
                ("Eiffel Tower", "{} is located in", "Paris"),
                ("Toko Yasuda", "{}, the", "guitar"),
                ("Danielle Darrieux", "The mother tongue of {} is", "French"),
            ]
        )
    ]
    settings = {"samples": 2, "window": 2, "kinds": ["hidden", "mlp"], "noise": 3.0, "embed_std": 0.1}
    trainer = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    one = trace_facts(model, tokenizer, facts, settings, tmp_path / "one", {"run": 1}, {**trainer, "devices": 1})
    two = trace_facts(
        model,
        tokenizer,
        facts,
        settings,
        tmp_path / "two",
        {"run": 1},
        {**trainer, "devices": 2, "strategy": "ddp_spawn"},
    )
    assert [r["case_id"] for r in two] == [0, 1, 2]
    assert {r["rank"] for r in two} == {0, 1}  # each process traced some of the facts
    for a, b in zip(one, two):
        assert b["clean_prob"] == pytest.approx(a["clean_prob"], abs=1e-6)
        for kind in ("hidden", "mlp"):
            assert np.allclose(a["scores"][kind], b["scores"][kind], atol=1e-6)


# ---------------------------------------------------------------- the real model


def test_smollm2_traces_the_eiffel_tower_and_full_restoration_is_clean(smollm2):
    model, tokenizer = smollm2
    prompt = encode_prompt(tokenizer, *EIFFEL)
    clean = clean_run(model, prompt, kinds=["hidden"])
    assert tokenizer.decode([int(clean.probs.argmax())]) == " Paris" and clean.probs[prompt.target_id] > 0.5
    embeds = corrupted_subject_embeddings(model, prompt, 2, "noise", noise_std=3 * 0.1164)
    corrupted = corrupted_run(model, prompt, embeds, clean.calls)
    clean_prob = float(clean.probs[prompt.target_id])
    assert float(corrupted.probs[:, prompt.target_id].mean()) < 0.2 * clean_prob  # the noise removes the fact

    # every layer's output at every token restored: the corrupted run becomes the clean run, exactly
    layers = [module_name(model, "layer", i) for i in range(num_layers(model))]
    embed = module_name(model, "embed")
    clean_states = dict(zip(layers, clean.states["hidden"]))

    def corrupt_then_restore(name, hidden):
        if name != embed:
            return clean_states[name][None].clone()
        hidden = hidden.clone()
        hidden[0, slice(*prompt.subject_range)] = embeds[0]
        return hidden

    with torch.no_grad():
        with Trace(model, [embed, *layers], retain_output=False, edit_output=corrupt_then_restore):
            restored = model(input_ids=prompt.input_ids, use_cache=False, logits_to_keep=1).logits[0, -1].softmax(-1)
        plain = model(input_ids=prompt.input_ids, use_cache=False, logits_to_keep=1).logits[0, -1].softmax(-1)
    assert torch.equal(restored, plain)

    last, n_layers = len(prompt.tokens) - 1, num_layers(model)
    iffel = prompt.subject_range[0] + 1  # the subject's second token (after BOS, "E")
    checked = [(iffel, 3), (iffel, 20), (last, 3), (last, 20)]
    only = {(iffel, layer) for layer in range(10)} | {(last, n_layers - 1), *checked}
    grid = restored_grid(model, clean, corrupted, "hidden", prompt, prompt.target_id, only=only)
    assert grid[last, -1] == pytest.approx(clean_prob, abs=1e-6)  # the last layer's output at the last token
    for token, layer in checked:  # against the one-cell loop, in float32
        cell = grid_cells("hidden", last + 1, n_layers, 1)[token * n_layers + layer]
        loop = reference_restored_probability(model, prompt, embeds, "hidden", cell, prompt.target_id)
        assert grid[token, layer] == pytest.approx(loop, abs=2e-5)
    assert grid[iffel, :10].mean() > 5 * float(corrupted.probs[:, prompt.target_id].mean())  # "iffel" carries the fact


# ---------------------------------------------------------------- the entry point


def test_cli_writes_heatmaps_and_json(tmp_path):
    command = [
        sys.executable,
        str(REPO_ROOT / "src" / "trace.py"),
        "model=tiny_llama",
        "fact=eiffel_rome",
        "force=true",
        "samples=2",
        "window=2",
        "threads=1",
        f"out_dir={tmp_path}/out",
        f"hydra.run.dir={tmp_path}/hydra",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "trace.json").read_text())
    assert result["fact_name"] == "eiffel_rome" and result["subject_range"] == [1, 4]  # after SmolLM2's BOS
    assert np.array(result["scores"]["attn"]).shape == (10, 4)
    for kind in KINDS:
        assert (tmp_path / "out" / f"{kind}.png").stat().st_size > 1000
        assert (tmp_path / "out" / f"{kind}.pdf").is_file()


def _config(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO_ROOT / "configs"), version_base="1.3"):
        return compose("trace", overrides=["model=tiny_llama", *overrides])


def test_config_unknown_fact_stops_suggesting_force_and_bad_input_is_an_error():
    with pytest.raises(FacteditError, match="does not know this fact.*force=true"):
        run(
            _config("fact.subject='Mount Fuji'", "fact.prompt='{} is located in'", "fact.target_true=Japan", "window=2")
        )
    with pytest.raises(FacteditError, match="window=40 does not fit"):
        run(_config("window=40", "force=true"))
    with pytest.raises(FacteditError, match="fact.subject is not set"):
        run(_config("fact=custom"))
    with pytest.raises(FacteditError, match="mode='both'"):
        run(_config("mode=both"))

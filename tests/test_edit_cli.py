"""The real entry point, run as a user would: edit, resume (sequential), revert, and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from factedit import load_edits, load_model, model_fingerprint
from factedit.rome.update import delta_weight

REPO = Path(__file__).resolve().parents[1]


def run_edit(*overrides, check=True):
    result = subprocess.run(
        [sys.executable, "src/edit.py", *overrides, "hydra.run.dir=${oc.env:TMPDIR,/tmp}/factedit-hydra"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    return result


@pytest.fixture(scope="module")
def edited_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit")
    common = [
        "model=tiny_llama",
        f"stats.dir={root / 'stats'}",
        "editor.v_num_grad_steps=3",
        "editor.context_templates=[[3,2]]",
        "probe.max_new_tokens=3",
    ]
    first = run_edit(*common, "stats.auto=true", "stats.auto_tokens=4096", f"out_dir={root / 'one'}")
    second = run_edit(*common, f"resume={root / 'one'}", "fact=colosseum_athens", f"out_dir={root / 'two'}")
    return root, common, first, second


def test_edit_saves_factors_probes_and_resumes_sequentially(edited_run):
    root, _, first, second = edited_run
    assert "| Eiffel Tower is located in the city of | edit |" in first.stdout
    assert (root / "one" / "probes.json").is_file() and (root / "one" / "probes.md").is_file()
    model, _ = load_model("tiny_llama")
    one, metadata = load_edits(root / "one", base_fingerprint=model_fingerprint(model))
    two, _ = load_edits(root / "two", base_fingerprint=model_fingerprint(model))
    assert metadata["model"] == "tiny_llama" and len(one) == 1 and len(two) == 2
    assert torch.equal(two[0].u, one[0].u)  # the resumed run keeps the saved edit first
    assert two[1].fact["subject"] == "Colosseum"


def test_revert_restores_original_predictions_exactly(edited_run):
    root, common, _, _ = edited_run
    result = run_edit(*common, f"resume={root / 'two'}", "revert=true")
    assert "original logits restored exactly" in result.stdout


def test_saved_work_is_never_overwritten(edited_run):
    root, common, _, _ = edited_run
    before = (root / "one" / "edits.safetensors").read_bytes()
    result = run_edit(*common, f"out_dir={root / 'one'}", check=False)
    assert result.returncode == 2 and "already holds edits" in result.stderr
    assert (root / "one" / "edits.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["fact.prompt=Where is it?"], "exactly one '{}'"),
        (["fact.target_new=Paris"], "target_new equals target_true"),
        (["model.rome.layer=40"], "layer 40 is out of range"),
        (["editor=memit", "editor.layers=[1,40]"], "layer 40 is out of range"),
        (["editor=memit", "editor.layers=[1,2]"], "run `python src/precompute_stats.py model=tiny_llama layers=[1,2]`"),
    ],
)
def test_bad_input_is_one_line(tmp_path, overrides, message):
    result = run_edit("model=tiny_llama", f"stats.dir={tmp_path}", f"out_dir={tmp_path / 'x'}", *overrides, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_unknown_model_lists_the_registry(tmp_path):
    result = run_edit("model=smollm3", f"out_dir={tmp_path / 'x'}", check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: unknown model=smollm3: use one of gemma3_270m, gpt2, gpt2_xl, gpt_j_6b, llama2_7b, smollm2_135m, "
        "tiny_gpt2, tiny_llama (configs/model/)"
    ]


def test_missing_statistics_names_the_command(tmp_path):
    result = run_edit("model=tiny_llama", f"stats.dir={tmp_path}", f"out_dir={tmp_path / 'x'}", check=False)
    assert result.returncode == 2 and "python src/precompute_stats.py model=tiny_llama layers=[1]" in result.stderr


@pytest.mark.parametrize(
    "facts, overrides, message",
    [
        (2, ["batch_size=5"], "batch_size=5 for 2 facts: use 1..2"),
        (1, [], "two new objects ('Rome', 'Athens')"),
    ],
)
def test_memit_bad_batches_are_one_line(tmp_path, facts, overrides, message):
    """A batch larger than the facts, and one subject+prompt with two new objects (naming both facts)."""
    rome = {"subject": "Eiffel Tower", "prompt": "{} is located in", "target_new": "Rome"}
    other = {"subject": "Louvre", "prompt": "{} is located in", "target_new": "Athens"} if facts == 2 else None
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([rome, other or {**rome, "target_new": "Athens"}]))
    common = ["model=tiny_llama", "editor=memit", "editor.layers=[1]", f"stats.dir={tmp_path / 'stats'}"]
    out = f"out_dir={tmp_path / 'x'}"
    stats = ["stats.auto=true", "stats.auto_tokens=2048"]
    result = run_edit(*common, *stats, f"facts={path}", out, *overrides, check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith("error: ") and message in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "x").exists()


def test_memit_fits_shared_over_two_processes_make_the_same_edits(tmp_path):
    """`trainer=ddp trainer.devices=2` (gloo, two real processes): each fits half of the batch's v*, both
    gather z and write; the saved edits equal one process's (float32: batch padding differs, so up to rounding)."""
    facts = [
        {"subject": "Eiffel Tower", "prompt": "{} is located in the city of", "target_new": "Rome"},
        {"subject": "Colosseum", "prompt": "The {} is located in the city of", "target_new": "Athens"},
        {"subject": "Louvre", "prompt": "The {} is a museum in", "target_new": "London"},
    ]
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(facts))
    common = ["model=tiny_llama", "editor=memit", "editor.layers=[1,2]", "editor.v_num_grad_steps=3",
              "editor.context_templates=[[3,2]]", "editor.bf16=false", f"stats.dir={tmp_path / 'stats'}",
              "stats.auto=true", "stats.auto_tokens=2048", f"facts={path}", "probe.max_new_tokens=2"]  # fmt: skip
    run_edit(*common, f"out_dir={tmp_path / 'one'}")
    shared = run_edit(
        *common, f"out_dir={tmp_path / 'two'}", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"
    )
    assert (shared.stdout + shared.stderr).count("MEMIT: 3 facts into layers [1, 2]") == 2  # both processes wrote
    (one, _), (two, _) = load_edits(tmp_path / "one"), load_edits(tmp_path / "two")
    assert [e.layer for e in one] == [e.layer for e in two] == [1, 2]
    for a, b in zip(one, two):
        assert a.info["v_steps"] == b.info["v_steps"] == [3, 3, 3] and a.info["p_target"] == b.info["p_target"]
        delta_a, delta_b = delta_weight(a.u, a.v), delta_weight(b.u, b.v)
        assert delta_a.norm() > 0 and (delta_a - delta_b).norm() / delta_a.norm() < 1e-4

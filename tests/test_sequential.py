"""Lifelong editing (evaluate.py sequential=true) and zsRE: resume after SIGKILL, curves, token accuracy."""

import json
import os
import signal
import subprocess
import sys
import time

import torch

from factedit import load_model
from factedit.data.zsre import load_zsre
from factedit.evaluation.curves import retention
from factedit.evaluation.probabilities import token_accuracies, zsre_scores
from factedit.io import read_lines, read_safetensors
from factedit.paths import REPO_ROOT, SHARED_DATA_DIR

TRAIN = SHARED_DATA_DIR / "counterfact" / "counterfact-train.json"


def command(tmp_path, name, *extra):
    return [sys.executable, str(REPO_ROOT / "src" / "evaluate.py"), "model=tiny_llama", "editor=memit",
            "editor.layers=[1,2]", "editor.v_num_grad_steps=3", "editor.context_templates=[[3,2]]",
            "editor.preserve=null_space", "editor.null_space_threshold=1.5", "sequential=true", f"data.path={TRAIN}",
            "data.limit=9", "batch_size=3", "checkpoint_every=3", "control_records=2", "perplexity_tokens=1024",
            "generation_prompts=2", "generation_tokens=10", "stats.auto=true", "stats.auto_tokens=4096",
            f"stats.dir={tmp_path / 'stats'}", f"out_dir={tmp_path / name}", f"hydra.run.dir={tmp_path / 'hydra'}",
            *extra]  # fmt: skip


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}


def test_sequential_run_killed_midway_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    """kill -9 after the first step is saved; the same command continues from there and ends with the same
    edits, bit for bit (null-space state included), and a curve line at 0, 3, 6 and 9 edits."""
    whole = subprocess.run(command(tmp_path, "whole"), env=ENV, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    process = subprocess.Popen(
        command(tmp_path, "killed"), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    state = tmp_path / "killed" / "run.safetensors"
    deadline = time.time() + 400
    while not state.is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = int(read_safetensors(state)[1]["records_done"])
    assert 3 <= done < 9  # killed in the middle
    resumed = subprocess.run(command(tmp_path, "killed"), env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (a, meta_a), (b, meta_b) = (read_safetensors(tmp_path / name / "run.safetensors") for name in ("whole", "killed"))
    assert meta_a["records_done"] == meta_b["records_done"] == "9" and a.keys() == b.keys()
    assert any(name.startswith("preserved.") for name in a) and all(torch.equal(a[k], b[k]) for k in a)
    curve = [json.loads(line) for line in (tmp_path / "killed" / "curve.jsonl").read_text().splitlines()]
    assert sorted({line["edits"] for line in curve}) == [0, 3, 6, 9]
    table = (tmp_path / "whole" / "curve.md").read_text()
    assert "| 9 |" in table and (tmp_path / "whole" / "curve.png").stat().st_size > 10_000
    # every checkpoint keeps each edited record's scores and the step that wrote it: the retention table
    kept = retention(tmp_path / "whole")
    assert sorted(kept.matrix) == [3, 6, 9] and kept.steps == {0: (1, 3), 1: (4, 6), 2: (7, 9)}
    assert sorted(kept.matrix[3]) == [0] and sorted(kept.matrix[9]) == [0, 1, 2]
    last = read_lines(tmp_path / "whole" / "records" / "9.jsonl")
    assert len(last) == 9 and [line["step"] for line in last] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    final = next(line for line in curve if line["edits"] == 9)["retained"]["efficacy_score"]
    assert abs(sum(kept.matrix[9].values()) / 3 - final) < 1e-4  # equal steps: the curve's ES is their mean (float32)
    assert "records written | after 3 | after 6 | after 9" in table and "| 7-9 |" in table
    assert (tmp_path / "whole" / "retention.png").stat().st_size > 5_000
    # a finished run of 6 records continues to 9 with data.limit=9: the edits of a run of 9 from the start
    for limit in ("data.limit=6", "data.limit=9"):
        grown = subprocess.run(command(tmp_path, "grown", limit), env=ENV, capture_output=True, text=True, timeout=600)
        assert grown.returncode == 0, grown.stderr[-3000:]
    c, meta_c = read_safetensors(tmp_path / "grown" / "run.safetensors")
    assert meta_c["records_done"] == "9" and c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)
    shrunk = subprocess.run(command(tmp_path, "grown", "data.limit=3"), env=ENV, capture_output=True, text=True)
    assert shrunk.returncode == 2 and "records differ" in shrunk.stderr.strip().splitlines()[-1]


def test_zsre_loader_and_token_accuracy(tmp_path, tiny_llama, zsre_items):
    """Two hand-made records (a third without its subject in the question and a fourth whose new answer is the
    true one are skipped); the token accuracy
    is the share of answer tokens that are the argmax after the question and the answer tokens before them."""
    items = [
        *zsre_items,
        {"subject": "Nobody", "src": "Where is it?", "alt": "here", "answers": ["there"], "rephrase": "Where?",
         "loc": "nq question: x", "loc_ans": "y"},
        {"subject": "Danny Green", "src": "What sex is Danny Green?", "alt": "male", "answers": ["male"],
         "rephrase": "Danny Green is of which sex?", "loc": "nq question: x", "loc_ans": "y"},
    ]  # fmt: skip
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps(items))
    records, skipped = load_zsre(path)
    assert [r.prompt for r in records] == ["What is the product made by {}?", "Which team does {} play for?"]
    assert records[0].portability_target == "drones" and not records[1].portability_prompts
    assert [item.case_id for item in skipped] == ["2", "3"] and "nothing to edit" in skipped[1].reason
    model, tokenizer = tiny_llama
    accuracy = token_accuracies(model, tokenizer, [(records[0].text, records[0].target_new)]).item()
    prompt = tokenizer(records[0].text)["input_ids"]
    target = tokenizer(" " + records[0].target_new, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + target[:-1]])).logits[0, len(prompt) - 1 :]
    assert accuracy == (logits.argmax(-1) == torch.tensor(target)).double().mean().item()
    scores = zsre_scores(model, tokenizer, records[1])
    assert set(scores) == {"efficacy_accuracy", "paraphrase_accuracy", "neighborhood_accuracy", "portability_accuracy"}
    assert scores["portability_accuracy"] != scores["portability_accuracy"]  # NaN: no portability question
    assert 0 <= scores["efficacy_accuracy"] <= 1


def test_zsre_file_loads_with_portability():
    records, skipped = load_zsre(limit=40)
    assert len(records) + len(skipped) == 40 and sum(bool(r.portability_prompts) for r in records) > 30
    assert load_model  # the package loads its zsRE file without the network


def test_retention_table_of_hand_made_records(tmp_path):
    """records/<edits>.jsonl -> each step's mean efficacy at each checkpoint; zsRE's accuracy is named Eff, a
    short last step keeps its own record numbers, and a step not written yet is an empty cell."""
    from factedit.evaluation.curves import retention_table
    from factedit.io import write_lines

    def line(case, step, accuracy):
        return {"case_id": case, "step": step, "efficacy_accuracy": accuracy}

    write_lines(tmp_path / "records" / "2.jsonl", [line(0, 0, 1.0), line(1, 0, 0.5)])
    write_lines(tmp_path / "records" / "3.jsonl", [line(0, 0, 0.5), line(1, 0, 0.0), line(2, 1, 1.0)])
    kept = retention(tmp_path)
    assert kept.score == "Eff" and kept.steps == {0: (1, 2), 1: (3, 3)}
    assert kept.matrix == {2: {0: 75.0}, 3: {0: 25.0, 1: 100.0}}
    assert retention_table(kept).splitlines()[2:] == ["| 1-2 | 75.0 | 25.0 |", "| 3-3 |  | 100.0 |"]


def test_compared_runs_get_a_trade_off_figure_of_efficacy_against_perplexity(tmp_path):
    """compare_curves draws, beside the curves, each run's retained efficacy against its perplexity ratio at every
    checkpoint after the first (ES on CounterFact, Eff on zsRE), in order of edits."""
    from factedit.evaluation.curves import compare_curves, trade_off
    from factedit.io import write_lines

    def line(edits, perplexity, **retained):
        return {"edits": edits, "perplexity": perplexity, "generation_entropy": 5.0, "retained": retained,
                "retained_unedited": {}, "control": {}, "control_unedited": {}, "drift": {}}  # fmt: skip

    counterfact = [line(200, 25.0, efficacy_score=90.0), line(0, 20.0), line(100, 22.0, efficacy_score=95.0)]
    zsre = [line(0, 10.0), line(100, 40.0, efficacy_accuracy=50.0)]
    write_lines(tmp_path / "cf" / "curve.jsonl", counterfact)
    write_lines(tmp_path / "zsre" / "curve.jsonl", zsre)
    assert trade_off(counterfact) == [(100, 1.1, 95.0), (200, 1.25, 90.0)]
    assert trade_off(zsre) == [(100, 4.0, 50.0)]
    compare_curves([tmp_path / "cf", tmp_path / "zsre"], tmp_path / "charts" / "both.png")
    assert (tmp_path / "charts" / "both.png").stat().st_size > 10_000
    assert (tmp_path / "charts" / "both_tradeoff.png").stat().st_size > 10_000

"""CounterFact evaluation: numerics against float64 references, the Lightning test loop, resume, DDP, reports."""

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning
import pytest
import torch
from hydra import compose, initialize_config_dir

from factedit import FacteditError, load_model, model_fingerprint, revert_edits, save_edits
from factedit.architectures import module_name, rewrite_weight
from factedit.baselines import attention_second_moment, attn_late_hparams, fine_tune, identity_second_moment, late_layer
from factedit.data.counterfact import DEV_FILE, CounterFactDataModule, Record, load_records
from factedit.data.wikipedia import WikipediaDataModule
from factedit.evaluation.command import check_settings, data_file, outcome_config, output_dir, run
from factedit.evaluation.editors import RankOneEdit
from factedit.evaluation.generation import TfIdf, generation_entropy, ngram_entropy, text_entropy, wikipedia_tfidf
from factedit.evaluation.metrics import CounterFactMetrics, EditScore, RecordMean, harmonic_mean
from factedit.evaluation.module import CounterFactEvaluator
from factedit.evaluation.probabilities import (
    measure_record,
    pack_rows,
    pair_tokens,
    record_pairs,
    record_scores,
    reference_target_nlls,
    target_nlls,
)
from factedit.evaluation.report import CHANGE_KEYS, change_from_unedited, compare, score_difference
from factedit.hooks import Trace
from factedit.io import write_json
from factedit.paths import CONFIG_DIR, REPO_ROOT
from factedit.rome import edit, resolve_hparams
from factedit.rome.fast.low_precision import native_bf16

RECORD = Record(
    case_id=0,
    subject="Eiffel Tower",
    prompt="The {} is located in",
    target_new="Sagrada Familia of Barcelona",
    target_true="Paris",
    relation_id="P131",
    paraphrase_prompts=["Tourists visit the Eiffel Tower in"],
    neighborhood_prompts=["The Louvre is located in", "Notre-Dame de Paris is in"],
)


def reference_nll(model, tokenizer, prompt: str, target: str) -> float:
    """Mean NLL of " target" after prompt from one float64 forward of the whole text."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    target_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + target_ids])).logits[0].double()
    log_probs = logits.log_softmax(-1)
    return -sum(log_probs[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(target_ids)) / len(target_ids)


# ---------------------------------------------------------------- probabilities


def test_batched_nlls_equal_one_forward_per_prompt_and_target(tiny_llama64):
    model, tokenizer = tiny_llama64
    pairs, _ = record_pairs(RECORD)
    batched = target_nlls(model, tokenizer, pairs)
    reference = torch.tensor([reference_nll(model, tokenizer, p, t) for p, t in pairs], dtype=torch.float64)
    assert torch.allclose(batched, reference, atol=1e-10, rtol=0)
    assert torch.allclose(reference_target_nlls(model, tokenizer, pairs), reference, atol=1e-10, rtol=0)


def test_prefix_rows_are_shared():
    rows, row_of = pack_rows([[1, 2], [1, 2, 3], [4], [1, 2, 3], [4, 5]])
    assert rows == [[1, 2, 3], [4, 5]] and row_of == [0, 0, 1, 0, 1]


def test_float32_measure_and_scores_match_the_float64_reference(tiny_llama, tiny_llama64):
    nlls = measure_record(*tiny_llama, RECORD)
    assert [len(nlls[k]) for k in ("rewrite", "paraphrase", "neighborhood")] == [1, 1, 2]
    reference = {
        kind: [[reference_nll(*tiny_llama64, prompt, target) for target in targets] for prompt, targets in items]
        for kind, items in (
            ("rewrite", [(RECORD.text, (RECORD.target_new, RECORD.target_true))]),
            ("paraphrase", [(p, (RECORD.target_new, RECORD.target_true)) for p in RECORD.paraphrase_prompts]),
            ("neighborhood", [(p, (RECORD.target_new, RECORD.target_true)) for p in RECORD.neighborhood_prompts]),
        )
    }
    for kind in reference:
        assert torch.allclose(torch.tensor(nlls[kind]), torch.tensor(reference[kind]), atol=1e-4), kind
    scores = record_scores(reference)
    ((new, true),) = reference["rewrite"]
    assert scores["efficacy_score"] == float(true > new)
    assert scores["efficacy_magnitude"] == pytest.approx(math.exp(-new) - math.exp(-true), abs=1e-15)
    ns = [float(t < n) for n, t in reference["neighborhood"]]
    assert scores["neighborhood_score"] == pytest.approx(sum(ns) / 2)
    assert scores["neighborhood_magnitude"] == pytest.approx(
        sum(math.exp(-t) - math.exp(-n) for n, t in reference["neighborhood"]) / 2
    )


def test_targets_are_tokenized_after_a_space():
    _, tokenizer = load_model("tiny_llama")
    ((_, target),) = pair_tokens(tokenizer, [("The tower is in", "Paris")])
    assert tokenizer.decode(target) == " Paris"


# ---------------------------------------------------------------- metrics


def test_metrics_are_record_means_overall_and_per_relation_and_merge_like_ddp():
    g = torch.Generator().manual_seed(0)
    values, relation = torch.rand(50, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (50,), generator=g)
    values[values < 0.1] = 0.0
    whole, halves = EditScore(4), [EditScore(4), EditScore(4)]
    whole.update(values, relation)
    halves[0].update(values[:20], relation[:20])
    halves[1].update(values[20:], relation[20:])
    halves[0].merge_state(halves[1])  # what the sum-reduction across two processes computes
    means = values.mean(0)
    expected = 3 / (1 / means).sum()
    for metric in (whole, halves[0]):
        result = metric.compute()
        assert abs(result["all"].item() - expected.item()) < 1e-12
        for r in range(4):
            m = values[relation == r].mean(0)
            assert abs(result["by_relation"][r].item() - (0.0 if (m == 0).any() else 3 / (1 / m).sum()).item()) < 1e-12
    mean = RecordMean(2)
    mean.update(torch.tensor([0.5, float("nan"), 1.0, 0.25], dtype=torch.float64), torch.tensor([0, 0, 1, 1]))
    assert mean.compute()["all"].item() == pytest.approx(1.75 / 3) and mean.compute()["by_relation"].tolist() == [
        0.5,
        0.625,
    ]
    assert harmonic_mean(torch.tensor([1.0, 0.0, 0.5])).item() == 0.0


def test_counterfact_metrics_summarize_result_lines():
    metrics = CounterFactMetrics(["P1", "P2"])
    lines = [
        {
            "relation_id": "P1",
            "scores": {
                "pre": record_scores(
                    {"rewrite": [[2.0, 1.0]], "paraphrase": [[1.0, 2.0], [3.0, 1.0]], "neighborhood": [[3.0, 1.0]]}
                ),
                "post": record_scores(
                    {"rewrite": [[0.1, 3.0]], "paraphrase": [[0.5, 2.0], [0.2, 1.0]], "neighborhood": [[3.0, 1.0]]}
                ),
            },
            "generation": {"generation_entropy": 5.0, "reference_score": 0.25},
        },
        {
            "relation_id": "P2",
            "scores": {
                "pre": record_scores({"rewrite": [[2.0, 1.0]], "paraphrase": [], "neighborhood": [[1.0, 3.0]]}),
                "post": record_scores({"rewrite": [[0.3, 1.0]], "paraphrase": [], "neighborhood": [[1.0, 3.0]]}),
            },
        },
        {"relation_id": "P2", "error": "the model already answers"},
    ]
    for line in lines:
        metrics.update(line)
    summary = metrics.compute()
    assert summary["records"] == 2 and summary["failed"] == 1
    assert (
        summary["post"]["efficacy_score"] == 1.0 and summary["post"]["paraphrase_score"] == 1.0
    )  # P2 has no paraphrase
    assert summary["post"]["neighborhood_score"] == 0.5 and summary["pre"]["paraphrase_score"] == 0.5
    assert summary["post"]["generation_entropy"] == 5.0 and summary["post"]["score"] == pytest.approx(3 / (1 + 1 + 2))
    assert (
        summary["by_relation"]["P1"]["records"] == 1
        and summary["by_relation"]["P2"]["post"]["paraphrase_score"] is None
    )


# ---------------------------------------------------------------- generation metrics


def test_ngram_entropy_matches_a_hand_count():
    text = "a b a b"  # bigrams ab, ba, ab; trigrams aba, bab
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy(text, 2) == pytest.approx(h2, abs=1e-12) and ngram_entropy(text, 3) == pytest.approx(1.0)
    assert text_entropy(text) == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert generation_entropy([text, "x"]) == pytest.approx(text_entropy(text) / 2)
    assert ngram_entropy("Paris, France's capital.", 2) == pytest.approx(2.0)  # Paris , France's capital .


def test_tfidf_is_sklearn_weighting_with_cosine():
    tfidf = TfIdf(["the cat sat", "the dog sat", "a bird sang"])
    idf = {
        w: math.log(4 / (1 + df)) + 1
        for w, df in {"the": 2, "cat": 1, "sat": 2, "dog": 1, "bird": 1, "sang": 1}.items()
    }
    a = {"the": 2 * idf["the"], "cat": idf["cat"]}  # "The cat, the." (a is one letter: ignored)
    b = {"the": idf["the"], "dog": idf["dog"], "sat": idf["sat"]}  # "the dog sat unknownword"
    dot = sum(a[w] * b.get(w, 0) for w in a)
    expected = dot / math.sqrt(sum(v * v for v in a.values())) / math.sqrt(sum(v * v for v in b.values()))
    assert tfidf.similarity("The cat, the. a", "the dog sat unknownword") == pytest.approx(expected, abs=1e-12)
    assert tfidf.similarity("zzz", "the cat") == 0.0
    wiki = wikipedia_tfidf()
    assert "piano" in wiki.vocabulary and wiki.similarity("plays the piano", "a famous piano player") > 0.3


# ---------------------------------------------------------------- baselines


def _line(pre: tuple, post: tuple) -> dict:
    return {"scores": {"pre": dict(zip(CHANGE_KEYS, pre)), "post": dict(zip(CHANGE_KEYS, post))}}


def test_change_from_unedited_is_a_paired_bootstrap_of_the_mean_change():
    # the same change in every record: no spread, the interval is that value
    same = change_from_unedited([_line((0, 0.5, 0.9), (1, 1.0, 0.8))] * 40)
    assert same["efficacy_score"] == {"mean": 100.0, "low": 100.0, "high": 100.0, "records": 40}
    assert same["neighborhood_score"]["low"] == pytest.approx(-10.0) == same["neighborhood_score"]["high"]
    # paired: pre and post move together record by record (pre varies a lot, the change does not), so the
    # interval stays narrow; an unpaired resampling would be ~10x wider
    generator = torch.Generator().manual_seed(1)
    pre = torch.rand(400, generator=generator, dtype=torch.float64)
    change = 0.02 * torch.randn(400, generator=generator, dtype=torch.float64) - 0.03
    lines = [_line((1, 1, p), (1, 1, p + c)) for p, c in zip(pre.tolist(), change.tolist())]
    lines.append({"case_id": 7, "error": "failed"})  # failed records carry no scores and are left out
    ns = change_from_unedited(lines)["neighborhood_score"]
    normal = 1.96 * 100 * change.std().item() / 400**0.5  # the bootstrap of a mean of 400 is close to normal
    assert ns["records"] == 400 and ns["mean"] == pytest.approx(100 * change.mean().item(), abs=1e-9)
    assert ns["low"] < ns["mean"] < ns["high"]
    assert ns["high"] - ns["mean"] == pytest.approx(normal, rel=0.2) and ns["mean"] - ns["low"] == pytest.approx(
        normal, rel=0.2
    )
    assert change_from_unedited([{"scores": {"post": {}}}]) == {}  # pre=false: nothing to compare


def test_score_difference_pairs_records_by_case_id(tmp_path):
    """Score(b) − Score(a) on the shared records, each Score the harmonic mean of mean ES, PS, NS, with a
    paired bootstrap interval; records only one run has are left out."""
    generator = torch.Generator().manual_seed(2)
    a_scores = (torch.rand(60, 3, generator=generator, dtype=torch.float64) > 0.3).double()
    b_scores = (a_scores + (torch.rand(60, 3, generator=generator, dtype=torch.float64) > 0.8).double()).clamp(max=1)
    line = lambda i, row: {"case_id": i, "scores": {"post": dict(zip(CHANGE_KEYS, row.tolist()))}}
    lines_a = [line(i, row) for i, row in enumerate(a_scores)] + [line(99, torch.zeros(3))]  # not in b
    lines_b = [line(i, row) for i, row in reversed(list(enumerate(b_scores)))] + [{"case_id": 5, "error": "failed"}]
    hmean = lambda m: 3 / (1 / m).sum().item()
    expected = 100 * (hmean(b_scores.mean(0)) - hmean(a_scores.mean(0)))
    got = score_difference(lines_a, lines_b)
    assert got["records"] == 60 and got["mean"] == pytest.approx(expected, abs=1e-9) and expected > 0
    assert got["low"] < got["mean"] < got["high"]
    same = score_difference(lines_a, lines_a)
    assert same["mean"] == same["low"] == same["high"] == 0.0
    assert score_difference(lines_a[:1], lines_b[:0]) is None
    # compare=[...] prints each run's Score against the best run's, on the records both measured
    for name, lines, scores in (("a", lines_a, a_scores), ("b", lines_b, b_scores)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "records.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        post = {
            **{k: 100 * v for k, v in zip(CHANGE_KEYS, scores.mean(0).tolist())},
            "score": 100 * hmean(scores.mean(0)),
        }
        summary = {
            "run": name,
            "editor": name,
            "model": "m",
            "data": "d.json",
            "records": len(lines),
            "pre": {},
            "post": post,
            "change": {},
        }
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    assert (
        f"Score of b − a on the 60 records both measured: {got['mean']:+.1f} [{got['low']:+.1f}, {got['high']:+.1f}]"
        in compare(["a", "b"], tmp_path)
    )


def test_ft_l_stays_in_the_linf_ball_and_ft_lowers_the_loss(tiny_llama):
    model, tokenizer = tiny_llama
    fact, weight = RECORD.to_fact(), rewrite_weight(model, 1)
    original = weight.clone()
    info = {}
    backup = fine_tune(model, tokenizer, fact, 1, lr=1e-2, steps=4, norm_constraint=1e-3, info=info)
    assert (weight - original).abs().max().item() <= 1e-3 + 1e-7 and info["max_change"] > 5e-4
    with torch.no_grad():
        weight.copy_(backup[module_name(model, "rewrite", 1)])
    info = {}
    fine_tune(model, tokenizer, fact, 1, lr=1e-2, steps=4, info=info)
    assert info["last_loss"] < info["first_loss"] and info["max_change"] > 1e-2 and not weight.requires_grad
    with torch.no_grad():
        weight.copy_(original)


def test_attn_late_edits_only_the_late_attention_projection(tiny_llama64):
    model, tokenizer = tiny_llama64
    hparams = attn_late_hparams(
        model, resolve_hparams(model, dict(v_num_grad_steps=3, context_templates=[[3, 1]], seed=0))
    )
    assert hparams.layer == late_layer(model) == 3 and hparams.role == "attn_out"
    editor = RankOneEdit("attn_late", hparams, identity_second_moment(model, 3))
    before = {n: p.clone() for n, p in model.named_parameters()}
    backup = editor(model, tokenizer, RECORD)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert list(backup) == [module_name(model, "attn_out", 3)] and changed == {
        module_name(model, "attn_out", 3) + ".weight"
    }


def test_attention_second_moment_is_the_mean_outer_product_of_its_inputs(tiny_llama64, tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    model, tokenizer = tiny_llama64
    second_moment = attention_second_moment(model, tokenizer, 3, tokens=1024, seq_len=128, batch_size=3)
    name = module_name(model, "attn_out", 3)
    rows = WikipediaDataModule(tokenizer, "wiki_offline", max_tokens=1024, seq_len=128).local_rows
    keys = []
    for row in rows:  # one row at a time, the whole model
        with torch.no_grad(), Trace(model, name, retain_input=True) as trace:
            model(input_ids=row[None])
        keys.append(trace[name].input[0])
    keys = torch.cat(keys)
    assert second_moment.shape == (64, 64) and keys.shape[0] == 1024
    assert torch.allclose(second_moment.double(), keys.T @ keys / len(keys), rtol=1e-6, atol=1e-7)
    assert torch.equal(attention_second_moment(model, tokenizer, 3, tokens=1024, seq_len=128), second_moment)  # cached


# ---------------------------------------------------------------- the Lightning test loop, end to end


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="evaluate", overrides=["model=tiny_llama", *overrides])


def test_runs_name_the_file_their_data_kind_reads():
    from factedit.data.zsre import ZSRE_FILE

    assert data_file(compose_cfg()) == DEV_FILE
    assert data_file(compose_cfg("data=zsre")) == ZSRE_FILE != DEV_FILE
    assert data_file(compose_cfg("data=zsre", "data.path=x/z.json")) == Path("x/z.json")
    assert output_dir(compose_cfg("data=zsre", "gen=false"), "memit").name == f"memit-tiny_llama-{ZSRE_FILE.stem}-nogen"


def write_data(tmp_path, count=3, bad=True) -> Path:
    items = json.loads(DEV_FILE.read_text())[:count]
    if bad:
        items.insert(
            1,
            {
                **items[0],
                "case_id": 999999,
                "requested_rewrite": {**items[0]["requested_rewrite"], "target_new": {"str": 5}},
            },
        )
    path = tmp_path / "data.json"
    path.write_text(json.dumps(items))
    return path


def lines_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_zsre_run_reports_token_accuracies_before_and_after(tmp_path, tiny_llama, zsre_items):
    """data=zsre outside sequential runs: each record's token accuracies pre and post, their means in the summary."""
    from factedit.data.zsre import load_zsre
    from factedit.evaluation.probabilities import zsre_scores

    data = tmp_path / "zsre.json"
    data.write_text(json.dumps(zsre_items))
    options = [
        "data=zsre",
        f"data.path={data}",
        "editor=ft",
        "editor.steps=3",
        "gen=false",
        f"out_dir={tmp_path / 'run'}",
    ]
    out = run(compose_cfg(*options, "+trainer.enable_progress_bar=false"))
    summary, lines = json.loads((out / "summary.json").read_text()), lines_of(out)
    model, tokenizer = tiny_llama  # the same weights the run loaded: pre is the unedited model's accuracy
    unedited = [zsre_scores(model, tokenizer, record) for record in load_zsre(data)[0]]
    assert [line["scores"]["pre"]["efficacy_accuracy"] for line in lines] == [u["efficacy_accuracy"] for u in unedited]
    for stage in ("pre", "post"):
        for key in ("efficacy_accuracy", "paraphrase_accuracy", "neighborhood_accuracy"):
            mean = sum(line["scores"][stage][key] for line in lines) / 2
            assert summary[stage][key] == pytest.approx(100 * mean, abs=1e-9)
        # portability: only the first record has a question (the other's NaN is not counted)
        assert summary[stage]["portability_accuracy"] == pytest.approx(
            100 * lines[0]["scores"][stage]["portability_accuracy"], abs=1e-9
        )
    assert any(line["scores"]["post"] != line["scores"]["pre"] for line in lines)  # the edits changed something
    text = (out / "summary.md").read_text()
    assert text.startswith("# zsRE evaluation") and "| Eff | Par | Spe | Port |" in text


def test_ft_run_writes_lines_and_a_summary_and_resumes(tmp_path):
    data = write_data(tmp_path, count=2)
    case_ids = [r.case_id for r in load_records(DEV_FILE, limit=2)[0]]
    options = [
        "editor=ft",
        "editor.steps=2",
        "gen.max_tokens=16",
        "gen.prompts=1",
        f"data.path={data}",
        f"out_dir={tmp_path / 'run'}",
        "+trainer.enable_progress_bar=false",
    ]
    out = run(compose_cfg(*options))
    summary, lines = json.loads((out / "summary.json").read_text()), lines_of(out)
    assert [line["case_id"] for line in lines] == case_ids and summary["records"] == 2 and summary["skipped"] == 1
    assert summary["skipped_records"][0]["case_id"] == "999999"
    assert all(line["edit_info"]["steps"] >= 1 and len(line["generation"]["texts"]) == 1 for line in lines)
    # summary = mean of the per-record lines (float64), ×100
    for key in ("efficacy_score", "paraphrase_magnitude", "neighborhood_score"):
        assert summary["post"][key] == pytest.approx(
            100 * sum(line["scores"]["post"][key] for line in lines) / 2, abs=1e-9
        )
    assert summary["post"]["generation_entropy"] == pytest.approx(
        100 * sum(line["generation"]["generation_entropy"] for line in lines) / 2, abs=1e-9
    )
    ns_change = (
        sum(
            line["scores"]["post"]["neighborhood_score"] - line["scores"]["pre"]["neighborhood_score"] for line in lines
        )
        / 2
    )
    assert summary["change"]["neighborhood_score"]["mean"] == pytest.approx(100 * ns_change, abs=1e-9)
    assert "Change from the unedited model" in (out / "summary.md").read_text()
    table = compare([out], tmp_path)
    assert "ft: Change from the unedited model" in table
    older = {k: v for k, v in summary.items() if k != "change"}  # summarized before `change`: recomputed from the lines
    (out / "summary.json").write_text(json.dumps(older))
    assert compare([out], tmp_path) == table
    # a killed run: the last line was cut in half; the rerun measures only that record again
    text = (out / "records.jsonl").read_text().splitlines()
    (out / "records.jsonl").write_text(text[0] + "\n" + text[1][:40])
    run(compose_cfg(*options))
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["records_this_run"] == 1 and resumed["records"] == 2
    assert [line["case_id"] for line in lines_of(out)] == case_ids  # the cut line is gone, the record measured again
    for key in ("efficacy_score", "neighborhood_magnitude", "generation_entropy", "reference_score", "score"):
        assert resumed["post"][key] == pytest.approx(summary["post"][key], abs=1e-9), key
    with pytest.raises(FacteditError, match="other settings"):
        run(compose_cfg(*options, "editor.steps=3"))
    # options that change no number on this CPU (how steps run on a GPU) do not block resuming
    execution_only = ("+editor.cuda_graph=true", "+editor.fused_activations=false")
    assert (
        json.loads((run(compose_cfg(*options, *execution_only)) / "summary.json").read_text())["records_this_run"] == 0
    )


def test_bf16_counts_as_it_resolves_on_this_device():
    """bf16 changes a run's numbers where the hardware has bfloat16 (then a run resumes only with the
    same setting) and nothing where it falls back to float32; tf32 only on a GPU."""
    cpu, native = torch.device("cpu"), native_bf16(torch.device("cpu"))
    execution = {"cuda_graph": True, "fused_activations": False, "tf32": True}
    assert outcome_config({"bf16": "auto", **execution}, cpu) == {"bf16": native}
    assert outcome_config({"bf16": True}, cpu) == {"bf16": native}
    assert outcome_config({"bf16": False}, cpu) == {"bf16": False}
    assert outcome_config({"bf16": "auto"}, cpu, torch.float64) == {"bf16": False}  # a float64 model runs float64
    with pytest.raises(FacteditError, match="editor.bf16='half'"):
        outcome_config({"bf16": "half"}, cpu)


def test_saved_edits_are_measured_without_editing(tmp_path, tiny_llama):
    model, tokenizer = tiny_llama
    (record,), _ = load_records(DEV_FILE, limit=1)
    d_mlp = rewrite_weight(model, 1).shape[1]
    edits = edit(
        model,
        tokenizer,
        record.to_fact(),
        stats={1: torch.eye(d_mlp)},
        hparams=dict(layer=1, v_num_grad_steps=3, context_templates=[[3, 1]]),
    )
    edited = measure_record(model, tokenizer, record)
    revert_edits(model, edits.backup)
    save_edits(
        tmp_path / "ckpt" / "edits.safetensors",
        list(edits),
        base_fingerprint=model_fingerprint(model),
        model_name="tiny_llama",
    )
    out = run(
        compose_cfg(
            f"edits={tmp_path / 'ckpt'}",
            "gen=false",
            "data.limit=3",
            f"out_dir={tmp_path / 'run'}",
            "+trainer.enable_progress_bar=false",
        )
    )
    (line,) = lines_of(out)
    assert line["case_id"] == record.case_id and line["editor"] == "saved"
    assert torch.allclose(
        torch.tensor(line["nlls"]["post"]["paraphrase"]), torch.tensor(edited["paraphrase"]), atol=1e-6
    )
    assert line["nlls"]["pre"] != line["nlls"]["post"]


class RefusesCase3:
    """FT for one step, except that case 3 fails the way ROME does when the model already answers."""

    name = "refuses"

    def __call__(self, model, tokenizer, record):
        if record.case_id == 3:
            raise FacteditError("the model already answers")
        return fine_tune(model, tokenizer, record.to_fact(), 1, lr=1e-2, steps=1)


def test_failed_edits_are_counted_and_leave_the_weights(tiny_llama):
    model, tokenizer = tiny_llama
    records, _ = load_records(DEV_FILE, limit=3)
    evaluator = CounterFactEvaluator(
        model, tokenizer, RefusesCase3(), sorted({r.relation_id for r in records}), pre=False
    )
    trainer = _quiet_trainer()
    before = rewrite_weight(model, 1).clone()
    trainer.test(evaluator, datamodule=CounterFactDataModule(records), verbose=False)
    assert evaluator.summary["records"] == 2 and evaluator.summary["failed"] == 1
    assert evaluator.summary["pre"]["efficacy_score"] is None and torch.equal(rewrite_weight(model, 1), before)


def _quiet_trainer():
    return lightning.Trainer(accelerator="cpu", devices=1, logger=False, inference_mode=False,
                             enable_progress_bar=False, enable_model_summary=False)  # fmt: skip


class Leaks:
    """Changes a weight it does not back up."""

    name = "leaks"

    def __call__(self, model, tokenizer, record):
        with torch.no_grad():
            rewrite_weight(model, 2).add_(1e-3)
        return {}


def test_an_edit_that_is_not_restored_stops_the_run(tiny_llama64):
    model, tokenizer = tiny_llama64
    records, _ = load_records(DEV_FILE, limit=1)
    evaluator = CounterFactEvaluator(model, tokenizer, Leaks(), [records[0].relation_id], pre=False)
    trainer = _quiet_trainer()
    with pytest.raises(AssertionError, match="weights changed outside the editor's backup"):
        trainer.test(evaluator, datamodule=CounterFactDataModule(records), verbose=False)


def test_two_process_ddp_gives_the_numbers_of_one_process(tmp_path):
    data = write_data(tmp_path, count=3)
    single = run(
        compose_cfg(
            "editor=none",
            "gen=false",
            f"data.path={data}",
            f"out_dir={tmp_path / 'one'}",
            "+trainer.enable_progress_bar=false",
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    command = [
        sys.executable,
        str(REPO_ROOT / "src" / "evaluate.py"),
        "model=tiny_llama",
        "editor=none",
        "gen=false",
        f"data.path={data}",
        f"out_dir={tmp_path / 'two'}",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "+trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two"))
    assert two["devices"] == 2 and two["records"] == one["records"] == 3 and two["skipped"] == 1
    ranks = Counter(line["rank"] for line in lines_of(tmp_path / "two"))
    assert sorted(line["case_id"] for line in lines_of(tmp_path / "two")) == [
        r.case_id for r in load_records(DEV_FILE, limit=3)[0]
    ]
    assert set(ranks) == {0, 1}
    for stage in ("pre", "post"):
        for key, value in one[stage].items():
            assert two[stage][key] == pytest.approx(value, abs=1e-9), (stage, key)
    assert two["by_relation"].keys() == one["by_relation"].keys()
    for relation, row in one["by_relation"].items():
        for stage in ("pre", "post"):
            assert two["by_relation"][relation][stage] == pytest.approx(row[stage], abs=1e-9), relation
    table = compare([single, tmp_path / "two"], tmp_path, tmp_path / "compare.png")
    assert table.count("| none") == 2 and "| unedited |" in table and (tmp_path / "compare.png").stat().st_size > 5000


def test_an_option_added_later_at_its_neutral_value_lets_saved_runs_resume(tmp_path):
    """A run saved before null_space_cov_weight existed resumes with it at 0 (the same numbers), not with 2."""
    cpu = torch.device("cpu")
    saved = {"editor_config": outcome_config({"null_space_l2": 10.0, "bf16": False}, cpu)}
    write_json(tmp_path / "settings.json", saved)
    same = outcome_config({"null_space_l2": 10.0, "bf16": False, "null_space_cov_weight": 0.0}, cpu)
    check_settings(tmp_path, {"editor_config": same})
    other = outcome_config({"null_space_l2": 10.0, "bf16": False, "null_space_cov_weight": 2.0}, cpu)
    assert other["null_space_cov_weight"] == 2.0
    with pytest.raises(FacteditError, match="editor_config differ"):
        check_settings(tmp_path, {"editor_config": other})

"""The catalogue of bad input: each case is refused with one line `error: ...` and exit status 2, before
any work, and leaves no file behind; through the Python API a FacteditError before any weight changes.

Command-line cases run the entry points' own `factedit.cli.entry` in this process (argv as the shell
passes it); a few run as real processes to check the whole path. Tampered and corrupt files are in
test_bad_files.py.
"""

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from factedit import FacteditError, memit
from factedit.cli import check_command, entry
from factedit.evaluation.command import check_settings
from factedit.models import base_fingerprint, model_fingerprint
from factedit.paths import CHECKPOINT_DIR, REPO_ROOT
from factedit.rome import edit, revert_edits

CLI_CASES = {
    "edit": [
        ("model=foo", "unknown model=foo: use one of"),
        ("fact=foo", "unknown fact=foo: use one of"),
        ("editor=foo", "unknown editor=foo: use one of"),
        ("trainer=foo", "unknown trainer=foo: use one of"),
        ("foo=1", "unknown option foo"),
        ("editor.foo=1", "unknown option editor.foo"),
        ("model.rome.v_num_grad_steps=0", "set editor options as editor.v_num_grad_steps="),
        ("+model.rome.v_num_grad_steps=0", "model.rome.v_num_grad_steps=0: must be > 0"),
        ("+model.rome.v_lr=nan", "model.rome.v_lr=nan: must be a finite number"),
        ("model.rome.layer=abc", "model.rome.layer='abc': must be a finite integer"),
        ("model.rome.layer=-1", "must be >= 0"),
        ("editor.v_lr=nan", "editor.v_lr=nan: must be a finite number"),
        ("editor.v_lr=inf", "must be a finite number"),
        ("editor.v_lr=-1", "editor.v_lr=-1: must be > 0"),
        ("editor.v_num_grad_steps=0", "editor.v_num_grad_steps=0: must be > 0"),
        ("editor.v_num_grad_steps=-5", "must be > 0"),
        ("editor.v_num_grad_steps=2.5", "must be a finite integer"),
        ("editor.layer=abc", "editor.layer='abc'"),
        ("editor.update=foo", "use one of fixed, original, two_keys"),
        ("editor.stop_on=foo", "use one of nll, loss"),
        ("editor.preserve=foo", "use one of none, null_space"),
        ("editor.role=foo", "use one of rewrite"),
        ("editor.bf16=maybe", "use true, false or auto"),
        ("editor.fast=yes", "editor.fast='yes': use true or false"),
        ("editor.context_templates=[[0,1]]", "[[tokens, count], ...] of positive integers"),
        ("editor.context_templates=abc", "of positive integers"),
        ("editor.kl_factor=-1", "must be >= 0"),
        ("editor.clamp_norm_factor=0", "must be > 0"),
        ("editor.loss_threshold=-0.1", "must be >= 0"),
        ("editor.null_space_threshold=0", "must be > 0"),
        ("editor.seed=-1", "must be >= 0"),
        ("editor=memit editor.layers=[3,2]", "increasing layer indices"),
        ("editor=memit editor.layers=[]", "increasing layer indices"),
        ("editor=memit editor.layers=abc", "increasing layer indices"),
        ("editor=memit editor.mom2_update_weight=0", "must be > 0"),
        ("editor=memit editor.null_space_l2=-1", "must be >= 0"),
        ("editor=memit batch_size=0", "batch_size=0: must be an integer >= 1"),
        ("batch_size=-3", "batch_size=-3"),
        ("batch_size=abc", "batch_size=abc"),
        ("run=../../../tmp/x", "a run is a folder name, not a path"),
        ("run=/tmp/x", "a run is a folder name, not a path"),
        ("run=a/b", "not a path"),
        ("run=..", "not a path"),
        ("run=", "not a path"),
        ("fact=custom", "fact.subject is not set"),
        ("fact=custom fact.subject=X", "fact.prompt is not set"),
        ("fact=custom fact.subject=X 'fact.prompt=\"{} is in\"'", "fact.target_new is not set"),
        ("'fact.prompt=\"{{}} is located in the city of\"'", "needs exactly one '{}'"),
        ("'fact.prompt=\"{} costs {dollars} in\"'", "no other braces"),
        ("'fact.prompt=\"Where is it?\"'", "needs exactly one '{}'"),
        ("'fact.prompt=\"{} and {}\"'", "needs exactly one '{}'"),
        ("'fact.subject=\" \"'", "subject must be a non-empty string"),
        ("fact.target_new=Paris", "target_new equals target_true"),
        ("'fact.target_new=\"\"'", "target_new must be a non-empty string"),
        ('fact.prompt="{} plays the sport of"', "quote a value holding spaces, braces or '='"),
        ("fact.subject=a=b", "cannot read the override"),
        ("facts=/no/such/file.json", "no such file"),
        ("resume=/no/such/run", "no saved edits there"),
        ("revert=true", "revert=true needs resume="),
        ("seed=-1", "seed=-1: must be an integer"),
        ("seed=abc", "seed=abc"),
        ("revert=maybe", "revert=maybe: use true or false"),
        ("save_model=2", "use true or false"),
        ("probe.top_k=0", "probe.top_k=0"),
        ("probe.max_new_tokens=-1", "probe.max_new_tokens=-1"),
        ("probe.max_new_tokens=100000", "between 0 and 1000"),
        ("stats.tokens=0", "stats.tokens=0"),
        ("stats.auto=yes", "stats.auto=yes: use true or false"),
        ("stats.auto_tokens=-1", "stats.auto_tokens=-1"),
        ("trainer.devices=0", "trainer.devices=0"),
        ("trainer.accelerator=tpu9", "use one of cpu"),
        ("trainer.precision=8-bit", "trainer.precision=8-bit"),
    ],
    "evaluate": [
        ("editor=foo", "unknown editor=foo"),
        ("data=foo", "unknown data=foo: use one of counterfact"),
        ("data.limit=-1", "data.limit=-1: must be an integer >= 1"),
        ("data.limit=0", "data.limit=0"),
        ("data.limit=abc", "data.limit=abc"),
        ("data.limit=1.5", "data.limit=1.5"),
        ("data.kind=foo", "use one of counterfact, zsre"),
        ("run=../x", "not a path"),
        ("sequential=maybe", "use true or false"),
        ("sequential=true batch_size=0", "batch_size=0"),
        ("checkpoint_every=0", "checkpoint_every=0"),
        ("control_records=-1", "control_records=-1"),
        ("perplexity_tokens=0", "perplexity_tokens=0"),
        ("generation_prompts=-1", "generation_prompts=-1"),
        ("generation_tokens=0", "generation_tokens=0"),
        ("gen.max_tokens=0", "gen.max_tokens=0"),
        ("gen.top_k=0", "gen.top_k=0"),
        ("gen.prompts=0", "gen.prompts=0"),
        ("pre=2", "pre=2: use true or false"),
        ("editor.v_lr=nan", "editor.v_lr=nan"),
        ("editor=memit editor.layers=abc", "increasing layer indices"),
        ("model.rome.layer=abc", "model.rome.layer='abc'"),
        ("foo=1", "unknown option foo"),
        ("edits=/no/such/run", "no saved edits there"),
        ("'compare=[a'", "cannot read the override"),
    ],
    "trace": [
        ("batch_size=-1", "batch_size=-1: must be an integer >= 1"),
        ("batch_size=0", "batch_size=0"),
        ("samples=0", "samples=0"),
        ("noise=0", "noise=0: must be a finite number > 0"),
        ("noise=-1", "noise=-1"),
        ("noise=nan", "noise=nan"),
        ("noise_std_from=foo", "use one of subjects, vocab"),
        ("corruption=foo", "use one of noise, replace"),
        ("window=0", "window=0"),
        ("kinds=[foo]", "non-empty list of hidden, mlp, attn"),
        ("kinds=[]", "non-empty list"),
        ("mode=foo", "use one of single, aggregate"),
        ("min_prob=2", "min_prob=2"),
        ("threads=0", "threads=0"),
        ("mode=aggregate data.limit=0", "data.limit=0"),
        ("fact=custom", "fact.subject is not set"),
        ("'fact.prompt=\"{} and {}\"'", "needs exactly one '{}'"),
        ("model=foo", "unknown model=foo"),
        ("fact=foo", "unknown fact=foo"),
    ],
    "precompute_stats": [
        ("layers=abc", "give a layer index or a list"),
        ("layers=[-1]", "give a layer index"),
        ("layers=[1,x]", "give a layer index"),
        ("data.source=foo", "use one of wiki_offline, wikitext, wikipedia"),
        ("data.max_tokens=0", "data.max_tokens=0"),
        ("data.seq_len=1", "data.seq_len=1"),
        ("data.batch_size=0", "data.batch_size=0"),
        ("data.save_every=-1", "data.save_every=-1"),
        ("force=maybe", "use true or false"),
        ("report_subjects=0", "report_subjects=0"),
        ("model=foo", "unknown model=foo"),
        ("data=foo", "unknown data=foo"),
        ("model.rome.layer=x", "model.rome.layer='x'"),
    ],
}
CASES = [(task, line, message) for task, cases in CLI_CASES.items() for line, message in cases]


def files_under(*folders: Path) -> set[Path]:
    return {path for folder in folders if folder.exists() for path in folder.rglob("*")}


def never_runs(cfg):
    raise AssertionError("the entry point ran although its input is bad")


@pytest.mark.parametrize("task, line, message", CASES, ids=[f"{t}:{line}" for t, line, _ in CASES])
def test_command_line_is_refused_in_one_line(task, line, message, monkeypatch, capsys):
    """`python src/<task>.py <line>` as the shell splits it: exit 2, one line naming the problem, no file."""
    watched = (CHECKPOINT_DIR, REPO_ROOT / "logs" / task)
    before = files_under(*watched)
    monkeypatch.setattr(sys, "argv", [f"src/{task}.py", *shlex.split(line)])
    with pytest.raises(SystemExit) as exit_info:
        entry(task, never_runs)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert files_under(*watched) == before


FACT_FILES = [
    ("[1, 2, 3]", ".json", "item 0 is 1, not a fact mapping"),
    ('["str"]', ".json", "item 0 is 'str', not a fact mapping"),
    ("[]", ".json", "holds no facts"),
    ('{"requested_rewrite": {"subject": "A", "prompt": "{} is in", "target_true": {"str": "B"}}}', ".json",
     "CounterFact record 0 has no requested_rewrite 'target_new'"),
    ("[{bad json", ".json", "cannot read facts file"),
    ("- subject: [unclosed\n", ".yaml", "cannot read facts file"),
    ('[{"subject": "A", "prompt": "A is in", "target_new": "B"}]', ".json", "needs exactly one '{}'"),
    ('[{"subject": "A", "target_new": "B"}]', ".json", "fact is missing prompt"),
    ('"just a string"', ".json", "must hold a list of facts"),
]  # fmt: skip


@pytest.mark.parametrize("content, suffix, message", FACT_FILES, ids=[c[:24] for c, _, _ in FACT_FILES])
def test_bad_facts_file_is_one_line(tmp_path, content, suffix, message):
    path = tmp_path / f"facts{suffix}"
    path.write_text(content)
    with pytest.raises(FacteditError) as error:
        check_command("edit", [f"facts={path}"])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_corrupt_run_settings_are_one_line(tmp_path):
    (tmp_path / "settings.json").write_text("{not json")
    with pytest.raises(FacteditError, match="cannot read .*settings.json.*delete") as error:
        check_settings(tmp_path, {"model": "x"})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("argv, message", [
    (["model=smollm3"], "error: unknown model=smollm3: use one of"),
    (["editor.v_lr=nan"], "error: editor.v_lr=nan: must be a finite number"),
    (["fact.prompt={} plays the sport of"], "error: cannot read the override"),
])  # fmt: skip
def test_real_process_exits_2_with_one_line(tmp_path, argv, message):
    """The whole path in a real process: Hydra's multi-line messages and tracebacks never reach the user."""
    result = subprocess.run([sys.executable, "src/edit.py", *argv, f"out_dir={tmp_path / 'x'}"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(message) and not (tmp_path / "x").exists()


# ---------------------------------------------------------------- the Python API (real model)

EIFFEL = {"subject": "Eiffel Tower", "prompt": "{} is located in the city of", "target_new": "Rome"}
LONG = " ".join(["word"] * 5000)
API_CASES = [
    ({**EIFFEL, "prompt": "{} costs {dollars} in"}, None, "no other braces"),
    ({**EIFFEL, "prompt": "{{}} is located in"}, None, "no other braces"),
    (EIFFEL, {"layer": "3x"}, "editor.layer='3x': must be a finite integer"),
    (EIFFEL, {"v_num_grad_steps": 0}, "must be > 0"),
    (EIFFEL, {"v_lr": float("nan")}, "must be a finite number"),
    (EIFFEL, {"foo": 1}, "unknown rome option 'foo'"),
    (EIFFEL, {"layer": 99}, "out of range"),
    ([1, 2, 3], None, "a fact must be a mapping"),
    ({**EIFFEL, "prompt": "{} " + LONG}, None, "is longer than 256 tokens"),
    ({**EIFFEL, "specificity_probes": [LONG]}, None, "is longer than 256 tokens"),
    ({**EIFFEL, "subject": ""}, None, "subject must be a non-empty string"),
]


@pytest.mark.parametrize("facts, hparams, message", API_CASES, ids=[m for _, _, m in API_CASES])
def test_api_refuses_before_any_weight_changes(smollm2, facts, hparams, message):
    model, tokenizer = smollm2
    fingerprint, start = model_fingerprint(model), time.perf_counter()
    with pytest.raises(FacteditError) as error:
        edit(model, tokenizer, facts, stats={3: torch.eye(1536)}, hparams=hparams)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert time.perf_counter() - start < 5  # the 5,000-word prompt is refused in well under 5 s
    assert model_fingerprint(model) == fingerprint


def test_memit_api_refuses_a_long_prompt(smollm2):
    model, tokenizer = smollm2
    with pytest.raises(FacteditError, match="longer than 256 tokens"):
        memit.edit(model, tokenizer, [{**EIFFEL, "prompt": "{} " + LONG}], stats=dict.fromkeys(range(1, 6)))


def test_the_long_prompt_is_refused_by_the_command_in_seconds(tmp_path):
    start = time.perf_counter()
    prompt = "{} " + " ".join(["word"] * 5000)
    result = subprocess.run([sys.executable, "src/edit.py", f"fact.prompt='{prompt}'", f"out_dir={tmp_path / 'x'}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2 and "is longer than 256 tokens" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    assert time.perf_counter() - start < 60  # process start and model load included; the check itself is milliseconds


# ---------------------------------------------------------------- edit() twice, and a failure midway


def test_edit_twice_reads_the_base_statistics_and_reverts_bitwise(tiny_llama, tmp_path, monkeypatch):
    """The second edit() on an edited model accepts the base model's statistics (their fingerprint follows
    the model through edits), and reverting both calls restores the weights bit for bit."""
    import factedit.paths
    from factedit.stats.collect import compute_second_moment

    model, tokenizer = tiny_llama
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = model_fingerprint(model)
    monkeypatch.setattr(factedit.paths, "STATS_DIR", tmp_path)
    compute_second_moment(model, tokenizer, [1], max_tokens=2048, seq_len=64, batch_size=4)
    hparams = {"layer": 1, "v_num_grad_steps": 2, "context_templates": [[3, 1]]}
    first = edit(model, tokenizer, EIFFEL, hparams=hparams)
    assert model_fingerprint(model) != base and base_fingerprint(model) == base
    second = edit(model, tokenizer, {**EIFFEL, "subject": "Colosseum", "target_new": "Athens"}, hparams=hparams)
    assert len(first) == len(second) == 1 and base_fingerprint(model) == base
    revert_edits(model, second.backup)
    revert_edits(model, first.backup)
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())


def test_a_failure_after_the_update_leaves_the_weights_as_they_were(tiny_llama, monkeypatch):
    """Inject a failure after the second fact's update is applied: edit() restores every weight."""
    import factedit.rome.rome as rome_module

    model, tokenizer = tiny_llama
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []
    real_apply = rome_module.apply_edits

    def apply_then_fail(model, edits, backup=None):
        result = real_apply(model, edits, backup)
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure after the update")
        return result

    monkeypatch.setattr(rome_module, "apply_edits", apply_then_fail)
    facts = [EIFFEL, {**EIFFEL, "subject": "Colosseum", "target_new": "Athens"}]
    hparams = {"layer": 1, "v_num_grad_steps": 2, "context_templates": [[3, 1]]}
    with pytest.raises(RuntimeError, match="injected"):
        edit(model, tokenizer, facts, stats={1: torch.eye(model.config.intermediate_size)}, hparams=hparams)
    assert len(calls) == 2 and all(torch.equal(p, original[n]) for n, p in model.named_parameters())


def test_a_memit_failure_after_a_layer_is_written_leaves_the_weights_as_they_were(tiny_llama, monkeypatch):
    """MEMIT: a failure after the first layer's update is applied (reading what its keys now give) restores all."""
    import factedit.memit.memit as memit_module

    model, tokenizer = tiny_llama
    original = {n: p.detach().clone() for n, p in model.named_parameters()}

    def fail(model, edit):
        raise RuntimeError("injected failure after the update")

    monkeypatch.setattr(memit_module, "_written_values", fail)
    facts = [EIFFEL, {**EIFFEL, "subject": "Colosseum", "target_new": "Athens"}]
    hparams = {"layers": [0, 1], "v_num_grad_steps": 2, "context_templates": [[3, 1]]}
    eye = torch.eye(model.config.intermediate_size)
    with pytest.raises(RuntimeError, match="injected"):
        memit.edit(model, tokenizer, facts, stats={0: eye, 1: eye}, hparams=hparams)
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())


# ---------------------------------------------------------------- the README's commands as printed


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, task, argv) of every `python src/<task>.py ...` in README.md (code and prose) and in the
    code blocks of docs/, split by bash itself (quotes, comments, the loops' and blocks' variables)."""
    commands = []
    for page in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            start = line.find("python src/")
            if start < 0 or line.lstrip("`- ").startswith("**") or (page.name != "README.md" and start > 0 and
                                                                   not line.startswith("for ")):  # fmt: skip
                continue
            command = line[start:].split("`")[0].split("; done")[0]
            prelude = "D=data.path=../shared/data/counterfact/counterfact-train.json"  # the blocks' variable
            if loop := re.match(r"for (\w+) in (\S+)", line.strip("`- ").split("`")[-1]):  # the loop's first value
                prelude += f"; {loop[1]}={loop[2]}"
            words = subprocess.run(["bash", "-c", f"{prelude}\nset -- {command}\nprintf '%s\\0' \"$@\""],
                                   capture_output=True, text=True, check=True).stdout.split("\0")[:-1]  # fmt: skip
            task = words[1].removeprefix("src/").removesuffix(".py")
            commands.append((f"{page.name}:{number}", task, words[2:]))
    return commands


def test_documented_commands_compose_and_validate(tmp_path, monkeypatch):
    """Each command of the README and docs/, copied into bash, parses and passes every option check."""
    commands = documented_commands()
    assert len(commands) >= 50
    monkeypatch.chdir(tmp_path)  # the README's facts=my_facts.json, relative to where the user runs it
    (tmp_path / "my_facts.json").write_text(json.dumps([EIFFEL]))
    for where, task, argv in commands:
        for saved in [a.split("=", 1)[1] for a in argv if a.startswith(("resume=", "edits="))]:
            (tmp_path / saved).mkdir(parents=True, exist_ok=True)  # what the command before it saved
            (tmp_path / saved / "edits.safetensors").touch()
        try:
            check_command(task, argv)
        except FacteditError as error:
            raise AssertionError(f"{where}: python src/{task}.py {' '.join(argv)}: {error}") from None

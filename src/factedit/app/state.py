"""What the app holds and does: one model in memory, the edits applied to it in order, and the actions of
the page (trace, edit, undo, save, load, compare). Every action that runs the model or changes its weights
takes `App.lock`, so two browser tabs never interleave on the weights; reads (status, history, progress)
never wait for it. The server hands actions to `App.call`, which runs them one after another on one model
thread (a queue of one worker): torch's CPU thread pool then stays that thread's, where a fresh thread per
request would start its own beside the idle ones and run the same edit ~1.5 s slower on a 2-core machine."""

import base64
import itertools
import json
import logging
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from factedit.architectures import get_module
from factedit.errors import FacteditError
from factedit.io import tensors_digest
from factedit.models import model_fingerprint
from factedit.paths import CHECKPOINT_DIR
from factedit.probes import continuations, next_token_logits, probe, probe_prompts, probe_table, top_tokens
from factedit.rome.edits import Edit, WeightBackup, apply_edits, load_edits, revert_edits, save_edits
from factedit.rome.facts import Fact, check_prompt
from factedit.rome.hparams import RomeHparams, resolve_hparams
from factedit.rome.rome import edit as rome_edit
from factedit.stats.files import second_moment_for
from factedit.tokens import check_prompt_lengths, fill_prompt

log = logging.getLogger("factedit.app")
KINDS = ("hidden", "mlp", "attn")
MAX_FIELD_CHARS = 2000  # longer text is refused before tokenizing (the token cap itself is check_prompt_lengths')
SAVE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
EDIT_IDS = itertools.count(1)


@dataclass
class Applied:
    """One edit in the history: the Edit, the bit-exact weights it replaced, and what proves an undo exact
    (the SHA-256 of those weights, the next-token logits of its probes before it was applied). `prompts` are
    also the probes whose continuations `/api/continuations` fills into the edit's table."""

    edit: Edit
    backup: WeightBackup
    digest: str
    prompts: list[str]
    logits_before: torch.Tensor
    source: str = "edit"  # edit, or load:<checkpoint>
    seconds: float = 0.0
    id: int = field(default_factory=lambda: next(EDIT_IDS))  # never reused: a page's table names its edit by it

    def summary(self, index: int) -> dict:
        fact = self.edit.fact
        return {"index": index, "id": self.id, "subject": fact.get("subject"), "prompt": fact.get("prompt"),
                "target_new": fact.get("target_new"), "layer": self.edit.layer, "module": self.edit.module,
                "source": self.source, "seconds": round(self.seconds, 2),
                "v_steps": self.edit.info.get("steps")}  # fmt: skip


@dataclass
class Progress:
    """What the one running action is doing, for the page to poll: task, step of total, a message."""

    task: str = ""
    step: int = 0
    total: int = 0
    message: str = "idle"
    started: float = 0.0
    busy: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        elapsed = round(time.perf_counter() - self.started, 1) if self.busy else 0.0
        return {"task": self.task, "step": self.step, "total": self.total, "message": self.message,
                "busy": self.busy, "elapsed": elapsed}  # fmt: skip


def current_weights(model, names) -> dict:
    """{module name: its weight now} for the named modules."""
    return {name: get_module(model, name).weight for name in names}


def text_field(data: dict, key: str, required: bool = True) -> str:
    """A form field as stripped text; an empty required field or over-long text is a FacteditError."""
    value = data.get(key)
    value = "" if value is None else str(value)
    if len(value) > MAX_FIELD_CHARS:
        raise FacteditError(f"{key} is {len(value)} characters long: keep it under {MAX_FIELD_CHARS}")
    if required and not value.strip():
        raise FacteditError(f"{key} is empty: fill it in")
    return value.strip()


def lines_field(data: dict, key: str) -> list[str]:
    """One probe per line (blank lines dropped)."""
    return [line.strip() for line in text_field(data, key, required=False).splitlines() if line.strip()]


class App:
    """The model, its edit history, the trace cache, and the page's actions (each returns a JSON-able dict)."""

    def __init__(self, cfg: DictConfig, model, tokenizer, checkpoints: Path | None = None):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.checkpoints = Path(checkpoints or cfg.get("checkpoints_dir") or CHECKPOINT_DIR)
        self.lock = threading.Lock()  # serializes everything that runs the model or changes its weights
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="factedit-model")  # see the docstring
        self.history: list[Applied] = []  # replaced, never mutated in place, so readers need no lock
        self.progress = Progress()
        self.base = model_fingerprint(model)  # the weights as loaded: statistics and saved edits are bound to them
        self.model_name = str(cfg.model.name)
        self.second_moments: dict[int, torch.Tensor] = {}
        self.trace_cache: dict[tuple, dict] = {}
        self._basis = None
        self.rome = self.hparams()  # checked once: a bad editor option stops the app before it serves

    # ------------------------------------------------------------ reads (no lock)

    def status(self) -> dict:
        return {"model": self.model_name, "base_fingerprint": self.base, "edits": len(self.history),
                "busy": self.progress.busy, "layer": self.rome.layer}  # fmt: skip

    def history_view(self) -> dict:
        return {"edits": [applied.summary(i) for i, applied in enumerate(self.history)]}

    def checkpoint_names(self) -> dict:
        """Folders under the checkpoints folder that hold edits.safetensors, newest first."""
        found = sorted(self.checkpoints.glob("*/edits.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
        return {"checkpoints": [path.parent.name for path in found], "folder": str(self.checkpoints)}

    # ------------------------------------------------------------ running one action at a time

    def call(self, action, *args):
        """Run `action(*args)` on the model thread, after the actions queued before it; its answer or error."""
        return self.worker.submit(action, *args).result()

    @contextmanager
    def running(self, task: str, total: int = 1):
        """Hold the lock for one action and show it as the progress; the progress is idle again after."""
        with self.lock:
            self.progress = Progress(task=task, total=total, message=f"{task}: starting",
                                     started=time.perf_counter(), busy=True)  # fmt: skip
            try:
                yield self.progress
            finally:
                self.progress = Progress()

    def hparams(self) -> RomeHparams:
        options = {**OmegaConf.to_container(self.cfg.editor, resolve=True), "seed": int(self.cfg.seed)}
        return resolve_hparams(self.model, options, model_rome=self.cfg.model.get("rome"), kind=RomeHparams)

    # ------------------------------------------------------------ trace

    def trace(self, data: dict) -> dict:
        """Causal trace of one fact: three heatmaps (PNG as data URLs), clean and corrupted probabilities."""
        from factedit.tracing.causal_trace import check_settings, trace_fact

        subject, prompt = text_field(data, "subject"), text_field(data, "prompt")
        target = text_field(data, "target_true", required=False) or None
        force = bool(data.get("force"))
        check_prompt(prompt, "trace")
        check_prompt_lengths(self.tokenizer, self.model, [fill_prompt(prompt, subject)])
        settings = self.trace_settings()
        check_settings(self.model, settings["samples"], settings["window"], settings["corruption"],
                       settings["noise"], KINDS)  # fmt: skip
        with self.running("trace", total=len(KINDS)) as progress:
            shown = {k: v for k, v in settings.items() if k != "replacement_ids"}
            key = (self.weights_key(), subject, prompt, target, force, json.dumps(shown, sort_keys=True))
            if key in self.trace_cache:
                return {**self.trace_cache[key], "cached": True}
            began, scores, result = time.perf_counter(), {}, None
            for step, kind in enumerate(KINDS):  # one kind at a time, to show the progress
                progress.step, progress.message = step, f"trace: restoring {kind} ({step + 1}/{len(KINDS)})"
                one_kind = {**settings, "kinds": [kind], "force": force, "min_prob": float(self.cfg.trace.min_prob)}
                result = trace_fact(self.model, self.tokenizer, prompt, subject, target, **one_kind).to_dict()
                scores[kind] = result["scores"][kind]  # the same noise, so the grids match one call's
            result.update(scores=scores, seconds=round(time.perf_counter() - began, 2))
            answer = self._trace_answer(result)
            self.trace_cache[key] = answer
            return {**answer, "cached": False}

    def weights_key(self) -> tuple[str, str]:
        """The weights as they are now, exactly: the base fingerprint and the SHA-256 of every module an edit in
        the history changed (model_fingerprint alone rounds to bfloat16, which can hide a small edit)."""
        touched = {name for applied in self.history for name in applied.backup}
        return model_fingerprint(self.model), tensors_digest(current_weights(self.model, touched))

    def trace_settings(self) -> dict:
        """trace_fact's settings from the config's `trace:` block; the noise basis is measured once."""
        from factedit.tracing.command import noise_basis, trace_settings

        trace_cfg = self.cfg.trace
        if self._basis is None:
            self._basis = noise_basis(self.model, self.tokenizer, trace_cfg, self._subjects())
        plain = {**OmegaConf.to_container(trace_cfg, resolve=True), "kinds": list(KINDS), "seed": int(self.cfg.seed)}
        return trace_settings(OmegaConf.create(plain), self._basis)

    def _subjects(self) -> list[str] | None:
        from factedit.tracing.aggregate import read_counterfact
        from factedit.tracing.command import DEFAULT_COUNTERFACT

        path = Path(self.cfg.trace.data.get("path") or DEFAULT_COUNTERFACT)
        return [record["subject"] for record in read_counterfact(path)] if path.is_file() else None

    def _trace_answer(self, result: dict) -> dict:
        """The heatmaps drawn by the CLI's plotting code, as PNG data URLs, and the numbers beside them."""
        from factedit.tracing.plots import plot_heatmap

        images = {}
        with tempfile.TemporaryDirectory() as folder:
            for kind in KINDS:
                png = next(p for p in plot_heatmap(result, kind, Path(folder) / kind, self.model_name)
                           if p.suffix == ".png")  # fmt: skip
                images[kind] = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
        keys = ("text", "target", "clean_prob", "corrupted_prob", "clean_top", "clean_top_prob", "known", "samples",
                "window", "seconds", "tokens")  # fmt: skip
        return {**{key: result[key] for key in keys}, "images": images}

    # ------------------------------------------------------------ edit

    def edit(self, data: dict) -> dict:
        """One ROME edit applied in memory: the probe table before/after with top tokens (one forward a side), its
        seconds and v* steps. The greedy continuations (a decode loop a side, the slow part) are left empty here
        and filled by `continuations`, which the page asks for right after, so the table shows without them."""
        subject = text_field(data, "subject")
        fact = Fact(subject=subject, prompt=text_field(data, "prompt"), target_new=text_field(data, "target_new"),
                    name=subject,  # what the editor's messages call the fact
                    generalization_probes=lines_field(data, "generalization"),
                    specificity_probes=lines_field(data, "specificity"))  # fmt: skip
        prompts, kinds = probe_prompts([fact])
        check_prompt_lengths(self.tokenizer, self.model, prompts)
        hparams, top_k = self.rome, int(self.cfg.probe.top_k)
        with self.running("edit", total=3) as progress:
            progress.message = "edit: key statistics"
            second_moment = self.second_moment(hparams.layer)
            progress.step, progress.message = 1, "edit: probing before"
            logits_before = next_token_logits(self.model, self.tokenizer, prompts)  # also undo's exactness check
            progress.step, progress.message = 2, "edit: fitting v* and writing the edit"
            start = time.perf_counter()
            edits = rome_edit(self.model, self.tokenizer, [fact], {hparams.layer: second_moment}, hparams)
            seconds = time.perf_counter() - start
            try:
                logits_after = next_token_logits(self.model, self.tokenizer, prompts)
            except BaseException:  # an edit is in the history or not applied at all
                revert_edits(self.model, edits.backup)
                raise
            made = edits[0]
            digest = tensors_digest(edits.backup)
            applied = Applied(made, edits.backup, digest, prompts, logits_before, "edit", seconds)
            self.history = [*self.history, applied]
        before = top_tokens(self.tokenizer, logits_before, top_k)
        after = top_tokens(self.tokenizer, logits_after, top_k)
        rows = [{"prompt": prompt, "kind": kind, "before": {"prompt": prompt, "top": b, "continuation": None},
                 "after": {"prompt": prompt, "top": a, "continuation": None}}
                for prompt, kind, b, a in zip(prompts, kinds, before, after)]  # fmt: skip
        return {"rows": rows, "table": probe_table([r["before"] for r in rows], [r["after"] for r in rows], kinds),
                "seconds": round(seconds, 2), "v_steps": made.info.get("steps"), "p_target": made.info.get("p_target"),
                "layer": made.layer, "id": applied.id, "edits": len(self.history)}  # fmt: skip

    def continuations(self, data: dict) -> dict:
        """The greedy continuations of edit `id`'s probes on the weights just before and just after it (the edits
        after it swapped out, bit for bit, and back in after): what fills the edit table's text. An edit undone
        meanwhile (another tab) is a message, never another edit's text."""
        edit_id = data.get("id")
        with self.running("continuations", total=2) as progress:
            history = self.history
            found = [i for i, applied in enumerate(history) if applied.id == edit_id]
            if not found:
                raise FacteditError(f"edit {edit_id!r} is not applied any more (undone or replaced by a load): "
                                    "edit again to see its continuations")  # fmt: skip
            index = found[0]
            applied, steps = history[index], int(self.cfg.probe.max_new_tokens)
            progress.message = "continuations: after the edit"
            with self.weights_before(index + 1):
                after = continuations(self.model, self.tokenizer, applied.prompts, steps)
            progress.step, progress.message = 1, "continuations: before the edit"
            with self.weights_before(index):
                before = continuations(self.model, self.tokenizer, applied.prompts, steps)
        return {"id": edit_id, "prompts": applied.prompts, "before": before, "after": after}

    def second_moment(self, layer: int) -> torch.Tensor:
        """C of the rewrite layer as the edit CLI loads it (stats/, or stats.dir), on the unedited weights."""
        if layer not in self.second_moments:
            with self.original_weights():  # stats.auto computes C on the base weights, as the CLI does
                self.second_moments[layer] = second_moment_for(self.model, self.tokenizer, layer, self.cfg.stats)
        return self.second_moments[layer]

    # ------------------------------------------------------------ undo, save, load

    def undo(self) -> dict:
        """Revert the last edit bit for bit, and check it: the weights' SHA-256 and the probes' logits."""
        with self.running("undo"):
            if not self.history:
                raise FacteditError("nothing to undo: no edit is applied")
            last = self.history[-1]
            start = time.perf_counter()
            revert_edits(self.model, WeightBackup(last.backup))
            seconds = time.perf_counter() - start
            self.history = self.history[:-1]
            weights_exact = tensors_digest(current_weights(self.model, last.backup)) == last.digest
            logits_exact = torch.equal(next_token_logits(self.model, self.tokenizer, last.prompts), last.logits_before)
        fact = last.edit.fact
        return {"undone": f"{fact.get('subject')} -> {fact.get('target_new')}", "weights_exact": weights_exact,
                "logits_exact": logits_exact, "seconds": round(seconds, 5), "edits": len(self.history)}  # fmt: skip

    def save(self, data: dict) -> dict:
        """The applied edits to <checkpoints>/<name>/edits.safetensors (a new folder name; never overwrites)."""
        name = text_field(data, "name")
        if not SAVE_NAME.fullmatch(name) or name in (".", ".."):
            raise FacteditError(f"save name {name!r}: use a plain folder name (letters, digits, - _ .), not a path")
        path = self.checkpoints / name / "edits.safetensors"
        with self.running("save"):
            if not self.history:
                raise FacteditError("nothing to save: make or load an edit first")
            if path.exists():
                raise FacteditError(f"{path.parent} already holds edits: choose another name")
            save_edits(path, [a.edit for a in self.history], base_fingerprint=self.base, model_name=self.model_name)
        return {"saved": str(path), "edits": len(self.history)}

    def load(self, data: dict) -> dict:
        """Replace the edits in memory by a checkpoint's (as `resume=`): checked against the base weights first,
        so a wrong file changes nothing."""
        name = text_field(data, "name")
        if not SAVE_NAME.fullmatch(name):
            raise FacteditError(f"checkpoint {name!r}: pick one of the listed checkpoint names")
        with self.running("load"):
            loaded, _ = load_edits(self.checkpoints / name, base_fingerprint=self.base)
            previous = self.history
            self._revert_all()
            try:
                self._apply_each(loaded, f"load:{name}")
            except BaseException:
                self._revert_all()
                self._apply_each([a.edit for a in previous], None, previous)
                raise
        return {"loaded": name, "count": len(self.history), "history": self.history_view()["edits"]}

    def _revert_all(self) -> None:
        for applied in reversed(self.history):
            revert_edits(self.model, WeightBackup(applied.backup))
        self.history = []

    def _apply_each(self, edits: list[Edit], source: str | None, previous: list[Applied] | None = None) -> None:
        """Apply edits one by one (each its own backup, so each can be undone alone)."""
        for index, made in enumerate(edits):
            prompts = [check_text_of(made)]
            logits_before = next_token_logits(self.model, self.tokenizer, prompts)
            start = time.perf_counter()
            backup = apply_edits(self.model, [made])
            seconds = time.perf_counter() - start
            old = previous[index] if previous else None
            applied = Applied(made, backup, tensors_digest(backup), prompts, logits_before,
                              old.source if old else str(source), old.seconds if old else seconds)  # fmt: skip
            self.history = [*self.history, applied]

    # ------------------------------------------------------------ compare

    def compare(self, data: dict) -> dict:
        """A free prompt's top tokens and continuation on the unedited and the edited weights."""
        prompt = text_field(data, "prompt")
        check_prompt_lengths(self.tokenizer, self.model, [prompt])
        with self.running("compare", total=2) as progress:
            edited = probe(self.model, self.tokenizer, [prompt], **self.cfg.probe)[0]
            progress.step, progress.message = 1, "compare: the unedited model"
            with self.original_weights():
                original = probe(self.model, self.tokenizer, [prompt], **self.cfg.probe)[0]
        return {"prompt": prompt, "unedited": original, "edited": edited, "edits": len(self.history)}

    @contextmanager
    def original_weights(self):
        """The base weights swapped in (from the backups) and the edited ones put back after, bit for bit."""
        with self.weights_before(0):
            yield

    @contextmanager
    def weights_before(self, index: int):
        """The weights as they were before edit `index` of the history (from the backups of it and the edits after
        it: the first backup of a module holds its weight then); the current ones put back after, bit for bit."""
        from factedit.evaluation.sequential import base_weights

        earlier: dict[str, torch.Tensor] = {}
        for applied in self.history[index:]:
            for name, weight in applied.backup.items():
                earlier.setdefault(name, weight)
        with base_weights(self.model, earlier):
            yield

    def close(self) -> None:
        """Revert every edit (the model is as loaded again) and stop the model thread."""
        with self.lock:
            self._revert_all()
        self.worker.shutdown(wait=False)


def check_text_of(made: Edit) -> str:
    """The text whose next-token logits an undo of `made` is checked on: its fact's prompt with the subject."""
    prompt, subject = made.fact.get("prompt"), made.fact.get("subject")
    try:
        return fill_prompt(str(prompt), str(subject))
    except FacteditError:  # a MEMIT layer's edit (its facts are listed apart) or an odd record: any text will do
        return "The"

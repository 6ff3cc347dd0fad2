"""Key statistics C = E[k kᵀ]: the metric, the Lightning pass against a float64 reference, files,
load_second_moment's checks, resuming after kill -9, and DDP on two CPU processes."""

import inspect
import os
import signal
import subprocess
import sys
import time

import lightning
import pytest
import torch
from omegaconf import OmegaConf

from factedit import FacteditError, load_model
from factedit.data import WikipediaDataModule
from factedit.hooks import Trace
from factedit.io import read_safetensors
from factedit.models import model_fingerprint
from factedit.paths import CONFIG_DIR, REPO_ROOT
from factedit.stats import SecondMoment, compute_second_moment, load_second_moment
from factedit.stats.files import partial_path, stats_path

# A small pass: 96 rows of 32 tokens, 4 rows a batch (24 batches).
DATA = dict(source="wiki_offline", max_tokens=3_072, seq_len=32, batch_size=4, seed=0)
TRAINER = dict(accelerator="cpu", devices=1, enable_progress_bar=False)
RESUME_DATA = dict(max_tokens=4_096, seq_len=16, batch_size=1)  # 256 tiny batches: long enough to be killed mid-way
RESUME_TOKENS = 4_096


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny_llama")


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_second_moment(model, tokenizer, layer, data) -> torch.Tensor:
    """C in float64 by hand: keys of a full (not stopped) forward over the same rows."""
    rows = WikipediaDataModule(tokenizer, **data).local_rows[: data["max_tokens"] // data["seq_len"]]
    name = f"model.layers.{layer}.mlp.down_proj"
    with torch.no_grad(), Trace(model, name, retain_input=True) as trace:
        model(input_ids=rows)
    keys = trace[name].input.reshape(-1, trace[name].input.shape[-1]).double()  # (tokens, d_mlp)
    return keys.T @ keys / keys.shape[0]


def test_second_moment_metric_matches_float64_outer_products():
    keys = torch.randn(3, 50, 16, dtype=torch.float64)
    metric = SecondMoment(16)
    for batch in keys:
        metric.update(batch.float())
    flat = keys.reshape(-1, 16)
    assert metric.count == 150 and metric.key_outer_sum.dtype == torch.float64
    torch.testing.assert_close(metric.compute(), flat.T @ flat / 150, rtol=1e-6, atol=1e-6)
    metric.update(torch.randn(7, 16).bfloat16())  # a bf16 forward is summed in float32 / float64 too
    assert metric.count == 157
    metric.to(torch.bfloat16)
    assert metric.key_outer_sum.dtype == torch.float64
    restored = SecondMoment(16)
    restored.load_state(metric.key_outer_sum, metric.count)
    assert torch.equal(restored.compute(), metric.compute())


def test_api_defaults_are_the_config_defaults():
    config = OmegaConf.load(CONFIG_DIR / "data" / "wikipedia.yaml")
    defaults = {name: p.default for name, p in inspect.signature(compute_second_moment).parameters.items()}
    for key in ("source", "max_tokens", "seq_len", "batch_size", "save_every"):
        assert defaults[key] == config[key], key


def test_pass_matches_float64_reference_at_several_layers(tiny, tmp_path):
    model, tokenizer = tiny
    paths = compute_second_moment(model, tokenizer, [2, 1], trainer_kwargs=TRAINER, stats_dir=tmp_path, **DATA)
    assert sorted(paths) == [1, 2]
    for layer in (1, 2):
        module = f"model.layers.{layer}.mlp.down_proj"
        assert paths[layer] == tmp_path / "tiny_llama" / module / "wiki_offline-3072.safetensors"
        tensors, metadata = read_safetensors(paths[layer])
        expected = reference_second_moment(model, tokenizer, layer, DATA)
        torch.testing.assert_close(
            tensors["second_moment"].double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max()
        )
        assert int(tensors["count"]) == 3072 and tensors["second_moment"].shape == (128, 128)
        assert metadata["fingerprint"] == model_fingerprint(model) and metadata["module"] == module
        assert (metadata["tokens"], metadata["seq_len"], metadata["source"]) == ("3072", "32", "wiki_offline")
        loaded = load_second_moment(model, layer, stats_dir=tmp_path)
        assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
        assert torch.equal(loaded, tensors["second_moment"])
        assert not partial_path(paths[layer]).exists()


class Interrupt(lightning.Callback):
    """Fails the run after `batches` batches, like a crash."""

    def __init__(self, batches):
        self.batches = batches

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx + 1 == self.batches:
            raise RuntimeError("crash")


def test_layers_interrupted_at_different_rows_resume_together(tiny, tmp_path):
    model, tokenizer = tiny
    complete = compute_second_moment(
        model, tokenizer, [1, 2], trainer_kwargs=TRAINER, stats_dir=tmp_path / "complete", **DATA
    )
    for layer, batches in ((1, 5), (2, 13)):
        with pytest.raises(RuntimeError, match="crash"):
            compute_second_moment(
                model,
                tokenizer,
                [layer],
                trainer_kwargs={**TRAINER, "callbacks": [Interrupt(batches)]},
                stats_dir=tmp_path,
                save_every=2,
                **DATA,
            )
    partials = {
        layer: read_safetensors(
            partial_path(
                stats_path(tmp_path, "tiny_llama", f"model.layers.{layer}.mlp.down_proj", "wiki_offline", 3072)
            )
        )[1]
        for layer in (1, 2)
    }
    assert (partials[1]["rows_done"], partials[2]["rows_done"]) == ("16", "48")  # batches 4 and 12 of 4 rows
    resumed = compute_second_moment(model, tokenizer, [1, 2], trainer_kwargs=TRAINER, stats_dir=tmp_path, **DATA)
    for layer in (1, 2):
        expected = read_safetensors(complete[layer])[0]
        got = read_safetensors(resumed[layer])[0]
        assert int(got["count"]) == int(expected["count"]) == 3072
        torch.testing.assert_close(got["second_moment"], expected["second_moment"], rtol=1e-6, atol=0)
        assert not partial_path(resumed[layer]).exists()


def test_partial_file_of_other_settings_is_refused_and_kept(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(RuntimeError, match="crash"):
        compute_second_moment(
            model,
            tokenizer,
            [1],
            trainer_kwargs={**TRAINER, "callbacks": [Interrupt(3)]},
            stats_dir=tmp_path,
            save_every=2,
            **DATA,
        )
    partial = partial_path(stats_path(tmp_path, "tiny_llama", "model.layers.1.mlp.down_proj", "wiki_offline", 3072))
    saved = partial.read_bytes()
    with pytest.raises(FacteditError, match=r"accumulated with seed=0, this run has seed=1.*delete it to start over"):
        compute_second_moment(model, tokenizer, [1], trainer_kwargs=TRAINER, stats_dir=tmp_path, **{**DATA, "seed": 1})
    assert partial.read_bytes() == saved
    partial.write_bytes(saved[:500])  # half-written (a crash in the middle of a non-atomic copy)
    with pytest.raises(FacteditError, match="not a readable safetensors file"):
        compute_second_moment(model, tokenizer, [1], trainer_kwargs=TRAINER, stats_dir=tmp_path, **DATA)


def test_existing_file_is_kept_and_the_largest_is_loaded(tiny, tmp_path):
    model, tokenizer = tiny
    small = compute_second_moment(
        model, tokenizer, [1], trainer_kwargs=TRAINER, stats_dir=tmp_path, **{**DATA, "max_tokens": 1_024}
    )[1]
    large = compute_second_moment(model, tokenizer, [1], trainer_kwargs=TRAINER, stats_dir=tmp_path, **DATA)[1]
    before = large.stat().st_mtime_ns
    assert compute_second_moment(model, tokenizer, [1], trainer_kwargs=TRAINER, stats_dir=tmp_path, **DATA)[1] == large
    assert large.stat().st_mtime_ns == before  # not recomputed
    chosen = load_second_moment(model, 1, stats_dir=tmp_path)
    assert torch.equal(chosen, read_safetensors(large)[0]["second_moment"])
    assert torch.equal(
        load_second_moment(model, 1, tokens=1_024, stats_dir=tmp_path), read_safetensors(small)[0]["second_moment"]
    )
    with pytest.raises(FacteditError, match=r"source=wikitext.*found only wiki_offline-1024.*data.source=wikitext"):
        load_second_moment(model, 1, source="wikitext", stats_dir=tmp_path)


def test_load_refuses_missing_foreign_and_broken_files(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(
        FacteditError,
        match=r"^no key statistics for tiny_llama layer 2: "
        r"run `python src/precompute_stats.py model=tiny_llama layers=\[2\]`$",
    ):
        load_second_moment(model, 2, stats_dir=tmp_path)
    with pytest.raises(FacteditError, match="out of range"):
        load_second_moment(model, 9, stats_dir=tmp_path)
    path = compute_second_moment(model, tokenizer, [1], trainer_kwargs=TRAINER, stats_dir=tmp_path, **DATA)[1]
    other_layer = stats_path(tmp_path, "tiny_llama", "model.layers.2.mlp.down_proj", "wiki_offline", 3072)
    other_layer.parent.mkdir(parents=True)
    other_layer.write_bytes(path.read_bytes())
    with pytest.raises(FacteditError, match="statistics of model.layers.1.mlp.down_proj, not model.layers.2"):
        load_second_moment(model, 2, stats_dir=tmp_path)
    weight = model.model.layers[0].mlp.down_proj.weight
    saved = weight.detach().clone()
    try:
        weight.data.mul_(2)  # other weights, same name: the fingerprint tells
        with pytest.raises(
            FacteditError, match=r"other weights.*model=tiny_llama layers=\[1\] data.max_tokens=3072 force=true`$"
        ):
            load_second_moment(model, 1, stats_dir=tmp_path)
        with pytest.raises(FacteditError, match="other weights"):  # and precompute does not silently keep it
            compute_second_moment(model, tokenizer, [1], trainer_kwargs=TRAINER, stats_dir=tmp_path, **DATA)
    finally:
        weight.data.copy_(saved)
    path.write_bytes(path.read_bytes()[:1000])  # half-written
    with pytest.raises(FacteditError, match="not a readable safetensors file"):
        load_second_moment(model, 1, stats_dir=tmp_path)


def test_bad_input_to_compute(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(FacteditError, match="out of range"):
        compute_second_moment(model, tokenizer, [4], trainer_kwargs=TRAINER, stats_dir=tmp_path, **DATA)
    with pytest.raises(FacteditError, match="unknown source 'books'"):
        compute_second_moment(
            model, tokenizer, [1], trainer_kwargs=TRAINER, stats_dir=tmp_path, **{**DATA, "source": "books"}
        )
    assert not any(tmp_path.iterdir())


def run_script(stats_dir, *overrides) -> subprocess.Popen:
    data = [f"data.{key}={value}" for key, value in RESUME_DATA.items()]
    command = [
        sys.executable,
        str(REPO_ROOT / "src" / "precompute_stats.py"),
        "model=tiny_llama",
        "layers=[1]",
        f"stats_dir={stats_dir}",
        "data.save_every=2",
        "+trainer.enable_progress_bar=false",
        f"hydra.run.dir={stats_dir}/hydra",
        *data,
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """C of the resume test's settings, computed in one uninterrupted in-process run."""
    model, tokenizer = tiny
    folder = tmp_path_factory.mktemp("uninterrupted")
    path = compute_second_moment(
        model, tokenizer, [1], trainer_kwargs=TRAINER, stats_dir=folder, save_every=0, **{**DATA, **RESUME_DATA}
    )[1]
    return read_safetensors(path)[0]


@pytest.mark.slow  # a fresh interpreter per run: ~5 s of imports idle, ~18 s on a busy 2-core machine
def test_kill_9_then_rerun_continues_to_the_same_result(uninterrupted, tmp_path):
    final = stats_path(tmp_path, "tiny_llama", "model.layers.1.mlp.down_proj", "wiki_offline", RESUME_TOKENS)
    process = run_script(tmp_path)
    deadline = time.monotonic() + 60
    while not partial_path(final).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, f"the run ended before it could be killed:\n{process.communicate()[0]}"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stdout.read()
    assert partial_path(final).exists() and not final.exists()
    tensors, metadata = read_safetensors(partial_path(final))
    assert 0 < int(metadata["rows_done"]) < 256 and int(tensors["count"]) == int(metadata["rows_done"]) * 16

    process = run_script(tmp_path)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert f"continuing {partial_path(final)} from row {metadata['rows_done']}" in output
    resumed = read_safetensors(final)[0]
    assert int(resumed["count"]) == int(uninterrupted["count"]) == RESUME_TOKENS
    torch.testing.assert_close(resumed["second_moment"], uninterrupted["second_moment"], rtol=1e-6, atol=0)
    assert not partial_path(final).exists()


@pytest.mark.slow  # a fresh interpreter per run: ~5 s of imports idle, ~18 s on a busy 2-core machine
def test_ddp_on_two_cpu_processes_gives_the_same_result(uninterrupted, tmp_path):
    process = run_script(tmp_path, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu")
    output, _ = process.communicate(timeout=150)
    assert process.returncode == 0, output
    tensors = read_safetensors(
        stats_path(tmp_path, "tiny_llama", "model.layers.1.mlp.down_proj", "wiki_offline", RESUME_TOKENS)
    )[0]
    assert int(tensors["count"]) == int(uninterrupted["count"])
    torch.testing.assert_close(tensors["second_moment"], uninterrupted["second_moment"], rtol=1e-5, atol=1e-10)

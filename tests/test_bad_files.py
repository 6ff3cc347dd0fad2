"""Files factedit reads check themselves: edits and statistics files that were changed, damaged or malformed
are refused with one line naming the file, the problem and the fix, and a refused apply leaves every weight bit.

Files are made by the real code (ROME and MEMIT edits on a tiny Llama, a statistics file by write_result), then
rewritten with plain safetensors (keeping the metadata, so the checksum no longer matches, or dropping the
checksum as a file of an older version, or an editor that re-signed it, would) or changed byte by byte.
"""

import json
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_edit_cli import run_edit

from factedit import FacteditError, load_model, memit, model_fingerprint
from factedit.architectures import as_out_in, get_module, rewrite_weight
from factedit.io import DIGEST_KEY, read_safetensors, tensors_digest
from factedit.rome import Edit, Fact, WeightBackup, apply_edits, edit, load_edits, revert_edits, save_edits
from factedit.stats import load_second_moment
from factedit.stats.files import stats_path, write_result

FACTS = [
    Fact(subject="Eiffel Tower", prompt="{} is located in the city of", target_new="Rome"),
    Fact(subject="Colosseum", prompt="The {} is located in the city of", target_new="Athens"),
    Fact(subject="Louvre", prompt="The {} is a museum in", target_new="London"),
]
FIT = dict(v_num_grad_steps=3, context_templates=[[3, 2]], seed=0)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CHECKSUM = "do not match their checksum"
MISSES = "does not give its recorded target_value"


pytestmark = pytest.mark.usefixtures("one_thread")


def random_second_moment(d: int, seed: int) -> torch.Tensor:
    keys = torch.randn(500, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return keys.T @ keys / 500


def _make(editor: str, dtype: str, folder, name: str = "tiny_llama") -> SimpleNamespace:
    """Edits made by the real code: ROME writes the 3 facts one after another into layer 1, MEMIT as one batch
    into layers 1-2. Holds the model (reverted), the edits, their file, and each module's weight edited."""
    model, tokenizer = load_model(name, dtype=DTYPES[dtype])
    base = weights(model)
    d_mlp = as_out_in(model, rewrite_weight(model, 1)).shape[1]
    stats = {layer: random_second_moment(d_mlp, layer) for layer in (1, 2)}
    if editor == "rome":
        made = edit(model, tokenizer, FACTS, stats=stats, hparams={**FIT, "layer": 1})
    else:
        # λ = mom2_update_weight small (as tests/test_memit.py): the default's change is below bfloat16's rounding
        hparams = {**FIT, "layers": [1, 2], "bf16": False, "mom2_update_weight": 1e-6}
        made = memit.edit(model, tokenizer, FACTS, stats=stats, hparams=hparams)
    edited = {e.module: get_module(model, e.module).weight.detach().clone() for e in made}
    assert all(not torch.equal(w, base[f"{module}.weight"]) for module, w in edited.items())  # no vacuous test
    revert_edits(model, made.backup)
    path = folder / "edits.safetensors"
    save_edits(path, list(made), base_fingerprint=model_fingerprint(model), model_name=name)
    return SimpleNamespace(model=model, edits=list(made), path=path, edited=edited)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """made(editor, dtype): the edits of _make, built once per module."""
    cache = {}

    def get(editor: str, dtype: str = "float32") -> SimpleNamespace:
        if (editor, dtype) not in cache:
            cache[editor, dtype] = _make(editor, dtype, tmp_path_factory.mktemp(f"{editor}-{dtype}"))
        return cache[editor, dtype]

    return get


def rewrite(path, out, change=None, digest=True):
    """`path` read and written back to `out` with plain safetensors, after change(tensors, metadata) (in place);
    digest=False drops the checksum. Returns out."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    if change is not None:
        change(tensors, metadata)
    if not digest:
        metadata.pop(DIGEST_KEY, None)
    new = out.with_name(out.name + ".new")  # `path` may be `out`, and its tensors may still map it
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(new), metadata=metadata)
    return new.replace(out)


def refused(call, *words) -> str:
    """The message of the FacteditError `call()` raises: one line holding every one of `words`."""
    with pytest.raises(FacteditError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and all(word in message for word in words), message
    return message


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def bitwise_equal(model, saved: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, saved[name]) for name, p in model.named_parameters())


# ---------------------------------------------------------------- tampered or malformed edits files


def flip_third(tensors, name="edit.0.u"):
    tensors[name][: len(tensors[name]) // 3].neg_()


def set_entry(name, value):
    def change(tensors, metadata):
        tensors[name].view(-1)[0] = value

    return change


def with_records(change_records):
    """A change of the `edits` metadata entry's records (a JSON list), e.g. dropping a record's layer."""

    def change(tensors, metadata):
        records = json.loads(metadata["edits"])
        change_records(records)
        metadata["edits"] = json.dumps(records)

    return change


def replace(name, how):
    """A change that replaces tensor `name` by how(tensor) (None: removes it)."""

    def change(tensors, metadata):
        tensors[name] = how(tensors.pop(name))
        if tensors[name] is None:
            del tensors[name]

    return change


def drop(key):
    return lambda tensors, metadata: metadata.pop(key)


def stray(tensors, metadata):
    tensors["edit.7.u"] = tensors["edit.0.u"].clone()


NAN, INF = float("nan"), float("inf")
NOT_FACTORS = "are not the factors of one edit"
# (id, editor, keep the checksum, change, words of the message). A change of the tensors with the checksum
# kept is caught by it; with the checksum dropped (an older file, or one re-signed) by the checks of the content.
BAD_EDITS = [
    ("third-of-u-flipped", "rome", True, lambda t, m: flip_third(t), [CHECKSUM]),
    ("nan-in-u", "rome", True, set_entry("edit.0.u", NAN), [CHECKSUM]),
    ("target-changed", "memit", True, set_entry("edit.1.target_value", 3.0), [CHECKSUM]),
    ("tensor-removed", "rome", True, replace("edit.0.key", lambda t: None), [CHECKSUM]),
    ("no-base-fingerprint", "rome", True, drop("base_fingerprint"), ["has no base_fingerprint in its metadata"]),
    ("no-model", "rome", True, drop("model"), ["has no model in its metadata"]),
    ("no-edits", "rome", True, drop("edits"), ["has no edits in its metadata"]),
    ("invalid-json", "rome", True, lambda t, m: m.update(edits="[{"), ["`edits` metadata is not valid JSON"]),
    ("edits-not-a-list", "rome", True, lambda t, m: m.update(edits='{"layer": 1}'), ["is a dict, not a list"]),
    ("record-not-a-dict", "rome", True, with_records(lambda r: r.__setitem__(0, 1)), ["edit 0's record is a int"]),
    ("record-without-layer", "rome", True, with_records(lambda r: r[1].pop("layer")), ["edit 1 has no integer layer"]),
    ("record-without-module", "memit", True, with_records(lambda r: r[0].pop("module")), ["edit 0 has no module"]),
    ("module-not-a-name", "rome", True, with_records(lambda r: r[0].update(module="x\ny")), ["edit 0 has no module"]),
    ("fact-not-a-dict", "rome", True, with_records(lambda r: r[2].update(fact=[])), ["edit 2's fact or info"]),
    ("bad-weight-dtype", "memit", True, with_records(lambda r: r[1].update(weight_dtype="int8")), ["weight_dtype"]),
    ("u-missing", "rome", False, replace("edit.0.u", lambda t: None), ["edit 0 has no tensor edit.0.u"]),
    ("v-missing", "memit", False, replace("edit.1.v", lambda t: None), ["edit 1 has no tensor edit.1.v"]),
    ("u-of-rank-2-v-of-rank-1", "rome", False, replace("edit.0.u", lambda t: t[:, None]), ["(128, 1)", NOT_FACTORS]),
    ("rank-columns-differ", "memit", False, replace("edit.0.u", lambda t: t[:, :2]), ["(128, 2) and v (64, 3)"]),
    ("u-of-rank-3", "memit", False, replace("edit.0.u", lambda t: t[..., None]), ["(128, 3, 1)", NOT_FACTORS]),
    ("nan-in-u-unchecked", "rome", False, set_entry("edit.0.u", NAN), ["u holds non-finite values"]),
    ("inf-in-v", "memit", False, set_entry("edit.0.v", INF), ["v holds non-finite values"]),
    ("nan-in-key", "rome", False, set_entry("edit.1.key", NAN), ["key holds non-finite values"]),
    ("nan-in-target", "rome", False, set_entry("edit.2.target_value", NAN), ["target_value holds non-finite"]),
    ("integer-u", "rome", False, replace("edit.0.u", lambda t: t.long()), ["u is torch.int64, not floating point"]),
    ("key-of-other-width", "rome", False, replace("edit.0.key", lambda t: t[:-1]), ["key (127,) and", "do not fit"]),
    ("tensor-of-no-record", "rome", False, stray, ["holds edit.7.u, which belongs to none of its 3 edit records"]),
]


@pytest.mark.parametrize(
    "editor, digest, change, words", [case[1:] for case in BAD_EDITS], ids=[c[0] for c in BAD_EDITS]
)
def test_bad_edits_file_is_refused_in_one_line(made, tmp_path, editor, digest, change, words):
    good = made(editor)
    path = rewrite(good.path, tmp_path / "edits.safetensors", change, digest)
    message = refused(lambda: load_edits(path, base_fingerprint=model_fingerprint(good.model)), str(path), *words)
    assert "restore it from a backup, or delete it and make its edits again" in message


def test_changed_byte_is_refused_quickly_and_digesting_180_mb_is_cheap(made, tmp_path):
    """One byte of u's data changed in place (no rewrite) is refused in well under a second; the digest of a
    statistics file of GPT-2 XL's size (6400² float32, 164 MB) takes a fraction of a second."""
    data = bytearray(made("rome").path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + 5] ^= 0x40  # a bit of the first tensor's data
    path = tmp_path / "edits.safetensors"
    path.write_bytes(bytes(data))
    start = time.perf_counter()
    refused(lambda: load_edits(path), str(path), CHECKSUM)
    assert time.perf_counter() - start < 1
    big = {"second_moment": torch.ones(6400, 6400)}
    start = time.perf_counter()
    tensors_digest(big)
    assert time.perf_counter() - start < 1


def test_file_without_checksum_still_loads_and_applies(made, tmp_path):
    """Files written before the checksum existed are read as before (and still checked for their content)."""
    good = made("rome")
    path = rewrite(good.path, tmp_path / "old.safetensors", digest=False)
    assert DIGEST_KEY not in read_safetensors(path)[1] and DIGEST_KEY in read_safetensors(good.path)[1]
    loaded, _ = load_edits(path, base_fingerprint=model_fingerprint(good.model))
    revert_edits(good.model, apply_edits(good.model, loaded))


# ---------------------------------------------------------------- applying: honest edits pass, changed ones are undone


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("editor", ["rome", "memit"])
def test_honest_edits_load_and_apply_to_the_weights_they_made(made, editor, dtype):
    """Edits the real code made (float32 or bfloat16 weights) pass every check and give the edited weights bit
    for bit; applied to weights of the other dtype (the fingerprint allows it) they pass too."""
    good = made(editor, dtype)
    model, before = good.model, weights(good.model)
    loaded, _ = load_edits(good.path, base_fingerprint=model_fingerprint(model))
    backup = apply_edits(model, loaded)
    assert all(torch.equal(get_module(model, name).weight, w) for name, w in good.edited.items())
    revert_edits(model, backup)
    assert bitwise_equal(model, before)
    other, _ = load_model("tiny_llama", dtype=DTYPES["bfloat16" if dtype == "float32" else "float32"])
    apply_edits(other, loaded)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("editor", ["rome", "memit"])
def test_edit_that_misses_its_target_is_refused_and_the_weights_stay_bitwise(made, tmp_path, editor, dtype):
    """A third of the last edit's u sign-flipped in a file without checksum: loading cannot tell, applying can.
    The edits before it in the same call (ROME: the same module; MEMIT: another layer) are undone bit for bit."""
    good = made(editor, dtype)
    last = len(good.edits) - 1
    path = rewrite(good.path, tmp_path / "edits.safetensors", lambda t, m: flip_third(t, f"edit.{last}.u"), False)
    loaded, _ = load_edits(path, base_fingerprint=model_fingerprint(good.model))
    before = weights(good.model)
    module = good.edits[last].module
    refused(lambda: apply_edits(good.model, loaded), f"edit {last} ({module}) {MISSES}", "left as they were")
    assert bitwise_equal(good.model, before)


def test_refused_edit_keeps_what_earlier_calls_applied_and_their_backup(made):
    """ROME's way: one apply_edits per edit with a shared backup. A bad call undoes only itself: the module keeps
    the edit of the earlier call (in the backup already), and revert_edits still restores the original weights."""
    good = made("rome")
    model, original = good.model, weights(good.model)
    first, second, third = good.edits
    bad = Edit(third.layer, third.module, -third.u, third.v, third.fact, third.info, third.key, third.target_value)
    backup = apply_edits(model, [first])
    kept, saved = weights(model), dict(backup)
    refused(lambda: apply_edits(model, [second, bad], backup), f"edit 1 ({bad.module}) {MISSES}")
    assert bitwise_equal(model, kept) and backup.keys() == saved.keys() and backup[first.module] is saved[first.module]
    revert_edits(model, backup)
    assert bitwise_equal(model, original)


@pytest.mark.parametrize("editor", ["rome", "memit"])
def test_edit_of_the_wrong_shape_is_refused_before_any_weight_changes(made, editor):
    """The shapes of all edits are checked first: a bad last edit never leaves the model half-edited."""
    good = made(editor)
    model, before = good.model, weights(good.model)
    last = good.edits[-1]
    wide = Edit(last.layer, last.module, torch.cat([last.u, last.u]), last.v, last.fact, last.info)
    backup = WeightBackup()
    refused(lambda: apply_edits(model, [*good.edits[:-1], wide], backup), "has shape", "belong to another model")
    assert bitwise_equal(model, before) and not backup


# ---------------------------------------------------------------- statistics files


@pytest.fixture
def stats_file(made, tmp_path):
    """A statistics file of tiny_llama layer 1 as precompute_stats writes it: C of random keys (float64 sums)."""
    model = made("rome").model
    module = "model.layers.1.mlp.down_proj"
    keys = torch.randn(2048, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    path = stats_path(tmp_path, "tiny_llama", module, "wiki_offline", 2048)
    write_result(path, keys.T @ keys, torch.tensor(2048), {"module": module, "fingerprint": model_fingerprint(model)})
    return model, path, tmp_path


def put(row, column, value):
    def change(tensors, metadata):
        tensors["second_moment"][row, column] = value

    return change


BAD_STATS = [
    ("huge-entry", True, put(0, 0, 1e30), CHECKSUM),
    ("asymmetric-entry", True, put(0, 1, 5.0), CHECKSUM),
    ("asymmetric-unchecked", False, put(0, 1, 5.0), "is not symmetric"),
    ("negative-diagonal", False, put(3, 3, -1.0), "has a negative diagonal entry (-1)"),
    ("nan", False, put(5, 7, float("nan")), "holds non-finite values"),
    ("not-square", False, lambda t, m: t.update(second_moment=t["second_moment"][:, :-1]), "a (128, 127) matrix"),
]


@pytest.mark.parametrize("digest, change, words", [case[1:] for case in BAD_STATS], ids=[c[0] for c in BAD_STATS])
def test_bad_statistics_file_is_refused_naming_the_command(stats_file, digest, change, words):
    model, path, stats_dir = stats_file
    honest = load_second_moment(model, 1, stats_dir=stats_dir)
    rewrite(path, path, change, digest)
    command = "`python src/precompute_stats.py model=tiny_llama layers=[1] data.max_tokens=2048 force=true`"
    refused(lambda: load_second_moment(model, 1, stats_dir=stats_dir), str(path), words, command)
    rewrite(path, path, lambda t, m: t.update(second_moment=honest), digest=False)  # an older file: no checksum
    assert torch.equal(load_second_moment(model, 1, stats_dir=stats_dir), honest)


# ---------------------------------------------------------------- the entry point


@pytest.fixture(scope="module")
def gpt2_edits(tmp_path_factory):
    """A ROME edit of tiny_gpt2 (float32, as src/edit.py loads it), saved as a run folder would hold it."""
    return _make("rome", "float32", tmp_path_factory.mktemp("gpt2"), name="tiny_gpt2").path


@pytest.mark.parametrize(
    "digest, overrides, words",
    [
        (True, [], CHECKSUM),  # refused when loaded
        (False, ["revert=true"], f"edit 0 (transformer.h.1.mlp.c_proj) {MISSES}"),  # refused when applied
    ],
    ids=["checksum", "target-missed"],
)
def test_edit_cli_refuses_a_changed_file_in_one_line(gpt2_edits, tmp_path, digest, overrides, words):
    path = rewrite(gpt2_edits, tmp_path / "edits.safetensors", lambda t, m: flip_third(t), digest)
    result = run_edit("model=tiny_gpt2", f"stats.dir={tmp_path}", f"resume={path}", *overrides, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and words in errors[0], result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in result.stderr

"""The app's endpoints, called as the page calls them (urllib, no browser), on the real SmolLM2 model."""

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from factedit import Edit, load_edits, model_fingerprint, save_edits
from factedit.app import App, serve_in_thread
from factedit.app.state import current_weights
from factedit.architectures import module_name
from factedit.cli import check_command
from factedit.errors import FacteditError
from factedit.io import tensors_digest
from factedit.probes import probe

EIFFEL = {"subject": "Eiffel Tower", "prompt": "{} is located in the city of"}


class Client:
    """GET and POST JSON against a running app; an error answer comes back as (status, payload) too."""

    def __init__(self, url: str):
        self.url = url

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=120) as response:
            return json.load(response)

    def post(self, path: str, body=None, raw: bytes | None = None) -> tuple[int, dict]:
        data = raw if raw is not None else json.dumps(body or {}).encode()
        request = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)


def app_config(tmp, *overrides):
    """The app's config as `python src/app.py` composes it, with small settings and folders under tmp.
    Key statistics are computed into tmp (few tokens), as a fresh clone has none."""
    return check_command("app", [f"stats.dir={tmp / 'stats'}", "stats.auto=true", "stats.auto_tokens=8192",
                                 f"checkpoints_dir={tmp / 'checkpoints'}", "trace.samples=2",
                                 "probe.max_new_tokens=4", *overrides])  # fmt: skip


@pytest.fixture(scope="module")
def served(smollm2, tmp_path_factory):
    model, tokenizer = smollm2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core machine: one thread is faster than two fighting
    app = App(app_config(tmp_path_factory.mktemp("app")), model, tokenizer)
    server, url = serve_in_thread(app)
    yield app, Client(url)
    server.shutdown()
    app.close()  # the session's model is shared: leave it unedited
    torch.set_num_threads(threads)


def top1(result: dict) -> str:
    return result["top"][0][0].strip()


def test_trace_returns_three_heatmaps_and_probabilities(served):
    app, client = served
    answers, seen_busy = [], []
    worker = threading.Thread(
        target=lambda: answers.append(client.post("/api/trace", {**EIFFEL, "target_true": "Paris"}))
    )
    worker.start()
    while worker.is_alive():  # progress and status answer while the trace holds the model
        seen_busy.append(client.get("/api/progress")["busy"])
        time.sleep(0.05)
    worker.join()
    status, result = answers[0]
    assert status == 200, result
    assert set(result["images"]) == {"hidden", "mlp", "attn"}
    assert all(image.startswith("data:image/png;base64,iVBOR") for image in result["images"].values())
    assert result["target"].strip() == "Paris" and result["clean_prob"] > result["corrupted_prob"]
    assert any(seen_busy) and not result["cached"]
    status, again = client.post("/api/trace", {**EIFFEL, "target_true": "Paris"})
    assert again["cached"] and again["clean_prob"] == result["clean_prob"]


def test_edit_undo_save_load_compare(served):
    app, client = served
    base, unedited_key = model_fingerprint(app.model), app.weights_key()
    status, edited = client.post("/api/edit", {**EIFFEL, "target_new": "Rome",
                                               "specificity": "The Louvre is located in the city of"})  # fmt: skip
    assert status == 200, edited
    row = edited["rows"][0]
    assert (top1(row["before"]), top1(row["after"])) == ("Paris", "Rome")
    assert [r["kind"] for r in edited["rows"]] == ["edit", "specificity"] and edited["v_steps"] >= 1
    assert "| Eiffel Tower is located in the city of | edit |" in edited["table"]
    assert [e["target_new"] for e in client.get("/api/history")["edits"]] == ["Rome"]
    assert app.weights_key() != unedited_key  # a trace of the edited model is never the cached unedited one

    status, compared = client.post("/api/compare", {"prompt": "The Eiffel Tower is located in the city of"})
    assert (top1(compared["unedited"]), top1(compared["edited"])) == ("Paris", "Rome")

    status, saved = client.post("/api/save", {"name": "eiffel"})
    assert status == 200 and saved["edits"] == 1
    edits, metadata = load_edits(app.checkpoints / "eiffel", base_fingerprint=base)
    assert len(edits) == 1 and metadata["model"] == "smollm2_135m"
    assert "eiffel" in client.get("/api/checkpoints")["checkpoints"]

    status, undone = client.post("/api/undo")
    assert status == 200 and undone["weights_exact"] and undone["logits_exact"] and undone["edits"] == 0
    assert model_fingerprint(app.model) == base and app.weights_key() == unedited_key

    status, loaded = client.post("/api/load", {"name": "eiffel"})
    assert status == 200 and loaded["count"] == 1
    status, compared = client.post("/api/compare", {"prompt": "Eiffel Tower is located in the city of"})
    assert top1(compared["edited"]) == "Rome"
    status, undone = client.post("/api/undo")
    assert undone["weights_exact"] and model_fingerprint(app.model) == base


def test_continuations_fill_the_table_exactly_while_two_tabs_queue(served):
    app, client = served
    louvre = "The Louvre is located in the city of"
    prompts = ["Eiffel Tower is located in the city of", louvre]
    unedited = probe(app.model, app.tokenizer, prompts, **app.cfg.probe)  # the edit command's probe, base weights
    status, edited = client.post("/api/edit", {**EIFFEL, "target_new": "Rome", "specificity": louvre})
    assert status == 200 and edited["id"] >= 1, edited
    assert all(row[side]["continuation"] is None for row in edited["rows"] for side in ("before", "after"))
    assert [row["before"]["top"] for row in edited["rows"]] == [r["top"] for r in unedited]
    after = probe(app.model, app.tokenizer, prompts, **app.cfg.probe)
    assert [row["after"]["top"] for row in edited["rows"]] == [r["top"] for r in after]
    key = app.weights_key()
    status, filled = client.post("/api/continuations", {"id": edited["id"]})
    assert status == 200 and app.weights_key() == key  # the edited weights are back, bit for bit
    assert filled["before"] == [r["continuation"] for r in unedited]
    assert filled["after"] == [r["continuation"] for r in after] and filled["before"] != filled["after"]

    # two tabs at once: another edit and the first edit's continuations; queued, never interleaved on the weights
    answers = {}
    tabs = {"edit": ("/api/edit", {"subject": "Colosseum", "prompt": "{} is located in the city of",
                                   "target_new": "Paris"}),
            "continuations": ("/api/continuations", {"id": edited["id"]})}  # fmt: skip
    send = lambda name, request: answers.__setitem__(name, client.post(*request))  # noqa: E731
    workers = [threading.Thread(target=send, args=item) for item in tabs.items()]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert answers["edit"][0] == 200 and answers["edit"][1]["id"] > edited["id"], answers["edit"]
    assert answers["continuations"] == (200, filled)  # the same text whichever ran first
    status, again = client.post("/api/continuations", {"id": edited["id"]})  # edit 2 swapped out and back in
    assert again == filled and len(app.history) == 2
    for _ in range(2):
        status, undone = client.post("/api/undo")
        assert status == 200 and undone["weights_exact"] and undone["logits_exact"], undone
    assert app.weights_key() != key and not app.history
    status, gone = client.post("/api/continuations", {"id": edited["id"]})  # undone: a message, no other text
    assert status == 400 and "is not applied any more" in gone["error"]
    assert [r["continuation"] for r in probe(app.model, app.tokenizer, prompts, **app.cfg.probe)] == filled["before"]


LONG = "The tower " * 150 + "{} is in"  # under the character cap, over the 256-token cap
BAD = [
    ("/api/continuations", {"id": 1}, "edit 1 is not applied any more"),
    ("/api/continuations", {}, "edit None is not applied any more"),
    ("/api/edit", {**EIFFEL, "subject": " ", "target_new": "Rome"}, "subject is empty"),
    ("/api/edit", {**EIFFEL, "target_new": ""}, "target_new is empty"),
    ("/api/edit", {**EIFFEL, "prompt": "Where is it?", "target_new": "Rome"}, "needs exactly one '{}'"),
    ("/api/edit", {**EIFFEL, "prompt": "{} is in {city}", "target_new": "Rome"}, "no other braces"),
    ("/api/edit", {**EIFFEL, "target_new": "Paris"}, "Paris"),  # the model already says it: the editor refuses
    ("/api/edit", {**EIFFEL, "prompt": LONG, "target_new": "Rome"}, "is longer than 256 tokens"),
    ("/api/edit", {**EIFFEL, "prompt": "x" * 3000, "target_new": "Rome"}, "keep it under 2000"),
    ("/api/trace", {**EIFFEL, "prompt": "no subject here"}, "needs exactly one '{}'"),
    ("/api/trace", {**EIFFEL, "target_true": "Berlin"}, "does not know this fact"),
    ("/api/save", {"name": "../elsewhere"}, "not a path"),
    ("/api/save", {"name": "a/b"}, "not a path"),
    ("/api/save", {"name": "fine"}, "nothing to save"),
    ("/api/undo", {}, "nothing to undo"),
    ("/api/load", {"name": "no_such_run"}, "no_such_run"),
    ("/api/load", {"name": "../../etc"}, "pick one of the listed"),
    ("/api/compare", {"prompt": ""}, "prompt is empty"),
]


@pytest.mark.parametrize("path, body, message", BAD, ids=[f"{p[5:]}-{i}" for i, (p, _, _) in enumerate(BAD)])
def test_bad_input_is_a_message_and_changes_nothing(served, path, body, message):
    app, client = served
    edited = [module_name(app.model, "rewrite", app.rome.layer)]  # the weights an edit would change, exactly
    before = model_fingerprint(app.model), tensors_digest(current_weights(app.model, edited))
    status, answer = client.post(path, body)
    assert status == 400 and message in answer["error"] and "Traceback" not in answer["error"], answer
    assert (model_fingerprint(app.model), tensors_digest(current_weights(app.model, edited))) == before
    assert client.get("/api/history")["edits"] == []
    assert not (app.checkpoints / "fine").exists() and not (app.checkpoints.parent / "elsewhere").exists()


def test_not_json_is_a_message(served):
    _, client = served
    assert client.post("/api/edit", raw=b"{not json") == (400, {"error": "the request is not JSON"})


def test_missing_statistics_name_the_command(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    cfg = check_command("app", ["model=tiny_llama", f"stats.dir={tmp_path}", f"checkpoints_dir={tmp_path}"])
    server, url = serve_in_thread(App(cfg, model, tokenizer))
    try:
        status, answer = Client(url).post("/api/edit", {**EIFFEL, "target_new": "Rome"})
    finally:
        server.shutdown()
    assert status == 400 and "python src/precompute_stats.py model=tiny_llama layers=[1]" in answer["error"]


@pytest.mark.parametrize(
    "override, message",
    [("port=0", "port=0: must be an integer between 1 and 65535"), ("port=http", "port=http: must be an integer"),
     ("host=null", "host=None: must be a non-empty string")],
)  # fmt: skip
def test_bad_options_are_one_line(override, message):
    with pytest.raises(FacteditError) as caught:
        check_command("app", [override])
    assert message in str(caught.value)


def test_edits_of_another_model_are_refused_and_change_nothing(served):
    app, client = served
    module = module_name(app.model, "rewrite", app.rome.layer)
    weight = app.model.get_submodule(module).weight
    fake = Edit(app.rome.layer, module, torch.ones(weight.shape[1]), torch.ones(weight.shape[0]), fact=EIFFEL)
    save_edits(app.checkpoints / "other" / "edits.safetensors", [fake], base_fingerprint="0" * 16, model_name="gpt2")
    before = tensors_digest(current_weights(app.model, [module]))
    status, answer = client.post("/api/load", {"name": "other"})
    assert status == 400 and "was made for model gpt2" in answer["error"], answer
    assert tensors_digest(current_weights(app.model, [module])) == before and app.history == []

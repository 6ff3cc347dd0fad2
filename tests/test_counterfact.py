"""CounterFact records: both published formats from the real files, validation of bad input, sharding."""

import json

import pytest
from torch.utils.data import DistributedSampler

from factedit import FacteditError
from factedit.data.counterfact import DEV_FILE, FULL_URL, NO_RELATION, CounterFactDataModule, load_records, relations_of

EASYEDIT_FILE = DEV_FILE.parent / "counterfact-edit.json"


def test_dev_file_loads_every_record_with_rome_fields():
    records, skipped = load_records(DEV_FILE)
    assert len(records) == 402 and skipped == []
    first = records[0]
    raw = json.loads(DEV_FILE.read_text())[0]
    assert first.case_id == raw["case_id"] and first.text == raw["requested_rewrite"]["prompt"].format(first.subject)
    assert (first.target_new, first.target_true) == (
        raw["requested_rewrite"]["target_new"]["str"],
        raw["requested_rewrite"]["target_true"]["str"],
    )
    assert all(
        len(r.paraphrase_prompts) == 2
        and len(r.neighborhood_prompts) == 10
        and len(r.attribute_prompts) == 10
        and len(r.generation_prompts) == 10
        for r in records
    )
    assert all(r.neighborhood_target == r.target_true for r in records)
    relations = relations_of(records)
    assert relations == sorted(relations) and "P17" in relations and NO_RELATION not in relations
    assert len(load_records(DEV_FILE, limit=7)[0]) == 7


def test_easyedit_format_agrees_with_the_original_records():
    records, skipped = load_records(EASYEDIT_FILE)
    assert len(records) == 9926 and skipped == []
    raw = {item["case_id"]: item for item in json.loads(EASYEDIT_FILE.read_text())}
    original = {r.case_id: r for r in load_records(DEV_FILE)[0]}
    shared = sorted(set(original) & {r.case_id for r in records})
    assert len(shared) > 50
    by_id = {r.case_id: r for r in records}
    for case_id in shared:
        easy, orig = by_id[case_id], original[case_id]
        assert easy.text == raw[case_id]["prompt"] == orig.text  # the subject goes back where "{}" was
        assert (easy.subject, easy.target_new, easy.target_true) == (orig.subject, orig.target_new, orig.target_true)
        assert easy.neighborhood_prompts[0] in orig.neighborhood_prompts
        assert easy.relation_id == NO_RELATION and easy.generation_prompts == [] and len(easy.paraphrase_prompts) == 1


def _original(case_id, **changes):
    record = {
        "case_id": case_id,
        "requested_rewrite": {
            "prompt": "{} is located in",
            "subject": f"Place {case_id}",
            "relation_id": "P131",
            "target_new": {"str": "Rome"},
            "target_true": {"str": "Paris"},
        },
        "paraphrase_prompts": [f"Place {case_id} lies in"],
        "neighborhood_prompts": ["The Louvre is in"],
    }
    for key, value in changes.items():
        target = record["requested_rewrite"] if key in record["requested_rewrite"] else record
        if value is None:
            del target[key]
        else:
            target[key] = value
    return record


def test_malformed_records_are_skipped_with_their_case_id(tmp_path):
    items = [
        _original(1),
        _original(2, target_new={"str": 7}),  # target not a string
        _original(3, prompt="Where is it located?"),  # subject absent from the prompt
        _original(4, paraphrase_prompts=None),  # missing field
        _original(1),  # repeated case_id
        {
            "case_id": 5,
            "prompt": "The tower is in",
            "subject": "Eiffel Tower",
            "target_new": "Rome",
            "ground_truth": "Paris",
            "rephrase_prompt": "x",
            "locality_prompt": "y",
        },  # EasyEdit, subject absent
        {"prompt": "no id"},  # no case_id
        "not a record",
        _original(6, target_true={"str": "Rome"}),  # nothing to edit
        _original(7),
    ]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(items))
    records, skipped = load_records(path)
    assert [r.case_id for r in records] == [1, 7]
    reasons = {s.case_id: s.reason for s in skipped}
    assert list(reasons) == ["2", "3", "4", "1", "5", "#6", "#7", "6"]
    assert "must be a string" in reasons["2"] and "absent" in reasons["3"] and "paraphrase_prompts" in reasons["4"]
    assert "repeats" in reasons["1"] and "absent from prompt" in reasons["5"] and "case_id" in reasons["#6"]
    assert "equals target_true" in reasons["6"]


def test_missing_or_unreadable_files_are_one_line_errors(tmp_path):
    with pytest.raises(FacteditError, match="does not exist"):
        load_records(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(FacteditError, match="cannot read CounterFact file"):
        load_records(tmp_path / "x.json")


def test_full_file_comes_from_the_public_url_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    cached = tmp_path / "counterfact" / FULL_URL.rsplit("/", 1)[-1]
    cached.parent.mkdir()
    cached.write_text(json.dumps([_original(11), _original(12)]))  # as if downloaded before: no network needed
    records, _ = load_records("full")
    assert [r.case_id for r in records] == [11, 12]


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_sampler_shards_cover_each_record_once(world):
    records, _ = load_records(DEV_FILE, limit=7)
    datamodule = CounterFactDataModule(records, done={records[0].case_id})
    assert len(datamodule.records) == 6
    seen = []
    for rank in range(world):
        sampler = DistributedSampler(datamodule.records, num_replicas=world, rank=rank, shuffle=False)
        for batch_idx, index in enumerate(sampler):
            if not datamodule.is_padding(batch_idx, rank, world):
                seen.append(datamodule.records[index].case_id)
    assert sorted(seen) == sorted(r.case_id for r in records[1:])

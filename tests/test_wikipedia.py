"""WikipediaDataModule: sources, EOS-joined packing without padding, seeds, rank sharding, bad input."""

import pytest
import torch

import factedit.data.wikipedia as wikipedia
from factedit import FacteditError, load_model
from factedit.data import PackedRows, WikipediaDataModule
from factedit.data.wikipedia import documents_of, pack_rows, token_chunks


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("tiny_llama")[1]


def test_offline_and_wikitext_sources_give_shuffled_articles():
    offline = documents_of("wiki_offline", seed=0)
    assert len(offline) > 9_000 and all(doc.strip() for doc in offline)
    assert offline == documents_of("wiki_offline", seed=0)
    assert offline != documents_of("wiki_offline", seed=1) and sorted(offline) == sorted(
        documents_of("wiki_offline", seed=1)
    )
    wikitext = documents_of("wikitext", seed=0)
    assert len(wikitext) > 50
    assert any(doc.startswith("Robert Boulter\n") for doc in wikitext)
    assert not any(" @-@ " in doc or "\n = " in doc.split("\n", 1)[0] for doc in wikitext)


def test_rows_are_the_eos_joined_token_stream_cut_without_padding(tokenizer):
    documents = ["The Eiffel Tower is in Paris.", "Rome is the capital of Italy.", "Short."] * 5
    stream = [t for ids in token_chunks(tokenizer, documents, docs_per_call=2) for t in ids]
    expected = [
        t for doc in documents for t in tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ]
    assert stream == expected
    rows = list(pack_rows(token_chunks(tokenizer, documents), seq_len=7))
    assert len(rows) == len(expected) // 7 and all(row.shape == (7,) for row in rows)
    assert torch.cat(rows).tolist() == expected[: len(rows) * 7]


def test_datamodule_budget_order_and_seed(tokenizer):
    module = WikipediaDataModule(tokenizer, "wiki_offline", max_tokens=5_000, seq_len=64, batch_size=4, seed=0)
    assert module.num_rows == 5_000 // 64 and module.num_tokens == module.num_rows * 64
    batches = list(module.predict_dataloader())
    input_ids = torch.cat([b["input_ids"] for b in batches])
    assert input_ids.shape == (module.num_rows, 64)
    assert torch.cat([b["row"] for b in batches]).tolist() == list(range(module.num_rows))
    documents = documents_of("wiki_offline", seed=0)
    first_doc = tokenizer(documents[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert input_ids.reshape(-1)[: len(first_doc)].tolist() == first_doc[: 64 * module.num_rows]
    again = WikipediaDataModule(tokenizer, "wiki_offline", max_tokens=5_000, seq_len=64, seed=0)
    other = WikipediaDataModule(tokenizer, "wiki_offline", max_tokens=5_000, seq_len=64, seed=1)
    assert torch.equal(again.local_rows, module.local_rows) and not torch.equal(other.local_rows, module.local_rows)


@pytest.mark.parametrize("world_size,skip_rows", [(1, 0), (2, 0), (3, 4), (2, 5), (4, 9)])
def test_ranks_share_rows_exactly_once_and_run_equal_batches(world_size, skip_rows):
    rows = [torch.full((3,), i) for i in range(10)]
    shares = [list(PackedRows(lambda: iter(rows), 10, 3, skip_rows, rank, world_size)) for rank in range(world_size)]
    assert len({len(share) for share in shares}) == 1
    assert all(len(share) == len(PackedRows(lambda: iter(rows), 10, 3, skip_rows, 0, world_size)) for share in shares)
    seen = sorted(item["row"] for share in shares for item in share if item["row"] >= 0)
    assert seen == list(range(skip_rows, 10))
    assert all(int(item["input_ids"][0]) == item["row"] for share in shares for item in share if item["row"] >= 0)
    padding = [item for share in shares for item in share if item["row"] < 0]
    assert len(padding) == len(shares) * len(shares[0]) - (10 - skip_rows)


def test_streamed_source_packs_on_the_fly(tokenizer, monkeypatch):
    class FakeStream:  # stands in for datasets' IterableDataset (no network here)
        def shuffle(self, seed, buffer_size):
            return iter([{"text": f"Article {seed} number {i} about a city."} for i in range(200)])

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: FakeStream())
    module = WikipediaDataModule(tokenizer, "wikipedia", max_tokens=300, seq_len=32, batch_size=2, seed=7)
    assert module.num_rows == 300 // 32
    input_ids = torch.cat([b["input_ids"] for b in module.predict_dataloader()])
    assert input_ids.shape == (9, 32)
    assert tokenizer.decode(input_ids[0]).startswith("Article 7 number 0")


def test_bad_input_is_one_clear_error(tokenizer, monkeypatch):
    with pytest.raises(FacteditError, match="unknown source 'wikinews'.*wiki_offline"):
        WikipediaDataModule(tokenizer, "wikinews")
    with pytest.raises(FacteditError, match="less than one row"):
        WikipediaDataModule(tokenizer, "wiki_offline", max_tokens=10, seq_len=64)
    with pytest.raises(FacteditError, match="set data.max_tokens"):
        WikipediaDataModule(tokenizer, "wikipedia", max_tokens=None)
    monkeypatch.setitem(wikipedia.SOURCES, "wiki_offline", lambda seed: ["", "  "])
    with pytest.raises(FacteditError, match="fewer than one row"):
        _ = WikipediaDataModule(tokenizer, "wiki_offline", seq_len=64).num_rows

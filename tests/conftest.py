"""Shared fixtures: real models are loaded once per session (from the user cache after the first time)."""

import logging

import pytest
import torch

from factedit import load_model

for name in ("lightning", "lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "transformers"):
    logging.getLogger(name).setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2_135m")


@pytest.fixture(scope="session")
def tiny_llama():
    return load_model("tiny_llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    return load_model("tiny_gpt2")


@pytest.fixture
def tiny_llama64():
    """A fresh float64 tiny Llama (tests may edit it)."""
    return load_model("tiny_llama", dtype=torch.float64)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: ops too small to share between threads (on a busy 2-core machine 2 threads are 20x slower).
    A module uses it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def zsre_items() -> list[dict]:
    """Two hand-made zsRE items, the first with a portability question, the second without."""
    return [
        {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "alt": "unmanned aircraft",
         "answers": ["uniform"], "rephrase": "What will be the product of UniFirst?", "loc": "nq question: who sang",
         "loc_ans": "Walter Sobchak",
         "portability": {"New Question": "What flies for UniFirst?", "New Answer": "drones"}},
        {"subject": "Danny Green", "src": "Which team does Danny Green play for?", "alt": "Toronto Raptors",
         "answers": ["Spurs"], "rephrase": "Danny Green plays for which team?",
         "loc": "nq question: where is", "loc_ans": "Paris"},
    ]  # fmt: skip

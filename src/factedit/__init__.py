"""factedit: locate and edit factual associations in GPT-style language models (ROME)."""

from factedit.errors import FacteditError
from factedit.models import load_model, model_fingerprint
from factedit.rome import Edit, Fact, apply_edits, edit, load_edits, revert_edits, save_edits

__all__ = [
    "Edit",
    "FacteditError",
    "Fact",
    "apply_edits",
    "edit",
    "load_edits",
    "load_model",
    "model_fingerprint",
    "revert_edits",
    "save_edits",
]

"""factedit: locate and edit factual associations in GPT-style language models (ROME)."""
from factedit.errors import FacteditError
from factedit.models import load_model, model_fingerprint

__all__ = ["FacteditError", "load_model", "model_fingerprint"]

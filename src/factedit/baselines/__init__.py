"""Baselines ROME is compared against: FT / FT-L (ft.py) and attention edits at a late layer (attn_late.py)."""

from factedit.baselines.attn_late import attention_second_moment, attn_late_hparams, identity_second_moment, late_layer
from factedit.baselines.ft import fine_tune

__all__ = ["attention_second_moment", "attn_late_hparams", "fine_tune", "identity_second_moment", "late_layer"]

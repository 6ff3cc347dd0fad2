"""ROME: Rank-One Model Editing (Meng et al., 2022), one file per step (rome.py reads them in order)."""

from factedit.rome.edits import Edit, Edits, WeightBackup, apply_edits, facts_of, load_edits, revert_edits, save_edits
from factedit.rome.facts import Fact, fact_from_config, load_facts
from factedit.rome.fast.step_graph import release_graphs
from factedit.rome.hparams import MemitHparams, RomeHparams, register_configs, resolve_hparams
from factedit.rome.rome import edit

__all__ = [
    "MemitHparams",
    "facts_of",
    "Edit",
    "Edits",
    "Fact",
    "RomeHparams",
    "WeightBackup",
    "apply_edits",
    "edit",
    "fact_from_config",
    "load_edits",
    "load_facts",
    "register_configs",
    "release_graphs",
    "resolve_hparams",
    "revert_edits",
    "save_edits",
]

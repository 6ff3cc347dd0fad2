"""ROME: Rank-One Model Editing (Meng et al., 2022), one file per step."""
from factedit.rome.edits import Edit, WeightBackup, apply_edits, load_edits, revert_edits, save_edits
from factedit.rome.facts import Fact, fact_from_config, load_facts
from factedit.rome.rome import Edits, edit, resolve_hparams
from factedit.rome.step_graph import release_graphs

__all__ = ["Edit", "Edits", "Fact", "WeightBackup", "apply_edits", "edit", "fact_from_config", "load_edits",
           "load_facts", "release_graphs", "resolve_hparams", "revert_edits", "save_edits"]

"""Where the project's folders and the user cache live."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"
STATS_DIR = REPO_ROOT / "stats"
CHECKPOINT_DIR = REPO_ROOT / "checkpoints"
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


def cache_dir() -> Path:
    """User cache for dequantized weights and generated context templates ($FACTEDIT_CACHE)."""
    root = (
        os.environ.get("FACTEDIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "factedit"
    )
    return Path(root)

"""Helpers shared by the thin entry scripts: readable logging and a pretty config echo."""

import logging
import warnings

import torch
from omegaconf import DictConfig, OmegaConf


def setup(cfg: DictConfig) -> None:
    """Quiet the libraries' chatter, seed everything, log the composed config (in full at debug level;
    Hydra also saves it under logs/<task>/runs/<time>/.hydra/)."""
    import lightning

    for name in ("transformers", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    quiet_warnings()
    lightning.seed_everything(int(cfg.get("seed", 0)), verbose=False)
    torch.set_float32_matmul_precision("high")
    logging.getLogger("factedit").debug("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))


def quiet_warnings() -> None:
    """Library warnings that say nothing to a factedit user (the frozen model is in eval mode on purpose)."""
    for pattern in (
        ".*LeafSpec.*",
        ".*module\\(s\\) in eval mode.*",
        ".*does not have many workers.*",
        ".*GPU available but not used.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)

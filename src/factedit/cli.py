"""Helpers shared by the thin entry scripts: readable logging and a pretty config echo."""
import logging

import torch
from omegaconf import DictConfig, OmegaConf


def setup(cfg: DictConfig) -> None:
    """Quiet the libraries' chatter, seed everything, log the composed config."""
    import lightning

    for name in ("transformers", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    lightning.seed_everything(int(cfg.get("seed", 0)), verbose=False)
    torch.set_float32_matmul_precision("high")
    logging.getLogger("factedit").info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))

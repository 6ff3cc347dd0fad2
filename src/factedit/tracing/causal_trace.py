"""Causal tracing (ROME §2.1): corrupt the subject, restore states one at a time, score the true object.

Three kinds of run on one prompt of T tokens through a model of L decoder layers:
  clean      the prompt as is; every hidden state (decoder layer output), MLP output and attention
             output is kept: (L, T, d_model) each.
  corrupted  the subject's token embeddings get Gaussian noise (or are swapped for other tokens), in
             `samples` rows of one batch.
  restored   a corrupted run in which one hidden state (layer l, token t), or the MLP / attention
             outputs of a window of layers at token t, take their clean values.
Score = P(first token of the true object) at the last position, averaged over the samples.

Restorations are batched: a row is one (cell, sample), a hook patches each row at its own token, and
many rows share one replay of the decoder layers (called with the arguments the model gave them in
the clean run: rotary tables, masks). Three shortcuts skip work whose result is known exactly:
  * below its first restored layer a row equals the corrupted run, so it joins the batch there, from
    the corrupted residual stream (kept per layer);
  * positions before the restored token equal the corrupted run at every layer, so the rows restoring
    token t compute positions t..T-1 only, attending to the corrupted run's keys/values before t;
  * tokens before the subject are the same in clean and corrupted runs: restoring them changes
    nothing, so their cells get the corrupted score without a forward.
`reference_restored_probability` is the slow reference, one full forward per cell as ROME's trace_with_patch.
"""

import inspect
import logging
import time
from dataclasses import asdict, dataclass, field

import torch

from factedit.architectures import architecture_of, get_module, module_name, num_layers, unembed
from factedit.errors import FacteditError
from factedit.hooks import (
    PrefixCache,
    Trace,
    as_attention_mask,
    attention_mask_kind,
    cache_parameter,
    hidden_of,
    prefix_causal_mask,
)
from factedit.tokens import fill_prompt, subject_token_range, target_token_ids

log = logging.getLogger(__name__)
KINDS = ("hidden", "mlp", "attn")
ROLE = {"hidden": "layer", "mlp": "mlp", "attn": "attn"}
CORRUPTIONS = ("noise", "replace")


# ---------------------------------------------------------------- the fact as tokens


@dataclass
class TracePrompt:
    """A prompt ready to trace: its tokens, where the subject is, which token is scored."""

    text: str
    input_ids: torch.Tensor  # (1, T)
    subject_range: tuple[int, int]  # [start, end) token indices
    target_id: int | None  # first token of " " + target_true; None: the clean top prediction
    tokens: list[str]


def encode_prompt(tokenizer, prompt: str, subject: str, target_true: str | None = None) -> TracePrompt:
    text = fill_prompt(prompt, subject)
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    target_id = None
    if target_true is not None and str(target_true).strip():
        target_id = target_token_ids(tokenizer, str(target_true).strip())[0]
    tokens = [tokenizer.decode([i]) for i in input_ids[0].tolist()]
    return TracePrompt(
        text, input_ids, subject_token_range(tokenizer, text, subject, text.find(subject)), target_id, tokens
    )


# ---------------------------------------------------------------- corruption


@torch.no_grad()
def embedding_std(model, tokenizer, texts: list[str] | None = None) -> float:
    """Std of the embedding module's outputs over the tokens of `texts` (ROME: the subjects), or over
    the whole vocabulary when `texts` is None. Measured on the module's output, so a model that scales
    its embeddings (Gemma: × sqrt(d_model)) gets noise on the same scale as what its layers see."""
    embed = get_module(model, module_name(model, "embed"))
    if texts:
        ids = [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
        chunks = torch.tensor(ids, device=model.device).split(8192)
    else:
        chunks = torch.arange(embed.weight.shape[0], device=model.device).split(8192)
    total = total_sq = count = 0.0
    for chunk in chunks:
        values = embed(chunk[None]).double()
        total, total_sq, count = total + values.sum(), total_sq + values.square().sum(), count + values.numel()
    mean = total / count
    return float(((total_sq - count * mean**2) / (count - 1)).sqrt())


@torch.no_grad()
def corrupted_subject_embeddings(
    model,
    prompt: TracePrompt,
    samples: int,
    corruption: str = "noise",
    noise_std: float = 0.1,
    replacement_ids: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """What the embedding output holds at the subject in each corrupted sample: (samples, n_subject, d_model).

    noise:   clean embeddings + N(0, noise_std²) per coordinate (ROME's corruption).
    replace: embeddings of tokens drawn at random from `replacement_ids` (the subject swapped for others).
    """
    start, end = prompt.subject_range
    embed = get_module(model, module_name(model, "embed"))
    clean = embed(prompt.input_ids.to(model.device))[0, start:end]  # (n_subject, d_model)
    generator = torch.Generator().manual_seed(seed)
    if corruption == "noise":
        noise = torch.randn((samples, *clean.shape), generator=generator) * noise_std
        return clean + noise.to(device=clean.device, dtype=clean.dtype)
    if corruption == "replace":
        if replacement_ids is None or len(replacement_ids) == 0:
            raise FacteditError("corruption=replace needs replacement tokens (a text sample to draw them from)")
        picks = torch.randint(len(replacement_ids), (samples, end - start), generator=generator)
        return embed(replacement_ids.cpu()[picks].to(model.device))
    raise FacteditError(f"unknown corruption {corruption!r}: use one of {', '.join(CORRUPTIONS)}")


def _corrupt_rows(hidden: torch.Tensor, subject_range, subject_embeds: torch.Tensor, first_row: int = 0):
    """hidden (B, T, d) with rows first_row.. holding the corrupted subject embeddings (one sample each)."""
    start, end = subject_range
    hidden = hidden.clone()
    hidden[first_row:, start:end] = subject_embeds.to(hidden.dtype)
    return hidden


# ---------------------------------------------------------------- replaying decoder layers

_PER_POSITION = ("position_embeddings", "position_ids", "cache_position", "attention_mask")


@dataclass
class LayerCalls:
    """What the model passed each decoder layer besides the hidden state, by parameter name, in the
    clean run (batch 1). Replayed on any number of rows; cut to the queries of positions first..T-1.

    cache_arg: the layer's cache parameter ("cache" in transformers 5), None when the arguments can't
    be cut (then runs always compute every position). mask_kind: "bool" (sdpa) or "additive" (eager).
    """

    kwargs: list[dict]
    n_tokens: int
    cache_arg: str | None
    mask_kind: str | None

    @property
    def can_skip_prefix(self) -> bool:
        return self.cache_arg is not None and self.mask_kind is not None

    def call(self, layer: int, first: int = 0, cache=None, device=None, dtype=None) -> dict:
        kwargs = dict(self.kwargs[layer])
        if cache is not None:
            kwargs[self.cache_arg] = cache
        if first == 0:
            return kwargs
        for name, value in kwargs.items():
            if name == "position_embeddings":
                kwargs[name] = tuple(table[..., first:, :] for table in value)
            elif name in ("position_ids", "cache_position"):
                kwargs[name] = value[..., first:]
        mask = kwargs.get("attention_mask")
        kwargs["attention_mask"] = self._causal_mask(first, device, dtype) if mask is None else mask[..., first:, :]
        return kwargs

    def _causal_mask(self, first: int, device, dtype) -> torch.Tensor:
        """(1, 1, T - first, T): the query at position first + i sees keys 0..first + i."""
        allowed = prefix_causal_mask(torch.tensor([first], device=device), first, self.n_tokens - first)
        return as_attention_mask(allowed, self.mask_kind, dtype)


def _bind_layer_call(module, args, kwargs) -> dict:
    """The call's arguments by name, without the hidden state (the first parameter)."""
    signature = inspect.signature(module.forward)
    bound = signature.bind(*args, **kwargs).arguments
    hidden_name = next(iter(signature.parameters))
    named = {}
    for name, value in bound.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif name != hidden_name:
            named[name] = value
    return named


def _layer_calls(model, kwargs: list[dict], n_tokens: int) -> LayerCalls:
    layer = get_module(model, module_name(model, "layer", 0))
    cache_arg = cache_parameter(layer.forward)
    cuttable = all(
        name in _PER_POSITION
        for call in kwargs
        for name, value in call.items()
        if torch.is_tensor(value) or (isinstance(value, tuple) and value and torch.is_tensor(value[0]))
    )
    window = getattr(model.config, "sliding_window", None)
    if not cuttable or (window is not None and n_tokens > window):
        cache_arg = None
    return LayerCalls(kwargs, n_tokens, cache_arg, attention_mask_kind(model))


def run_layers(
    model,
    calls: LayerCalls,
    hidden: torch.Tensor | None,
    start: int,
    first: int = 0,
    cache=None,
    residual: list | None = None,
    joins: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Replay decoder layers start..L-1 and the head; next-token probabilities at the last position (B, V).

    hidden: (B, T - first, d), the input of layer `start` at positions first..T-1 (None: rows come from
    `joins`); `cache` supplies the keys/values of positions before `first`. joins[i]: rows appended to
    the batch before layer i (i = L: before the head). residual: if a list, gets the input of each layer
    and of the final norm.
    """
    layers = get_module(model, architecture_of(model).layers)
    for index in range(start, len(layers) + 1):
        if joins and index in joins:
            hidden = joins[index] if hidden is None else torch.cat([hidden, joins[index]])
        if residual is not None:
            residual.append(hidden)
        if index < len(layers):
            kwargs = calls.call(index, first, cache, hidden.device, hidden.dtype)
            hidden = hidden_of(layers[index](hidden, **kwargs))
    return last_token_probs(model, hidden)


# ---------------------------------------------------------------- clean and corrupted runs


@dataclass
class CleanRun:
    states: dict[str, torch.Tensor]  # kind -> (L, T, d_model): layer outputs, MLP outputs, attention outputs
    calls: LayerCalls
    probs: torch.Tensor  # (V,) next-token distribution at the last position


@dataclass
class CorruptedRun:
    residual: torch.Tensor  # (L + 1, samples, T, d_model): input of each decoder layer, then of the final norm
    keys: dict[int, torch.Tensor]  # layer -> (samples, kv_heads, T, head_dim), as attention saw them
    values: dict[int, torch.Tensor]
    probs: torch.Tensor  # (samples, V)


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def last_token_probs(model, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token probabilities from final-layer hidden states (B, T, d) at the last position: (B, V)."""
    normed = get_module(model, module_name(model, "final_norm"))(hidden[:, -1].contiguous())
    return unembed(model, normed, at_least_float32=True).softmax(dim=-1)


def _layer_names(model, kind: str) -> list[str]:
    return [module_name(model, ROLE[kind], layer) for layer in range(num_layers(model))]


@torch.no_grad()
def clean_run(model, prompt: TracePrompt, kinds=KINDS) -> CleanRun:
    """One forward of the prompt (batch 1) keeping every state that restorations copy and every layer's call."""
    input_ids = prompt.input_ids.to(model.device)
    names = {kind: _layer_names(model, kind) for kind in set(kinds) | {"hidden"}}
    kwargs: list = [None] * num_layers(model)

    def keep_call(index):
        def hook(module, args, call_kwargs):
            kwargs[index] = _bind_layer_call(module, args, call_kwargs)

        return hook

    layers = [get_module(model, name) for name in names["hidden"]]
    handles = [layer.register_forward_pre_hook(keep_call(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with Trace(model, [n for kind_names in names.values() for n in kind_names]) as trace:
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    states = {kind: torch.stack([trace[n].output[0] for n in kind_names]) for kind, kind_names in names.items()}
    calls = _layer_calls(model, kwargs, input_ids.shape[1])
    return CleanRun(states, calls, last_token_probs(model, states["hidden"][-1:])[0])


@torch.no_grad()
def corrupted_run(model, prompt: TracePrompt, subject_embeds: torch.Tensor, calls: LayerCalls) -> CorruptedRun:
    """`samples` corrupted rows in one batch, keeping the residual stream entering each layer and the
    attention keys/values (the model runs as far as layer 0's input, then its layers are replayed)."""
    samples = subject_embeds.shape[0]
    input_ids = prompt.input_ids.to(model.device).expand(samples, -1)
    embed, first_layer = module_name(model, "embed"), module_name(model, "layer", 0)

    def corrupt(name, hidden):
        return _corrupt_rows(hidden, prompt.subject_range, subject_embeds) if name == embed else hidden

    with Trace(
        model, [embed, first_layer], retain_input=True, retain_output=False, edit_output=corrupt, stop=True
    ) as trace:
        model(input_ids=input_ids, use_cache=False)
    recorder, residual = PrefixCache(record=True), []
    probs = run_layers(model, calls, trace[first_layer].input, 0, cache=recorder, residual=residual)
    return CorruptedRun(torch.stack(residual), recorder.computed_keys, recorder.computed_values, probs)


# ---------------------------------------------------------------- restorations, batched


@dataclass(frozen=True)
class Cell:
    """One restoration: token `token`, states of layers [first, last) of one kind; grid cell (token, layer)."""

    layer: int
    token: int
    first: int
    last: int


def window_layers(layer: int, window: int, n_layers: int) -> tuple[int, int]:
    """[first, last) of the window of `window` layers centred on `layer` (ROME's convention)."""
    return max(0, layer - window // 2), min(n_layers, layer - (-window // 2))


def grid_cells(kind: str, n_tokens: int, n_layers: int, window: int, first_token: int = 0) -> list[Cell]:
    """Cells of one heatmap, tokens first_token..T-1 × layers; a hidden state is a window of one."""
    cells = []
    for token in range(first_token, n_tokens):
        for layer in range(n_layers):
            first, last = (layer, layer + 1) if kind == "hidden" else window_layers(layer, window, n_layers)
            cells.append(Cell(layer, token, first, last))
    return cells


def _start_layer(kind: str, cell: Cell, shortcuts: bool) -> int:
    """Where a restored run leaves the corrupted one: after a restored layer output, at a restored block."""
    if not shortcuts:
        return 0
    return cell.first + 1 if kind == "hidden" else cell.first


@torch.no_grad()
def _restore_rows(
    model,
    clean: CleanRun,
    corrupted: CorruptedRun,
    kind: str,
    rows: list[tuple[Cell, int]],
    first: int,
    target_id: int,
    shortcuts: bool,
) -> torch.Tensor:
    """P(target) for rows (cell, sample) in one replay over positions first..T-1: (len(rows),).

    Rows are sorted by start layer and join the batch there, from the corrupted residual stream;
    positions before `first` (<= every row's token) come from the corrupted run's keys/values.
    """
    device = model.device
    starts = [_start_layer(kind, cell, shortcuts) for cell, _ in rows]
    tokens = torch.tensor([cell.token for cell, _ in rows], device=device)
    samples = torch.tensor([sample for _, sample in rows], device=device)
    columns = tokens - first
    states = clean.states[kind]
    joins = {}
    for start in sorted(set(starts)):
        begin, end = starts.index(start), len(starts) - starts[::-1].index(start)
        hidden = corrupted.residual[start][samples[begin:end]][:, first:]  # (rows, T - first, d), a copy
        if kind == "hidden" and shortcuts:  # the restored layer output (start - 1) is this input
            restored = states[start - 1][tokens[begin:end]].to(hidden.dtype)
            hidden[torch.arange(end - begin), columns[begin:end]] = restored
        joins[start] = hidden
    patches = {}  # module name -> (rows, columns, clean values) restored in its output
    for layer in range(starts[0], num_layers(model)):
        chosen = [i for i, (cell, _) in enumerate(rows) if starts[i] <= layer and cell.first <= layer < cell.last]
        if chosen:
            chosen = torch.tensor(chosen, device=device)
            patches[module_name(model, ROLE[kind], layer)] = (chosen, columns[chosen], states[layer][tokens[chosen]])

    def restore(name, output):
        chosen, at, values = patches[name]
        return output.index_put((chosen, at), values.to(output.dtype))

    cache = None
    if first > 0:  # the corrupted run's keys/values of positions 0..first-1, each row's sample
        prefix = [
            {layer: kv[:, :, :first] for layer, kv in computed.items()}
            for computed in (corrupted.keys, corrupted.values)
        ]
        cache = PrefixCache(*prefix, rows=samples)
    with Trace(model, list(patches), retain_output=False, edit_output=restore):
        return run_layers(model, clean.calls, None, starts[0], first, cache, joins=joins)[:, target_id]


def restored_grid(
    model,
    clean: CleanRun,
    corrupted: CorruptedRun,
    kind: str,
    prompt: TracePrompt,
    target_id: int,
    window: int = 10,
    batch_size: int = 256,
    shortcuts: bool = True,
    only: set[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Scores of every restoration of one kind: (T, L), P(target) averaged over samples.

    Rows (cell × sample) restoring the same token share a replay of at most `batch_size` rows over
    positions token..T-1, each row joining at its first restored layer. shortcuts=False runs every row
    from layer 0 over all positions, all tokens together (for benchmarks; same numbers). only: trace
    just these (token, layer) cells; the others keep the corrupted score.
    """
    n_tokens, n_layers = prompt.input_ids.shape[1], num_layers(model)
    samples = corrupted.residual.shape[1]
    grid = torch.full((n_tokens, n_layers), float(corrupted.probs[:, target_id].mean()), dtype=torch.float64)
    first_token = prompt.subject_range[0] if shortcuts else 0
    skip_prefix = shortcuts and clean.calls.can_skip_prefix
    cells = [
        cell
        for cell in grid_cells(kind, n_tokens, n_layers, window, first_token)
        if only is None or (cell.token, cell.layer) in only
    ]
    groups: dict[int, list[tuple[Cell, int]]] = {}  # first position computed -> rows
    for cell in cells:
        groups.setdefault(cell.token if skip_prefix else 0, []).extend((cell, sample) for sample in range(samples))
    totals = torch.zeros_like(grid)
    for first, rows in groups.items():
        rows.sort(key=lambda row: _start_layer(kind, row[0], shortcuts))
        for offset in range(0, len(rows), batch_size):
            chunk = rows[offset : offset + batch_size]
            scores = _restore_rows(model, clean, corrupted, kind, chunk, first, target_id, shortcuts)
            for (cell, _), score in zip(chunk, scores.tolist()):
                totals[cell.token, cell.layer] += score
    for cell in cells:  # tokens before the subject keep the corrupted score: restoring them changes nothing
        grid[cell.token, cell.layer] = totals[cell.token, cell.layer] / samples
    return grid


# ---------------------------------------------------------------- the slow reference


@torch.no_grad()
def reference_restored_probability(
    model, prompt: TracePrompt, subject_embeds: torch.Tensor, kind: str, cell: Cell, target_id: int
) -> float:
    """One cell, one full forward (ROME's trace_with_patch): row 0 clean, rows 1.. corrupted; the clean
    row's states at the cell's token are copied into the corrupted rows; mean P(target) of those rows."""
    samples = subject_embeds.shape[0]
    input_ids = prompt.input_ids.to(model.device).expand(samples + 1, -1)
    embed = module_name(model, "embed")
    restored = {module_name(model, ROLE[kind], layer) for layer in range(cell.first, cell.last)}

    def edit(name, hidden):
        if name == embed:
            return _corrupt_rows(hidden, prompt.subject_range, subject_embeds, first_row=1)
        hidden = hidden.clone()
        hidden[1:, cell.token] = hidden[0, cell.token]
        return hidden

    with Trace(model, [embed, *sorted(restored)], retain_output=False, edit_output=edit):
        logits = model(input_ids=input_ids, use_cache=False).logits
    return float(_at_least_float32(logits[1:, -1]).softmax(dim=-1)[:, target_id].mean())


# ---------------------------------------------------------------- one fact, all heatmaps


@dataclass
class TraceResult:
    """Every number of one traced fact; `scores[kind]` is (T, L) as nested lists."""

    text: str
    subject: str
    tokens: list[str]
    subject_range: tuple[int, int]
    target: str
    target_id: int
    clean_prob: float
    corrupted_prob: float
    clean_top: str
    clean_top_prob: float
    known: bool
    samples: int
    corruption: str
    noise: float
    noise_std: float
    window: int
    num_layers: int
    scores: dict[str, list[list[float]]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def check_settings(model, samples: int, window: int, corruption: str, noise: float, kinds) -> None:
    n_layers = num_layers(model)
    if not 1 <= int(window) <= n_layers:
        raise FacteditError(f"window={window} does not fit this model's {n_layers} layers: use 1..{n_layers}")
    if int(samples) < 1:
        raise FacteditError(f"samples={samples}: need at least 1 corrupted run")
    if corruption not in CORRUPTIONS:
        raise FacteditError(f"corruption={corruption!r}: use one of {', '.join(CORRUPTIONS)}")
    if corruption == "noise" and not float(noise) > 0:
        raise FacteditError(f"noise={noise}: the noise multiple must be > 0")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise FacteditError(f"unknown kinds {sorted(unknown)}: use some of {', '.join(KINDS)}")


def trace_fact(model, tokenizer, prompt: str, subject: str, target_true: str | None = None, *, samples: int = 10,
               noise: float = 3.0, embed_std: float = 1.0, window: int = 10, corruption: str = "noise",
               replacement_ids: torch.Tensor | None = None, kinds=KINDS, seed: int = 0, batch_size: int = 256,
               min_prob: float = 0.05, force: bool = False) -> TraceResult:  # fmt: skip
    """Trace one fact: clean run, corrupted runs, all restorations of `kinds`.

    noise is a multiple of `embed_std` (ROME: 3 × the std of the subjects' embeddings). A fact the model
    does not know (target not top-1, or its probability < min_prob) is an error unless `force`.
    """
    began = time.perf_counter()
    check_settings(model, samples, window, corruption, noise, kinds)
    traced = encode_prompt(tokenizer, prompt, subject, target_true)
    clean = clean_run(model, traced, kinds)
    top_id = int(clean.probs.argmax())
    target_id = top_id if traced.target_id is None else traced.target_id
    known = _check_known(tokenizer, traced, clean.probs, target_id, min_prob, force)
    noise_std = float(noise) * embed_std
    subject_embeds = corrupted_subject_embeddings(model, traced, samples, corruption, noise_std, replacement_ids, seed)
    corrupted = corrupted_run(model, traced, subject_embeds, clean.calls)
    scores = {kind: restored_grid(model, clean, corrupted, kind, traced, target_id, window, batch_size).tolist()
              for kind in kinds}  # fmt: skip
    return TraceResult(
        text=traced.text, subject=subject, tokens=traced.tokens, subject_range=traced.subject_range,
        target=tokenizer.decode([target_id]), target_id=target_id, clean_prob=float(clean.probs[target_id]),
        corrupted_prob=float(corrupted.probs[:, target_id].mean()), clean_top=tokenizer.decode([top_id]),
        clean_top_prob=float(clean.probs[top_id]), known=known, samples=samples, corruption=corruption,
        noise=float(noise), noise_std=noise_std if corruption == "noise" else 0.0, window=int(window),
        num_layers=num_layers(model), scores=scores, seconds=time.perf_counter() - began,
    )  # fmt: skip


def _check_known(tokenizer, traced: TracePrompt, probs: torch.Tensor, target_id: int, min_prob: float, force: bool):
    """Whether the model knows the fact (target top-1 with P >= min_prob); if not, an error unless `force`."""
    top_id, clean_prob = int(probs.argmax()), float(probs[target_id])
    if target_id == top_id and clean_prob >= min_prob:
        return True
    message = (
        f"the model does not know this fact: P({tokenizer.decode([target_id])!r} | {traced.text!r}) = "
        f"{clean_prob:.3f}, its top prediction is {tokenizer.decode([top_id])!r} ({float(probs[top_id]):.3f})"
    )
    log.warning(message)
    if not force:
        raise FacteditError(message + "; pass force=true to trace it anyway")
    return False

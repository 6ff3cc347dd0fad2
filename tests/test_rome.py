"""ROME's algebra and machinery on tiny float64 models, checked against float64 references."""

import contextlib

import pytest
import torch

from factedit import FacteditError, load_model, model_fingerprint
from factedit.architectures import as_out_in, get_module, module_name, rewrite_weight, unembed
from factedit.hooks import Trace
from factedit.rome import Fact, apply_edits, edit, load_edits, resolve_hparams, revert_edits, save_edits
from factedit.rome.compute_key import reference_key, subject_keys, template_keys
from factedit.rome.compute_value import ValueObjective, ValueOptimizer, compute_value
from factedit.rome.context import context_templates
from factedit.rome.fast import full_zero_run, value_engine
from factedit.rome.fast.frozen_prefix import BUCKETS, can_freeze, frozen_context
from factedit.rome.fast.fused_activations import TanhGELU, fused_activations
from factedit.rome.fast.low_precision import bf16_autocast, bf16_fit, native_bf16, resolve_bf16
from factedit.rome.fast.step_graph import GRAPH_WARMUP
from factedit.rome.update import delta_weight, rank_one_update, solve_second_moment
from factedit.rome.value_batch import value_batch

FACT = Fact(subject="Eiffel Tower", prompt="{} is located in the city of", target_new="Rome", target_true="Paris")
TEMPLATES = ["{}", "The weather today. {}", "Because of this, we. {}"]
HP = dict(layer=1, v_num_grad_steps=5, context_templates=[[3, 2]], seed=0)


def fit_value(model, tokenizer, fact, layer, templates, hparams) -> ValueOptimizer:
    """The v* fit of one fact as an edit runs it (eager float32 steps unless `hparams` asks otherwise)."""
    hp = resolve_hparams(overrides={"bf16": False, "cuda_graph": False, "graph_cache": 0, **hparams, "layer": layer})
    batch = value_batch(tokenizer, [fact], templates, model.device)
    with value_engine(model, layer, batch, hp) as engine:
        return compute_value(engine, [fact])


def random_second_moment(d, tokens=500, seed=0):
    keys = torch.randn(tokens, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return keys.T @ keys / tokens


def test_update_writes_the_pair_and_nothing_c_orthogonal():
    g = torch.Generator().manual_seed(1)
    weight, key, target = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((6, 10), (10,), (6,)))
    second_moment = random_second_moment(10)
    u, lam = rank_one_update(weight, second_moment, key, target)
    edited = weight + delta_weight(u, lam)
    assert torch.allclose(edited @ key, target, atol=1e-12)
    other = torch.randn(10, generator=g, dtype=torch.float64)
    orthogonal = other - (u @ other) / (u @ u) * u  # uᵀk = 0: k is C⁻¹-orthogonal to k̄
    assert torch.allclose(edited @ orthogonal, weight @ orthogonal, atol=1e-12)
    # The paper's form with an explicit inverse: ΔW = (v* − W k̄)(C⁻¹k̄)ᵀ / (k̄ᵀ C⁻¹ k̄).
    inverse_key = torch.linalg.inv(second_moment) @ key
    reference = torch.outer(target - weight @ key, inverse_key) / (key @ inverse_key)
    assert torch.allclose(delta_weight(u, lam), reference, atol=1e-10)


def test_two_key_update_shifts_both_keys_by_the_same_residual():
    """two_keys: still rank one; (W + ΔW)k̄ = v* and the second key moves by the same v* − W k̄;
    keys C⁻¹-orthogonal to both are untouched; u is the C-smallest such vector (float64)."""
    g = torch.Generator().manual_seed(2)
    weight, key, bare, target = (
        torch.randn(*s, generator=g, dtype=torch.float64) for s in ((6, 10), (10,), (10,), (6,))
    )
    second_moment = random_second_moment(10)
    u, lam = rank_one_update(weight, second_moment, key, target, also_key=bare)
    change = delta_weight(u, lam)
    assert torch.allclose((weight + change) @ key, target, atol=1e-12)
    assert torch.allclose(change @ bare, target - weight @ key, atol=1e-12)
    whitened = torch.linalg.solve(second_moment, torch.stack([key, bare], dim=1))  # C⁻¹k̄, C⁻¹k₀
    other = torch.randn(10, generator=g, dtype=torch.float64)
    basis = torch.linalg.qr(whitened).Q
    orthogonal = other - basis @ (basis.T @ other)
    assert torch.allclose(change @ orthogonal, torch.zeros(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(u @ key, torch.tensor(1.0, dtype=torch.float64)) and torch.allclose(u @ bare, u @ key)
    keys_basis = torch.linalg.qr(torch.stack([key, bare], dim=1)).Q
    z = torch.randn(10, generator=g, dtype=torch.float64)
    alternative = u + (z - keys_basis @ (keys_basis.T @ z))  # meets uᵀk̄ = uᵀk₀ = 1 as well
    assert (
        torch.allclose(alternative @ bare, u @ bare)
        and u @ second_moment @ u < alternative @ second_moment @ alternative
    )
    # a second key along k̄ adds no condition: the plain update
    plain = delta_weight(*rank_one_update(weight, second_moment, key, target))
    assert torch.allclose(
        delta_weight(*rank_one_update(weight, second_moment, key, target, also_key=2 * key)), plain, atol=1e-9
    )


def test_second_moment_solve_is_factored_once_per_statistics_and_redone_when_they_change():
    """C⁻¹ rhs from C's LU factorization, kept on C: equal to a fresh solve, the factor reused by
    later edits, recomputed after C changes in place; a singular C is a one-line error."""
    second_moment = random_second_moment(12).float()  # stats files hold float32 C
    keys = torch.randn(12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected = torch.linalg.solve(second_moment.double(), keys)
    assert torch.allclose(solve_second_moment(second_moment, keys), expected, rtol=0, atol=1e-12)
    factor = second_moment._factedit_lu[keys.device][1]
    assert torch.allclose(solve_second_moment(second_moment, keys[:, 0]), expected[:, 0], rtol=0, atol=1e-12)
    assert second_moment._factedit_lu[keys.device][1] is factor  # not factored again
    second_moment.mul_(2)
    assert torch.allclose(solve_second_moment(second_moment, keys), expected / 2, rtol=0, atol=1e-12)
    with pytest.raises(FacteditError, match="singular"):
        solve_second_moment(torch.zeros(12, 12), keys)


def test_update_rejects_mismatched_statistics():
    with pytest.raises(FacteditError, match="stats file belongs to another module"):
        rank_one_update(torch.zeros(6, 10), torch.eye(8), torch.ones(10), torch.ones(6))


def test_compute_key_is_the_template_mean(tiny_llama64):
    model, tokenizer = tiny_llama64
    key = reference_key(model, tokenizer, FACT.prompt, FACT.subject, 1, TEMPLATES)
    name = module_name(model, "rewrite", 1)
    manual = []
    for context in TEMPLATES:
        text = context.format(FACT.prompt).format(FACT.subject)
        with torch.no_grad(), Trace(model, name, retain_input=True) as trace:
            model(**tokenizer(text, return_tensors="pt"))
        last = len(tokenizer(context.format(FACT.prompt).split("{}")[0] + FACT.subject)["input_ids"]) - 1
        manual.append(trace[name].input[0, last])
    assert torch.allclose(key, torch.stack(manual).mean(0), atol=1e-12)


FAMILIES = {  # tiny random models of every family in the architecture table
    "gpt2": dict(n_embd=32, n_layer=3, n_head=4, n_inner=80),
    "gptj": dict(n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_inner=80),
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80),
    "llama": dict(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=80
    ),
    "gemma3_text": dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=80,
        head_dim=8,
        sliding_window=64,
        layer_types=["sliding_attention"] * 2 + ["full_attention"],
    ),
}


def _family_model(model_type, attn, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **FAMILIES[model_type])
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    except ValueError as error:  # e.g. GPT-J has no sdpa attention before transformers 5.2x
        pytest.skip(str(error).split(".")[0])
    return model.to(torch.float64).eval().requires_grad_(False)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fast_value_loss_and_gradient_equal_the_full_forward(tiny_llama, model_type, attn):
    """The frozen context (layers below L and positions before the subject computed once) changes
    nothing: loss and dloss/dδ equal the straightforward full forward in float64, at layers 0 and 1,
    also with the live batch padded to bucket sizes (masked keys, target tokens weighted 0). The keys,
    v₀ and the known-answer prediction taken from the same δ = 0 run equal their standalone definitions."""
    model = _family_model(model_type, attn, tiny_llama[1])
    tokenizer = tiny_llama[1]
    batch = value_batch(tokenizer, [FACT], TEMPLATES)
    assert len(set(batch.subject_pos.tolist())) > 1  # rows differ in where the subject ends
    assert can_freeze(model, batch)
    delta = torch.randn(model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    prompt_ids = tokenizer(FACT.text)["input_ids"]
    with torch.no_grad():  # greedy tokens after the bare prompt, then after each target token but the last
        prediction = (
            model(torch.tensor([prompt_ids + batch.target_ids[0, :-1].tolist()]))
            .logits[0, len(prompt_ids) - 1 :]
            .argmax(-1)
        )
    for layer in (0, 1):
        keys = subject_keys(model, tokenizer, [t.format(FACT.prompt) for t in TEMPLATES], FACT.subject, layer)
        results = []
        for fast, pad in ((False, False), (True, False), (True, True)):
            with frozen_context(model, layer, batch, pad=pad) if fast else contextlib.nullcontext() as live:
                assert (live is not None) == fast  # this transformers version reuses frozen keys/values
                if pad:  # bucketed sizes (so that a kept CUDA graph serves other facts), some of them padded here
                    sizes = (
                        live.inputs["attention_mask"].shape[-1] - live.inputs["input_ids"].shape[1],
                        live.inputs["input_ids"].shape[1],
                        live.target_ids.shape[-1],
                    )
                    assert all(n % BUCKETS[k] == 0 for n, k in zip(sizes, ("frozen", "live", "target")))
                    assert (live.target_weight == 0).any()
                run = live.zero_run if fast else full_zero_run(model, batch, layer)
                module = ValueObjective(model, batch, layer, run, live=live, fast=fast)
                d = delta.clone().requires_grad_(True)
                parts = module.losses(d)
                parts["loss"].backward()
            predicted = unembed(model, run.final_hidden[0, batch.target_pos[0]]).argmax(-1)  # the known-answer check's
            assert torch.allclose(template_keys(run.rewrite_input, batch)[0], keys, atol=1e-12) and torch.equal(
                predicted, prediction
            )
            results.append((parts, d.grad, module.initial_value))
        (slow, slow_grad, slow_v0), *others = results
        for fast, fast_grad, fast_v0 in others:
            assert torch.allclose(slow_v0, fast_v0, atol=1e-12)
            for key in ("loss", "nll", "kl", "weight_decay", "p_target"):
                assert torch.allclose(slow[key], fast[key], atol=1e-10), (layer, key)
            assert torch.allclose(slow_grad, fast_grad, atol=1e-10), layer
        assert slow["kl"] > 0 and slow_grad.abs().max() > 0
    if model_type == "gemma3_text":  # a window shorter than the prompts: the plain causal mask would be wrong
        model.config.sliding_window = 4
        assert not can_freeze(model, batch)


@pytest.mark.parametrize("model_type", ["gpt2", "gptj"])
def test_fused_activations_change_no_loss_or_gradient(tiny_llama, model_type):
    """GPT-2 / GPT-J's spelled-out tanh-GELU becomes one fused kernel inside the v* run: the same
    loss and dloss/dδ in float64, and the model's own modules are back afterwards."""
    from transformers.activations import NewGELUActivation

    x = torch.linspace(-12, 12, 10_001, dtype=torch.float64)
    assert torch.allclose(TanhGELU()(x), NewGELUActivation()(x), rtol=0, atol=1e-15)
    model, tokenizer = _family_model(model_type, "eager", tiny_llama[1]), tiny_llama[1]
    originals = [m for m in model.modules() if isinstance(m, NewGELUActivation)]
    batch = value_batch(tokenizer, [FACT], TEMPLATES)
    delta = torch.randn(model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    results = []
    for fused in (False, True):
        with (
            fused_activations(model) if fused else contextlib.nullcontext() as replaced,
            frozen_context(model, 1, batch) as live,
        ):
            if fused:
                assert replaced == len(originals) == model.config.n_layer
                assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
            d = delta.clone().requires_grad_(True)
            parts = ValueObjective(model, batch, 1, live.zero_run, live=live).losses(d)
            parts["loss"].backward()
        results.append((parts["loss"], d.grad))
    assert torch.allclose(results[0][0], results[1][0], rtol=0, atol=1e-12)
    assert torch.allclose(results[0][1], results[1][1], rtol=0, atol=1e-12) and results[0][1].abs().max() > 0
    assert [m for m in model.modules() if isinstance(m, NewGELUActivation)] == originals
    with pytest.raises(RuntimeError), fused_activations(model):
        raise RuntimeError("inside")
    assert [m for m in model.modules() if isinstance(m, NewGELUActivation)] == originals


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text"])
def test_cuda_graph_steps_equal_eager_steps(tiny_llama, model_type):
    """A v* fit whose steps replay one captured graph (forward, backward, Adam, clamp) gives the
    eager fit's losses step by step and the same δ, clamped steps included."""
    tokenizer = tiny_llama[1]
    model = _family_model(model_type, "sdpa", tokenizer).float().cuda()
    fits = []
    for graphed in (False, True):
        hparams = dict(v_num_grad_steps=8, loss_threshold=0.0, tf32=False, cuda_graph=graphed, clamp_norm_factor=0.5)
        fits.append(fit_value(model, tokenizer, FACT, 1, TEMPLATES, hparams))
    eager, graphed = fits
    assert graphed.stepper.eager_steps == GRAPH_WARMUP and len(graphed.histories[0]) == len(eager.histories[0]) == 8
    for a, b in zip(eager.histories[0], graphed.histories[0]):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]) + 1e-5, (a, b)
    assert torch.allclose(eager.delta, graphed.delta, rtol=1e-4, atol=1e-5)
    assert torch.isclose(
        graphed.delta.norm(), 0.5 * graphed.objective.initial_value.norm(), rtol=1e-4
    )  # the clamp ran in the graph
    torch.cuda.synchronize()  # an illegal access inside a replay would surface here


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_fit_stops_after_the_step_the_eager_fit_stops_after(tiny_llama):
    """Replayed steps are read one step late (the host overlaps the next replay); a fit that
    reaches the loss threshold still ends with the eager fit's δ and history (the extra step is undone)."""
    tokenizer = tiny_llama[1]
    model = _family_model("llama", "sdpa", tokenizer).float().cuda()
    hparams = dict(
        v_num_grad_steps=12, loss_threshold=0.0, tf32=False, clamp_norm_factor=100.0, v_weight_decay=0.0, v_lr=0.1
    )
    # (on a random model the weight-decay term and the clamp pin the loss: without them it falls a little each step)
    losses = [
        h["loss"]
        for h in fit_value(model, tokenizer, FACT, 1, TEMPLATES, {**hparams, "cuda_graph": False}).histories[0]
    ]
    stop = next(k for k in range(3, 11) if losses[k] < min(losses[:k]) - 5e-4)  # the first new low after replays start
    threshold = (losses[stop] + min(losses[:stop])) / 2
    eager, graphed = (
        fit_value(model, tokenizer, FACT, 1, TEMPLATES, {**hparams, "loss_threshold": threshold, "cuda_graph": g})
        for g in (False, True)
    )
    assert (
        graphed.stepper.eager_steps == GRAPH_WARMUP and len(eager.histories[0]) == len(graphed.histories[0]) == stop + 1
    )
    assert torch.allclose(eager.delta, graphed.delta, rtol=1e-4, atol=1e-5)


OTHER_FACT = Fact(
    subject="Colosseum", prompt="The {} is located in the city of", target_new="Athens", target_true="Rome"
)  # FACT's buckets
SAME_SUBJECT_FACT = Fact(
    subject="Eiffel Tower", prompt="{} is located in the city of", target_new="Athens", target_true="Paris"
)
LONG_FACT = Fact(
    subject="International Business Machines Corporation headquarters",
    prompt="{} can be found in the city of",
    target_new="San Francisco Bay Area",
)  # other buckets


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_kept_graph_replays_a_later_fit_of_another_fact_from_its_first_step(tiny_llama, model_type):
    """A graph captured for one fact serves the next fact of the same bucketed shapes: no eager
    step, no capture, and the eager fit's losses and δ; at most graph_cache graphs are kept."""
    from factedit.rome.fast.step_graph import graphs_of

    tokenizer = tiny_llama[1]
    model = _family_model(model_type, "sdpa", tokenizer).float().cuda()
    hparams = dict(v_num_grad_steps=8, loss_threshold=0.0, tf32=False, clamp_norm_factor=0.5, bf16=False, graph_cache=1)
    first = fit_value(model, tokenizer, FACT, 1, TEMPLATES, {**hparams, "cuda_graph": True})
    eager, graphed = (
        fit_value(model, tokenizer, OTHER_FACT, 1, TEMPLATES, {**hparams, "cuda_graph": g}) for g in (False, True)
    )
    assert (
        first.stepper.eager_steps == GRAPH_WARMUP and graphed.stepper.eager_steps == 0
    )  # the second graphed fit only replayed
    assert len(graphed.histories[0]) == len(eager.histories[0]) == 8
    for a, b in zip(eager.histories[0], graphed.histories[0]):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]) + 1e-5, (a, b)
    assert torch.allclose(eager.delta, graphed.delta, rtol=1e-4, atol=1e-5) and graphed.delta.abs().max() > 0
    assert not torch.allclose(first.delta, graphed.delta, rtol=1e-2)  # its own fact's δ, not the first one's
    kept = graphs_of(model, 1)
    long = fit_value(model, tokenizer, LONG_FACT, 1, TEMPLATES, {**hparams, "cuda_graph": True})
    again = fit_value(model, tokenizer, FACT, 1, TEMPLATES, {**hparams, "cuda_graph": True})
    assert (
        long.stepper.eager_steps == again.stepper.eager_steps == GRAPH_WARMUP and len(kept.graphs) == 1
    )  # graph_cache=1: the LRU one went
    assert torch.allclose(again.delta, first.delta, rtol=1e-4, atol=1e-5)
    torch.cuda.synchronize()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_edit_sequence_with_kept_graphs_equals_the_eager_sequence():
    """Two edits of one subject in a row: the second fit replays the first one's graph on the weights
    the first edit changed in place, and writes what eager fits write."""
    from factedit.rome import release_graphs

    model, tokenizer = load_model("tiny_llama", device="cuda")
    second_moment = random_second_moment(model.config.intermediate_size).cuda()
    before = {name: p.clone() for name, p in model.named_parameters()}
    made = []
    for cuda_graph in (False, True):
        hparams = {
            **HP,
            "v_num_grad_steps": 8,
            "loss_threshold": 0.0,
            "tf32": False,
            "bf16": False,
            "cuda_graph": cuda_graph,
        }
        edits = edit(model, tokenizer, [FACT, SAME_SUBJECT_FACT], stats={1: second_moment}, hparams=hparams)
        made.append(edits)
        revert_edits(model, edits.backup)
        assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    (eager_first, eager_second), (graphed_first, graphed_second) = made
    for a, b in (
        (eager_first, graphed_first),
        (eager_second, graphed_second),
    ):  # padded (graphed) vs unpadded: rounding
        assert torch.allclose(a.target_value, b.target_value, rtol=1e-3, atol=1e-3 * a.target_value.abs().max()), (
            a.info,
            b.info,
        )
    assert not torch.allclose(graphed_first.target_value, graphed_second.target_value, rtol=0.1)
    assert graphed_second.info["bf16"] is False and eager_second.info["cuda_graph"] is None
    assert (graphed_first.info["cuda_graph"], graphed_second.info["cuda_graph"]) == ("captured", "kept")
    release_graphs(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("bf16", [False, True])
def test_kept_graph_reads_weights_changed_since_its_capture(tiny_llama, bf16):
    """After the rewritten matrix changes in place (what an applied edit does), a fit that replays a
    kept graph computes with the new weights (float32 in place, or the refreshed bfloat16 copies):
    at δ = 0 its model is the model (KL 0) and its losses follow an eager fit on the new weights."""
    tokenizer = tiny_llama[1]
    model = _family_model("llama", "sdpa", tokenizer).float().cuda()
    hparams = dict(v_num_grad_steps=6, loss_threshold=0.0, tf32=False, bf16=bf16, graph_cache=8)
    first = fit_value(model, tokenizer, FACT, 1, TEMPLATES, {**hparams, "cuda_graph": True})
    with (
        torch.no_grad()
    ):  # the rewritten matrix, and the unembedding (a random tiny model's loss barely feels the former)
        weight = model.model.layers[1].mlp.down_proj.weight
        weight.add_(torch.randn_like(weight) * weight.std() * 2)
        model.lm_head.weight.mul_(3.0)
    kept = fit_value(model, tokenizer, FACT, 1, TEMPLATES, {**hparams, "cuda_graph": True})
    eager = fit_value(model, tokenizer, FACT, 1, TEMPLATES, {**hparams, "cuda_graph": False})
    assert (first.stepper.graph_use, kept.stepper.graph_use, eager.stepper.graph_use) == ("captured", "kept", None)
    tolerance = 3e-2 if bf16 else 1e-4
    assert (
        abs(kept.histories[0][0]["kl"]) < tolerance
        and abs(first.histories[0][0]["loss"] - kept.histories[0][0]["loss"]) > 0.1
    )
    for a, b in zip(eager.histories[0], kept.histories[0], strict=True):
        assert abs(a["loss"] - b["loss"]) <= tolerance * abs(a["loss"]) + 1e-4, (a, b)
    torch.cuda.synchronize()


NATIVE_BF16 = [
    pytest.param("cpu", marks=pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="no AVX512-BF16/AMX")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
]


@pytest.mark.parametrize("device", NATIVE_BF16)
def test_bf16_value_fit_follows_the_float32_fit(tiny_llama, device):
    """bfloat16 (frozen run and steps; graphed on a GPU) follows the float32 fit step by step, to bf16
    rounding (on this random model δ jumps to the clamp at the first step and stays there in both),
    and leaves the model's float32 weights bitwise as they were."""
    tokenizer = tiny_llama[1]
    model = _family_model("llama", "sdpa", tokenizer).float().to(device)
    before = {name: p.clone() for name, p in model.named_parameters()}
    fits = [
        fit_value(
            model, tokenizer, FACT, 1, TEMPLATES, dict(v_num_grad_steps=8, loss_threshold=0.0, tf32=False, bf16=bf16)
        )
        for bf16 in (False, True)
    ]
    full, half = ([h["loss"] for h in fit.histories[0]] for fit in fits)
    assert all(abs(a - b) <= 0.03 * abs(a) + 1e-3 for a, b in zip(full, half)), (full, half)
    assert full[0] != full[-1] and torch.nn.functional.cosine_similarity(fits[0].delta, fits[1].delta, dim=-1) > 0.95
    assert fits[1].delta.dtype == torch.float32 and fits[1].objective.initial_value.dtype == torch.float32
    assert all(p.dtype == torch.float32 and torch.equal(p, before[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_bf16_casts_made_once_change_no_bit(tiny_llama, model_type):
    """A bfloat16 step casts less than autocast alone would, to the same bits: the weights and the
    biases of the products are cast once (bf16_fit), the frozen keys/values stay in the dtype the
    attention made them in, and sdpa gets its mask additive in bfloat16. Loss and dloss/dδ equal,
    bitwise, those of autocast casting every weight at every product, attending to float32 caches
    through a boolean mask."""
    tokenizer = tiny_llama[1]
    model = _family_model(model_type, "sdpa", tokenizer).float()
    generator = torch.Generator().manual_seed(3)
    for name, parameter in model.named_parameters():  # biases start at zero, where any cast is exact
        if name.endswith("bias"):
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    batch = value_batch(tokenizer, [FACT], TEMPLATES)
    delta = torch.randn(model.config.hidden_size, generator=generator)
    math_attention = torch.nn.attention.sdpa_kernel(
        [torch.nn.attention.SDPBackend.MATH]
    )  # what bf16_fit picks on a CPU
    results = []
    with frozen_context(model, 1, batch, bf16=True) as live:
        module = ValueObjective(model, batch, 1, live.zero_run, live=live)
        cached = live.cache.keys + live.cache.values
        assert any(
            c.dtype == torch.bfloat16 for c in cached
        )  # what the attention made (Llama-style keys: float32, rotated)
        assert live.inputs["attention_mask"].dtype == torch.bfloat16 and live.inputs["attention_mask"].isinf().any()
        for once in (True, False):
            if not once:
                live.cache.keys[:] = [k.float() for k in live.cache.keys]
                live.cache.values[:] = [v.float() for v in live.cache.values]
                live.inputs["attention_mask"] = live.inputs["attention_mask"] == 0
            with bf16_fit(model, 1) if once else math_attention, bf16_autocast(model.device):
                if model_type == "gpt2":  # Conv1D: its bias is cast once as well
                    assert (model.transformer.h[1].attn.c_attn.bias.dtype == torch.bfloat16) == once
                d = delta.clone().requires_grad_(True)
                parts = module.losses(d)
                parts["loss"].backward()
            results.append((parts, d.grad))
    (once, once_grad), (every, every_grad) = results
    assert all(torch.equal(once[k], every[k]) for k in once) and torch.equal(once_grad, every_grad)
    assert once_grad.abs().max() > 0 and all(
        p.dtype == torch.float32 for p in model.parameters()
    )  # biases put back too


def test_bf16_fit_swaps_the_reached_matrices_and_puts_the_originals_back(tiny_llama):
    model = tiny_llama[0]
    originals = dict(model.named_parameters())
    with pytest.raises(RuntimeError, match="inside"), bf16_fit(model, first_layer=1):
        inside = dict(model.named_parameters())
        raise RuntimeError("inside")
    low = {name for name, p in inside.items() if p.dtype == torch.bfloat16}
    assert "model.layers.1.mlp.down_proj.weight" in low and "model.layers.1.self_attn.q_proj.weight" in low
    assert "model.layers.0.mlp.down_proj.weight" not in low and "model.layers.1.input_layernorm.weight" not in low
    assert "lm_head.weight" in low and "model.embed_tokens.weight" not in low  # a tied unembedding is untied meanwhile
    assert all(p is originals[name] for name, p in model.named_parameters())  # the same tensors, not copies


def test_kept_bf16_copies_are_the_same_tensors_fit_after_fit_and_follow_in_place_edits(tiny_llama):
    """With kept copies (for a kept CUDA graph, which reads them where they were), a later fit gets
    the same bfloat16 tensors, refreshed from float32 weights changed in place since."""
    model = load_model("tiny_llama")[0]
    kept, weight = {}, model.model.layers[1].mlp.down_proj.weight
    with bf16_fit(model, 1, kept=kept):
        first = model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        weight.add_(1.0)  # what an applied edit does between two fits
    with bf16_fit(model, 1, kept=kept):
        second = model.model.layers[1].mlp.down_proj.weight
    assert second is first and second.dtype == torch.bfloat16 and torch.equal(second, weight.to(torch.bfloat16))
    assert (
        model.model.layers[1].mlp.down_proj.weight is weight and len(kept) == 3 * 7 + 1
    )  # layers 1-3: 7 matrices each; lm_head


def test_bf16_setting_resolves_to_what_the_hardware_runs():
    cpu = torch.device("cpu")
    assert (
        resolve_bf16("auto", cpu) == resolve_bf16(True, cpu) == native_bf16(cpu) and resolve_bf16(False, cpu) is False
    )
    with pytest.raises(FacteditError, match="true, false or auto"):
        resolve_bf16("yes", cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_edit_on_a_gpu_keeps_the_model_there_and_writes_the_pair(tiny_llama, cuda_graph):
    model, tokenizer = load_model("tiny_llama", device="cuda")
    second_moment = random_second_moment(model.config.intermediate_size).cuda()
    edits = edit(model, tokenizer, FACT, stats={1: second_moment}, hparams={**HP, "cuda_graph": cuda_graph})
    assert all(p.device.type == "cuda" for p in model.parameters())
    weight = as_out_in(model, rewrite_weight(model, 1)).double()
    made = edits[0]
    assert torch.allclose(weight @ made.key.cuda(), made.target_value.cuda(), atol=1e-4)


def _stats_for(model, layer=1):
    d_mlp = as_out_in(model, rewrite_weight(model, layer)).shape[1]
    return {layer: random_second_moment(d_mlp, seed=layer)}


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_edit_writes_target_value_in_either_weight_layout(name):
    model, tokenizer = load_model(name, dtype=torch.float64)
    (made,) = edit(model, tokenizer, FACT, stats=_stats_for(model), hparams=HP)
    module = get_module(model, made.module)
    with torch.no_grad():
        bias = getattr(module, "bias", None)
        edited_value = module(made.key[None])[0] - (0 if bias is None else bias)  # W' k̄ through the real module
    assert torch.allclose(edited_value, made.target_value, atol=1e-9)
    templates = context_templates(model, tokenizer, HP["context_templates"], seed=0)
    assert torch.allclose(
        made.key, reference_key(model, tokenizer, FACT.prompt, FACT.subject, 1, templates), atol=1e-12
    )
    assert made.info["steps"] >= 1 and 0 < made.info["p_target"] <= 1


def test_two_edits_then_revert_restore_weights_bitwise(tiny_llama):
    model, tokenizer = tiny_llama
    before = {n: p.clone() for n, p in model.named_parameters()}
    second = Fact(subject="Colosseum", prompt="The {} is located in the city of", target_new="Athens")
    edits = edit(model, tokenizer, [FACT, second], stats=_stats_for(model), hparams=HP)
    assert len(edits) == 2 and not torch.equal(rewrite_weight(model, 1), before["model.layers.1.mlp.down_proj.weight"])
    revert_edits(model, edits.backup)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # Re-applying the saved factors reproduces the sequentially edited weights exactly.
    backup = apply_edits(model, list(edits))
    again = rewrite_weight(model, 1).clone()
    revert_edits(model, backup)
    backup = apply_edits(model, list(edits))
    assert torch.equal(rewrite_weight(model, 1), again)
    revert_edits(model, backup)


def test_saved_edits_round_trip_and_refuse_other_models(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    edits = edit(model, tokenizer, FACT, stats=_stats_for(model), hparams=HP)
    revert_edits(model, edits.backup)
    path = tmp_path / "run" / "edits.safetensors"
    save_edits(path, list(edits), base_fingerprint=model_fingerprint(model), model_name="tiny_llama")
    assert path.stat().st_size < 20_000  # factors, not a model copy
    loaded, metadata = load_edits(path.parent, base_fingerprint=model_fingerprint(model))
    assert torch.equal(loaded[0].u, edits[0].u) and loaded[0].fact["subject"] == "Eiffel Tower"
    with pytest.raises(FacteditError, match="was made for model tiny_llama"):
        load_edits(path, base_fingerprint="0" * 16)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(FacteditError, match="not a readable safetensors file"):
        load_edits(path)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(prompt="Where is the tower?"), "exactly one '{}'"),
        (dict(target_new=" "), "target_new must be a non-empty string"),
        (dict(target_new="Paris"), "target_new equals target_true"),
    ],
)
def test_bad_facts_are_one_line_errors(fields, message):
    with pytest.raises(FacteditError, match=message):
        Fact(**{**FACT.to_dict(), **fields})


def test_subject_missing_after_tokenization_is_an_error(smollm2):
    from factedit.tokens import special_prefix, subject_token_range

    with pytest.raises(FacteditError, match="is not in the prompt"):
        subject_token_range(smollm2[1], "The Louvre is in Paris", "Eiffel Tower")
    bos = len(special_prefix(smollm2[1]))
    assert bos == 1  # configs/model/smollm2_135m.yaml: bos_token
    assert subject_token_range(smollm2[1], "The Eiffel Tower's top", "Eiffel Tower") == (bos + 1, bos + 4)


@pytest.mark.parametrize("fast", [True, False])
def test_target_the_model_already_gives_is_an_error(smollm2, fast, monkeypatch):
    """Refused from the v* fit's δ = 0 run (the frozen one, or the full forward), before any step."""
    model, tokenizer = smollm2
    before = rewrite_weight(model, 5).clone()

    def no_step(*args):
        raise AssertionError("a v* step ran")

    monkeypatch.setattr(ValueOptimizer, "step", no_step)
    with pytest.raises(FacteditError, match="already answers 'Paris'"):
        edit(
            model,
            tokenizer,
            Fact(subject="Eiffel Tower", prompt="{} is located in the city of", target_new="Paris"),
            stats={5: torch.eye(1536)},
            hparams={"layer": 5, "fast": fast},
        )
    assert torch.equal(rewrite_weight(model, 5), before)


def test_stop_on_nll_bounds_the_target_nll_instead_of_the_whole_loss(tiny_llama):
    """stop_on=nll ends the fit after the first step whose target NLL is below loss_threshold,
    where ROME's rule (the whole loss, weight decay and KL included) keeps going."""
    model, tokenizer = tiny_llama
    hparams = dict(v_num_grad_steps=6, loss_threshold=0.0)
    full = fit_value(model, tokenizer, FACT, 1, TEMPLATES, hparams).histories[0]
    nlls = [h["nll"] for h in full]
    stop = next(k for k in range(1, 6) if nlls[k] < min(nlls[:k]) - 1e-3)
    threshold = (nlls[stop] + min(nlls[:stop])) / 2
    assert all(h["loss"] >= threshold for h in full)
    by_nll, by_loss = (
        fit_value(
            model, tokenizer, FACT, 1, TEMPLATES, {**hparams, "loss_threshold": threshold, "stop_on": on}
        ).histories[0]
        for on in ("nll", "loss")
    )
    assert by_nll == full[: stop + 1] and by_loss == full
    with pytest.raises(FacteditError, match="editor.stop_on='kl': use one of nll, loss"):
        fit_value(model, tokenizer, FACT, 1, TEMPLATES, {**hparams, "stop_on": "kl"})


@pytest.mark.parametrize("update", ["fixed", "two_keys"])
def test_bare_prompt_key_gets_the_whole_shift_only_with_two_keys(tiny_llama, update):
    """With the fixed update the edit prompt's own key k₀ gets the fraction uᵀk₀ / uᵀk̄ of the shift
    δ = v* − W k̄ written at k̄; with update=two_keys it gets all of it."""
    model, tokenizer = tiny_llama
    weight = as_out_in(model, rewrite_weight(model, 1))
    bare = subject_keys(model, tokenizer, [FACT.prompt], FACT.subject, 1)[0].double()
    before = weight.double() @ bare
    # float32 steps: the keys come from the fit's δ = 0 run, and bfloat16 keys would differ from `bare` by ~1e-3
    edits = edit(model, tokenizer, FACT, stats=_stats_for(model), hparams={**HP, "update": update, "bf16": False})
    try:
        u, lam, key = (t.double() for t in (edits[0].u, edits[0].v, edits[0].key))
        shift = lam * (u @ key)  # ΔW k̄ = v* − W k̄
        moved = as_out_in(model, rewrite_weight(model, 1)).double() @ bare - before
        fraction = float(u @ bare / (u @ key))
        assert torch.allclose(moved, fraction * shift, atol=1e-4) and shift.norm() > 0
        assert (abs(fraction - 1) < 1e-6) == (update == "two_keys")
    finally:
        revert_edits(model, edits.backup)


def test_unknown_update_or_precision_is_a_one_line_error_and_leaves_the_weights(tiny_llama):
    model, tokenizer = tiny_llama
    before = rewrite_weight(model, 1).clone()
    with pytest.raises(FacteditError, match="editor.update='rank2': use one of fixed, original, two_keys"):
        edit(model, tokenizer, FACT, stats=_stats_for(model), hparams={**HP, "update": "rank2"})
    with pytest.raises(FacteditError, match="editor.bf16='half': use true, false or auto"):
        edit(model, tokenizer, FACT, stats=_stats_for(model), hparams={**HP, "bf16": "half"})
    assert torch.equal(rewrite_weight(model, 1), before)

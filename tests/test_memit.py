"""MEMIT and null-space preservation on tiny float64 models, against ROME and closed-form references."""

import pytest
import torch

from factedit import FacteditError, load_model, memit
from factedit.architectures import as_out_in, rewrite_weight
from factedit.memit import memit_update, null_space_update, residual_stream
from factedit.rome import Fact, MemitHparams, edit, revert_edits
from factedit.rome.compute_key import batch_keys, reference_key
from factedit.rome.preserve import null_space_projector, without_keys
from factedit.rome.update import delta_weight, rank_one_update
from factedit.rome.value_batch import value_batch

FACTS = [
    Fact(subject="Eiffel Tower", prompt="{} is located in the city of", target_new="Rome"),
    Fact(subject="Colosseum", prompt="The {} is located in the city of", target_new="Athens"),
    Fact(subject="Louvre", prompt="The {} is a museum in", target_new="London"),
]
TEMPLATES = [[3, 2]]


def second_moment(d, rank=None, seed=0, tokens=600):
    """E[k kᵀ] of random keys; with `rank`, keys confined (up to 1e-4 noise) to a random rank-r subspace."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(tokens, d, generator=generator, dtype=torch.float64)
    if rank is not None:
        basis = torch.linalg.qr(torch.randn(d, rank, generator=generator, dtype=torch.float64)).Q
        keys = keys[:, :rank] @ basis.T + 1e-4 * torch.randn(tokens, d, generator=generator, dtype=torch.float64)
    return keys.T @ keys / tokens


@pytest.fixture
def tiny():
    return load_model("tiny_llama", dtype=torch.float64)


def test_memit_least_squares_is_sherman_morrison_for_one_key():
    """ΔW = R Kᵀ (λC + KKᵀ)⁻¹ for one key is r (C⁻¹k)ᵀ / (λ + kᵀC⁻¹k): ROME's update as λ → 0."""
    g = torch.Generator().manual_seed(0)
    c, key, residual = (
        second_moment(12),
        torch.randn(12, generator=g, dtype=torch.float64),
        torch.randn(5, generator=g, dtype=torch.float64),
    )
    whitened = torch.linalg.solve(c, key)
    for weight in (1.0, 250.0):
        u, v = memit_update(c, key[None], residual[None], weight)
        expected = torch.outer(residual, whitened) / (weight + key @ whitened)
        assert torch.allclose(delta_weight(u, v), expected, rtol=0, atol=1e-12)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    rome = delta_weight(*rank_one_update(w, c, key, w @ key + residual))
    assert torch.allclose(delta_weight(*memit_update(c, key[None], residual[None], 1e-6)), rome, rtol=1e-5, atol=1e-12)


def test_memit_with_one_fact_and_one_layer_equals_rome(tiny):
    """The same v* (δ at the MLP output = δ at the layer output, clamp and weight decay off), the same
    key and residual: MEMIT's edit at one layer is ROME's (update=fixed) up to λ in the denominator."""
    model, tokenizer = tiny
    c = second_moment(128, seed=1)
    common = dict(
        v_num_grad_steps=6, context_templates=TEMPLATES, clamp_norm_factor=1e6, v_weight_decay=0.0, bf16=False
    )
    rome = edit(model, tokenizer, FACTS[0], stats={1: c}, hparams={**common, "layer": 1, "update": "fixed"})
    rome_delta = delta_weight(rome[0].u, rome[0].v)
    revert_edits(model, rome.backup)
    made = memit.edit(
        model, tokenizer, FACTS[0], stats={1: c}, hparams={**common, "layers": [1], "mom2_update_weight": 1e-9}
    )
    memit_delta = delta_weight(made[0].u, made[0].v)
    revert_edits(model, made.backup)
    assert len(made) == 1 and made[0].u.shape == (128, 1) and memit_delta.abs().max() > 1e-3
    assert torch.allclose(memit_delta, rome_delta, rtol=1e-6, atol=1e-8 * rome_delta.abs().max())


def test_memit_writes_each_fact_across_its_layers_and_reverts_bitwise(tiny):
    """A 3-fact batch into layers 1-2: one edit per layer, each of rank ≤ 3 with (W + ΔW)K = target_value,
    the last layer's written values move each fact's residual stream toward its v*, and revert restores every bit."""
    model, tokenizer = tiny
    before = {n: p.clone() for n, p in model.named_parameters()}
    stats = {1: second_moment(128, seed=1), 2: second_moment(128, seed=2)}
    hparams = dict(layers=[1, 2], v_num_grad_steps=4, context_templates=TEMPLATES, mom2_update_weight=1e-6, bf16=False)
    from factedit.rome.context import context_templates

    batch = value_batch(tokenizer, FACTS, context_templates(model, tokenizer, TEMPLATES, seed=0))
    start = residual_stream(model, batch, 2)
    made = memit.edit(model, tokenizer, FACTS, stats=stats, hparams=hparams)
    moved = residual_stream(model, batch, 2) - start
    assert all(m.norm() > 0 for m in moved)
    assert [e.layer for e in made] == [1, 2] and all(e.u.shape == (128, 3) and e.v.shape == (64, 3) for e in made)
    for e in made:
        assert torch.linalg.matrix_rank(delta_weight(e.u, e.v)) <= 3
        assert torch.allclose(e.target_value, e.key @ as_out_in(model, rewrite_weight(model, e.layer)).double().T)
    revert_edits(model, made.backup)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_fits_of_fewer_facts_at_a_time_give_the_same_targets(tiny):
    """facts_per_fit=2 fits the 3 facts as 2 + 1: z and the steps are those of one fit of all 3 (float64)."""
    from factedit.memit.memit import fit_targets
    from factedit.rome.context import context_templates
    from factedit.rome.hparams import resolve_hparams

    model, tokenizer = tiny
    templates = context_templates(model, tokenizer, TEMPLATES, seed=0)
    options = dict(layers=[1, 2], v_num_grad_steps=6, context_templates=TEMPLATES, bf16=False)
    together = fit_targets(model, tokenizer, FACTS, templates, resolve_hparams(model, options, kind=MemitHparams))
    chunked = fit_targets(model, tokenizer, FACTS, templates,
                          resolve_hparams(model, {**options, "facts_per_fit": 2}, kind=MemitHparams))  # fmt: skip
    assert chunked[0].shape == together[0].shape == (3, 64)
    torch.testing.assert_close(chunked[0], together[0], rtol=1e-9, atol=1e-9)
    assert [steps for steps, _ in chunked[1]] == [steps for steps, _ in together[1]]


def test_steps_leave_out_the_facts_that_stopped(tiny):
    """Facts stop at steps 1, 0, never, 0 (a threshold their NLL crosses at different steps) and one the model
    already answers is never stepped: after each stop the steps run only the other facts' rows, cut to the longest
    of them, and fit the same z and steps (float64)."""
    from factedit.rome.compute_value import compute_value
    from factedit.rome.context import context_templates
    from factedit.rome.fast import value_engine
    from factedit.rome.hparams import resolve_hparams

    model, tokenizer = tiny
    facts = [*FACTS, Fact(subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="English"),
             Fact(subject="Big Ben", prompt="{} is in", target_new="Directions")]  # fmt: skip  # already the answer
    templates = context_templates(model, tokenizer, TEMPLATES, seed=0)
    batch = value_batch(tokenizer, facts, templates)
    options = dict(layers=[1, 2], v_num_grad_steps=12, context_templates=TEMPLATES, bf16=False,
                   loss_threshold=10.88, clamp_norm_factor=100.0, v_lr=1.0)  # fmt: skip
    fitted = {}
    for narrow in (True, False):
        hparams = resolve_hparams(model, {**options, "narrow": narrow}, kind=MemitHparams)
        with value_engine(model, 2, batch, hparams) as engine:
            module = compute_value(engine, facts, known="keep")
            fitted[narrow] = module.target_value.clone(), [len(h) for h in module.histories], module.objective.live
    (narrowed, steps, live), (whole, whole_steps, whole_live) = fitted[True], fitted[False]
    assert steps == whole_steps == [2, 1, 12, 1, 0]
    torch.testing.assert_close(narrowed, whole, rtol=1e-9, atol=1e-9)
    # the last steps ran fact 2's rows alone: its templated prompts and its KL prompt
    assert len(live.inputs["input_ids"]) == batch.n_prompts + 1 < len(whole_live.inputs["input_ids"])
    assert live.inputs["input_ids"].shape[1] <= whole_live.inputs["input_ids"].shape[1]
    assert torch.equal(live.target_ids, batch.target_ids[2 * batch.n_prompts : 3 * batch.n_prompts])


def test_batch_keys_equal_the_reference_keys(tiny):
    model, tokenizer = tiny
    from factedit.rome.context import context_templates

    templates = context_templates(model, tokenizer, TEMPLATES, seed=0)
    batch = value_batch(tokenizer, FACTS, templates)
    keys = batch_keys(model, batch, 2)
    for fact, key in zip(FACTS, keys):
        assert torch.allclose(key, reference_key(model, tokenizer, fact.prompt, fact.subject, 2, templates), atol=1e-12)
    assert residual_stream(model, batch, 1).shape == (3, 64)


def test_layer_passes_read_what_full_forwards_read(tiny):
    """Between updates of layers 1, 2, 3 (random rank-2 changes here), the passes that start at the layer
    updated last and stop after the last subject token give the keys and h_L of forwards from the embeddings
    (4 rows a pass: the 9 templated rows in 3 chunks)."""
    from factedit.memit.passes import LayerPasses
    from factedit.rome.context import context_templates

    model, tokenizer = tiny
    batch = value_batch(tokenizer, FACTS, context_templates(model, tokenizer, TEMPLATES, seed=0))
    passes, generator, weights = LayerPasses(model, batch, rows_per_pass=4), torch.Generator().manual_seed(0), []
    keys_before = batch_keys(model, batch, 3)
    for layer in (1, 2, 3):
        torch.testing.assert_close(passes.keys(layer), batch_keys(model, batch, layer), rtol=0, atol=1e-12)
        torch.testing.assert_close(passes.residual_stream(3), residual_stream(model, batch, 3), rtol=0, atol=1e-12)
        weight = rewrite_weight(model, layer)
        weights.append((weight, weight.detach().clone()))
        with torch.no_grad():  # an update of this layer: what the next pass must start after
            weight += torch.randn(weight.shape[0], 2, generator=generator, dtype=weight.dtype) @ torch.randn(
                2, weight.shape[1], generator=generator, dtype=weight.dtype
            )
    assert passes.start == 3 and passes.start_input.shape[1] == int(batch.subject_pos.max()) + 1
    moved = passes.residual_stream(3) - residual_stream(model, batch, 3)
    assert moved.abs().max() < 1e-12 and (passes.keys(3) - keys_before).abs().max() > 1e-3  # the updates told
    with torch.no_grad():
        for weight, original in weights:
            weight.copy_(original)


def test_null_space_update_leaves_preserved_keys_alone():
    """With C from keys in a rank-40 subspace of 64 dims, P spans the other 24: an update through P gives
    those keys (and C itself) no change, for MEMIT's batch update and for ROME's rank-one update."""
    c = second_moment(64, rank=40, seed=3)
    projector = null_space_projector(c, threshold=1e-3)
    assert torch.linalg.matrix_rank(projector) == 24 and torch.allclose(projector @ projector, projector, atol=1e-10)
    g = torch.Generator().manual_seed(4)
    keys, residuals = (
        torch.randn(3, 64, generator=g, dtype=torch.float64),
        torch.randn(3, 8, generator=g, dtype=torch.float64),
    )
    u, v = null_space_update(projector, keys, residuals, None, l2=1e-3)
    change = delta_weight(u, v)
    assert (change @ c @ change.T).trace() < 1e-6 * (change @ change.T).trace()  # preserved keys: E‖ΔW k‖² ≈ 0
    written = keys @ change.T  # the batch's keys do get most of their residuals (up to the L2 term)
    assert torch.nn.functional.cosine_similarity(written.flatten(), residuals.flatten(), dim=0) > 0.99
    weight = torch.randn(8, 64, generator=g, dtype=torch.float64)
    rank_one = delta_weight(*rank_one_update(weight, c, keys[0], weight @ keys[0] + residuals[0], projector=projector))
    assert torch.allclose(rank_one @ keys[0], residuals[0], atol=1e-10)  # ROME still writes its pair exactly
    assert (rank_one @ c @ rank_one.T).trace() < 1e-6 * (rank_one @ rank_one.T).trace()


def test_null_space_update_with_a_covariance_weight_is_the_minimizer():
    """With full-rank keys P keeps low- but non-zero-variance directions. μ > 0 (null_space_cov_weight) gives the
    minimizer over ΔW = ΔW P of ‖ΔW K − R‖² + α‖ΔW‖² + ‖ΔW K_e‖² + μ‖ΔW C^½‖²: its gradient along P is zero, and
    what Wikipedia's keys see of the update, tr(ΔW C ΔWᵀ), falls as μ grows (float64)."""
    c = second_moment(48, seed=7)  # full rank
    projector = null_space_projector(c, threshold=0.8)
    g = torch.Generator().manual_seed(8)
    keys, residuals, earlier = (
        torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((4, 48), (4, 6), (3, 48))
    )
    alpha, outer = 0.5, earlier.T @ earlier
    leaks = []
    for mu in (0.0, 1.0, 10.0):
        change = delta_weight(*null_space_update(projector, keys, residuals, outer, alpha, c, mu))
        assert torch.allclose(change @ projector, change, atol=1e-10)  # the update lies in P's range
        gradient = ((change @ keys.T - residuals.T) @ keys + alpha * change + change @ (outer + mu * c)) @ projector
        assert gradient.abs().max() < 1e-9 * (1 + change.abs().max())
        leaks.append(float((change @ c @ change.T).trace()))
    assert leaks[0] > leaks[1] > leaks[2] > 0
    assert torch.equal(delta_weight(*null_space_update(projector, keys, residuals, outer, alpha)),
                       delta_weight(*null_space_update(projector, keys, residuals, outer, alpha, c, 0.0)))  # fmt: skip


def test_edited_keys_are_kept_by_later_null_space_edits():
    """ROME with preserve=null_space narrows P by the keys written before: a later edit cannot move them."""
    c = second_moment(64, rank=30, seed=5)
    g = torch.Generator().manual_seed(6)
    earlier = torch.randn(4, 64, generator=g, dtype=torch.float64)
    narrowed = without_keys(null_space_projector(c, 1e-3), earlier.T @ earlier)
    key, residual, weight = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((64,), (8,), (8, 64)))
    change = delta_weight(*rank_one_update(weight, c, key, weight @ key + residual, projector=narrowed))
    assert torch.allclose(change @ key, residual, atol=1e-9) and (change @ earlier.T).abs().max() < 1e-9
    # MEMIT's AlphaEdit update carries them softly: far less change on them than without carrying
    keys, residuals = (
        torch.randn(3, 64, generator=g, dtype=torch.float64),
        torch.randn(3, 8, generator=g, dtype=torch.float64),
    )
    projector = null_space_projector(c, 1e-3)
    carried = delta_weight(*null_space_update(projector, keys, residuals, 1e3 * earlier.T @ earlier, l2=1e-2))
    free = delta_weight(*null_space_update(projector, keys, residuals, None, l2=1e-2))
    assert (carried @ earlier.T).norm() < 0.05 * (free @ earlier.T).norm()


def test_memit_keeping_the_edited_keys_is_the_minimizer_and_keeps_them(tiny):
    """preserve=edited: U = (λC + KKᵀ + K_e K_eᵀ)⁻¹K is the minimizer of ‖ΔW K − R‖² + ‖ΔW K_e‖² + λ‖ΔW C^½‖²
    (gradient zero, float64), and moves the earlier keys' outputs far less than plain MEMIT; through
    memit.edit, two batches of one call with preserve=edited carry the first batch's keys into the second's
    write, and ROME refuses the option in one line."""
    c = second_moment(48, seed=9)
    g = torch.Generator().manual_seed(10)
    keys, residuals, earlier = (
        torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((4, 48), (4, 6), (30, 48))
    )
    weight, outer = 2.0, earlier.T @ earlier
    kept = delta_weight(*memit_update(c, keys, residuals, weight, outer))
    gradient = (kept @ keys.T - residuals.T) @ keys + kept @ outer + weight * kept @ c
    assert gradient.abs().max() < 1e-9 * (1 + kept.abs().max())
    plain = delta_weight(*memit_update(c, keys, residuals, weight))
    assert (kept @ earlier.T).norm() < 0.2 * (plain @ earlier.T).norm()
    assert torch.equal(plain, delta_weight(*memit_update(c, keys, residuals, weight, None)))
    model, tokenizer = tiny
    stats = {1: second_moment(128, seed=11), 2: second_moment(128, seed=12)}
    hp = {"layers": [1, 2], "v_num_grad_steps": 3, "context_templates": TEMPLATES, "mom2_update_weight": 1.0}
    made = {}
    for preserve in ("none", "edited"):
        carried = {}
        made[preserve] = memit.edit(model, tokenizer, FACTS, stats, {**hp, "preserve": preserve}, batch_size=2,
                                    edited_outer=carried)  # fmt: skip
        revert_edits(model, made[preserve].backup)
        assert sorted(carried) == [1, 2] and all(torch.linalg.matrix_rank(o) == 3 for o in carried.values())
    first, second = slice(0, 2), slice(2, 4)  # one edit per layer of each batch
    assert all(torch.equal(a.u, b.u) for a, b in zip(made["none"][first], made["edited"][first]))
    assert all(not torch.allclose(a.u, b.u) for a, b in zip(made["none"][second], made["edited"][second]))
    with pytest.raises(FacteditError, match="preserve=edited is MEMIT's"):
        edit(model, tokenizer, FACTS[0], stats=stats[1], hparams={"layer": 1, "preserve": "edited"})


def test_carrying_targets_writes_earlier_facts_again_and_resumes_from_saved_edits(tiny, tmp_path):
    """carry=targets: at one layer, where the earlier facts' keys cannot move, it is carry=keys (their rows'
    residuals are 0, so K_e K_eᵀ joins the same system): the same ΔW in float64. Over two layers the earlier facts'
    keys at the second move with the later batch's edit of the first, and are read again there: the rows written
    again hold the values first written − what the moved keys give. A second call given the first call's edits
    back from a saved file (a resumed run) makes the edits of one call, bit for bit."""
    from factedit import apply_edits, load_edits, save_edits
    from factedit.memit.passes import LayerPasses
    from factedit.rome.context import context_templates
    from factedit.rome.edits import WeightBackup

    model, tokenizer = tiny
    stats = {1: second_moment(128, seed=11), 2: second_moment(128, seed=12)}
    hp = {"v_num_grad_steps": 3, "context_templates": TEMPLATES, "preserve": "null_space", "null_space_threshold": 1.5,
          "null_space_l2": 0.1}  # fmt: skip

    def write(layers, carry, facts=FACTS, earlier=()):
        options = {**hp, "layers": layers, "carry": carry}
        return memit.edit(model, tokenizer, facts, stats, options, batch_size=min(2, len(facts)), earlier=earlier)

    single = {}
    for carry in ("keys", "targets"):
        single[carry] = write([1], carry)
        revert_edits(model, single[carry].backup)
    keys_delta, targets_delta = (delta_weight(single[c][1].u, single[c][1].v) for c in ("keys", "targets"))
    assert single["targets"][1].u.shape[1] == 3 and single["targets"][1].info["written_again"] == 2
    assert torch.allclose(targets_delta, keys_delta, rtol=0, atol=1e-9 * keys_delta.abs().max())

    # two layers: the second batch's edit of layer 2 writes the first batch's facts again, on their keys read after
    # the second batch's edit of layer 1: its V holds their residuals, the values first written − what they give now
    whole = write([1, 2], "targets")
    revert_edits(model, whole.backup)
    backup = WeightBackup()
    apply_edits(model, whole[:3], backup)  # the weights the last update (batch 2, layer 2) was made on
    passes = LayerPasses(model, value_batch(tokenizer, FACTS[:2], context_templates(model, tokenizer, TEMPLATES)))
    passes.keys(1)
    keys_now = passes.keys(2)
    moved = (keys_now - whole[1].key).norm() / whole[1].key.norm()
    expected = whole[1].target_value - keys_now @ as_out_in(model, rewrite_weight(model, 2)).T
    revert_edits(model, backup)
    assert moved > 1e-4 and whole[3].u.shape[1] == 3  # their keys moved; one new fact and two written again
    assert torch.allclose(whole[3].v[:, 1:].T, expected, rtol=0, atol=1e-10 * expected.abs().max())

    # resumed: the first batch's edits saved and loaded, then the second batch given them
    begun = write([1, 2], "targets", FACTS[:2])
    save_edits(tmp_path / "run.safetensors", begun, base_fingerprint="x", model_name="tiny_llama")
    loaded, _ = load_edits(tmp_path / "run.safetensors")
    rest = write([1, 2], "targets", FACTS[2:], earlier=loaded)
    revert_edits(model, rest.backup)
    revert_edits(model, begun.backup)
    assert all(torch.equal(a.u, b.u) and torch.equal(a.v, b.v) for a, b in zip(whole[2:], rest))


def test_earlier_targets_keep_the_latest_write_of_a_fact_and_one_layer_range(tiny):
    """A fact written again later (the same subject and prompt) is written again with its latest value only;
    earlier edits of another layer range, ROME edits, and carry=targets without preserve are each one line."""
    from factedit.memit.memit import earlier_targets

    model, tokenizer = tiny
    stats = {1: second_moment(128, seed=11), 2: second_moment(128, seed=12)}
    hp = {"v_num_grad_steps": 3, "context_templates": TEMPLATES, "layers": [1, 2], "preserve": "null_space",
          "null_space_threshold": 1.5, "carry": "targets"}  # fmt: skip
    made = memit.edit(model, tokenizer, FACTS, stats, hp, batch_size=2)
    revert_edits(model, made.backup)
    again = Fact(subject="Eiffel Tower", prompt="{} is located in the city of", target_new="Berlin")
    facts, values = earlier_targets(made, [1, 2], [again])
    assert [f.subject for f in facts] == ["Colosseum", "Louvre"]
    assert torch.equal(values[2], torch.cat([made[1].target_value[1:], made[3].target_value]).double())
    facts, _ = earlier_targets(
        made, [1, 2], [Fact(subject="Louvre", prompt="The {} is a museum in", target_new="Oslo")]
    )
    assert [f.subject for f in facts] == ["Eiffel Tower", "Colosseum"]
    with pytest.raises(FacteditError, match=r"layers \[1, 2\], this one into \[1, 2, 3\]"):
        earlier_targets(made, [1, 2, 3], [again])
    rome = edit(model, tokenizer, FACTS[0], stats={1: stats[1]}, hparams={"layer": 1, "v_num_grad_steps": 2})
    revert_edits(model, rome.backup)
    with pytest.raises(FacteditError, match="not MEMIT batch edits"):
        earlier_targets(rome, [1], [again])
    with pytest.raises(FacteditError, match="carry=targets keeps a run's earlier edits"):
        MemitHparams(carry="targets")


def test_two_facts_with_one_prompt_and_two_objects_are_refused(tiny):
    model, tokenizer = tiny
    other = Fact(subject="Eiffel Tower", prompt="{} is located in the city of", target_new="Madrid")
    with pytest.raises(FacteditError, match="two new objects"):
        memit.edit(model, tokenizer, [FACTS[0], other], stats={1: torch.eye(128)}, hparams={"layers": [1]})


def test_null_space_threshold_that_leaves_nothing_is_one_line(tiny):
    with pytest.raises(FacteditError, match="leaves no null space: raise it"):
        null_space_projector(torch.eye(16, dtype=torch.float64), 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_memit_batch_fit_under_cuda_graphs_equals_eager():
    """A batch of facts fitted as one replayed CUDA graph gives the eager fit's steps, losses and edits
    (float32 without TF32; Adam's capturable form rounds differently). The random model sits near NLL
    10.5-11, so a threshold of 10.7 stops one fact after its first step while the others run on."""
    model, tokenizer = load_model("tiny_llama", device="cuda")
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # a random tiny model's loss barely feels δ otherwise
    stats = {layer: torch.eye(128, dtype=torch.float64, device="cuda") for layer in (1, 2)}
    results = []
    for graphed in (False, True):
        hparams = dict(layers=[1, 2], context_templates=TEMPLATES, v_num_grad_steps=12, loss_threshold=10.7,
                       tf32=False, bf16=False, cuda_graph=graphed, graph_cache=0)  # fmt: skip
        edits = memit.edit(model, tokenizer, FACTS, stats=stats, hparams=hparams)
        results.append(([e.info["v_steps"] for e in edits], [delta_weight(e.u, e.v) for e in edits]))
        revert_edits(model, edits.backup)
    torch.cuda.synchronize()
    (eager_steps, eager_deltas), (graph_steps, graph_deltas) = results
    assert eager_steps == graph_steps and len(set(eager_steps[0])) > 1, eager_steps  # stopped at different steps
    for eager, graphed in zip(eager_deltas, graph_deltas):
        error = ((graphed - eager).norm() / eager.norm()).item()
        assert error < 1e-3, error

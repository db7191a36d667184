"""spectra_lens.interventions on the real forward pass of tiny models of every architecture family.

Ground truth is TransformerLens's own `hook_pattern` / `hook_attn_scores` (which equal the HF
model's attentions), never a recomputation by the library under test.
"""

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from spectra_lens.capture import MetricCapture, attached, count_hooks
from spectra_lens.errors import SpectraError
from spectra_lens.interventions import (
    KeyScale,
    LogitScale,
    QueryRotate,
    QueryScale,
    repeat_for_alphas,
)
from spectra_lens.layout import hook_name
from spectra_lens.metrics import causal_mask, rescale_pattern
from spectra_lens.testing import FAMILIES, effective_q
from spectra_lens.validate import check_alpha

ALPHA = 2.5
HEAD = 1
GQA_FAMILIES = ("llama_gqa", "qwen3")
QK_NORM_FAMILIES = ("qwen3", "gemma3")


def _run(model, tokens, *items, layout=None):
    """(logits, {layer: pattern}, {layer: scores}) of one no-grad forward pass with `items`.

    The savers are attached after `items`, so they see the patterns the model really used.
    """
    n_layers = model.cfg.n_layers
    patterns: dict[int, torch.Tensor] = {}
    scores: dict[int, torch.Tensor] = {}

    def saver(store, layer):
        def save(x, hook):
            store[layer] = x.detach().clone()

        return save

    savers = [(hook_name(l, "pattern"), saver(patterns, l)) for l in range(n_layers)]
    savers += [(hook_name(l, "attn_scores"), saver(scores, l)) for l in range(n_layers)]
    with torch.no_grad(), attached(model, *items, *savers, layout=layout):
        logits = model(tokens, return_type="logits")
    return logits, patterns, scores


def _predicted(layout, layer, base_p, base_s, alpha):
    """softmax(α·s) of the unscaled run's masked scores (log p where the scores hook is not s)."""
    if not layout.scores_faithful:  # OPT: hook_attn_scores does not hold the logits (see layout)
        return rescale_pattern(base_p[layer], alpha)
    n = base_s[layer].shape[-1]
    s = base_s[layer].float().masked_fill(~causal_mask(n), float("-inf"))
    return torch.softmax(alpha * s, dim=-1)


def _others(layout, heads):
    return [h for h in range(layout.n_heads) if h not in heads]


# --------------------------------------------------------------------------- query scaling


@pytest.mark.parametrize("family", FAMILIES)
def test_query_scale_changes_one_head_as_softmax_of_scaled_scores_predicts(tiny, tokens, family):
    model, layout = tiny(family)
    base_logits, base_p, base_s = _run(model, tokens)
    others = _others(layout, [HEAD])
    for layer in range(layout.n_layers):
        logits, p, _ = _run(model, tokens, QueryScale(layer, HEAD, ALPHA))
        predicted = _predicted(layout, layer, base_p, base_s, ALPHA)
        got = p[layer][:, HEAD]
        assert (got - base_p[layer][:, HEAD]).abs().max() > 1e-2, "the scaled head did not change"
        if layout.q_bilinear[layer]:
            assert_close(got, predicted[:, HEAD], atol=1e-5, rtol=0)
        else:  # ALiBi / soft-capping: scaling q is not scaling the logits
            assert (got - predicted[:, HEAD]).abs().max() > 1e-4
        # other heads of the layer and earlier layers are untouched ...
        assert_close(p[layer][:, others], base_p[layer][:, others], atol=1e-6, rtol=0)
        for earlier in range(layer):
            assert_close(p[earlier], base_p[earlier], atol=1e-6, rtol=0)
        # ... and the edit reaches later layers and the output
        for later in range(layer + 1, layout.n_layers):
            assert (p[later] - base_p[later]).abs().max() > 1e-4
        assert (logits - base_logits).abs().max() > 1e-4


@pytest.mark.parametrize("family", QK_NORM_FAMILIES)
def test_query_scale_is_visible_under_qk_norm_but_scaling_hook_q_is_not(tiny, tokens, family):
    model, layout = tiny(family)
    assert layout.q_kind == "rot_q"
    _, base_p, _ = _run(model, tokens)
    layer = 1

    def scale_plain_q(x, hook):  # hook_q is [batch, pos, head, d_head], before QK-norm
        out = x.clone()
        out[:, :, HEAD] = out[:, :, HEAD] * ALPHA
        return out

    _, p_plain, _ = _run(model, tokens, (hook_name(layer, "q"), scale_plain_q))
    _, p_eff, _ = _run(model, tokens, QueryScale(layer, HEAD, ALPHA))
    change_plain = (p_plain[layer][:, HEAD] - base_p[layer][:, HEAD]).abs().max()
    change_eff = (p_eff[layer][:, HEAD] - base_p[layer][:, HEAD]).abs().max()
    assert change_plain < 1e-4, "QK-norm should undo a scaling of hook_q"
    assert change_eff > 1e-2


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "qwen3"])
def test_query_scale_positions_only_change_those_query_rows(tiny, tokens, family):
    model, layout = tiny(family)
    _, base_p, base_s = _run(model, tokens)
    layer, positions = 1, (3, 7)
    _, p, _ = _run(model, tokens, QueryScale(layer, HEAD, ALPHA, positions=positions))
    predicted = _predicted(layout, layer, base_p, base_s, ALPHA)
    rows = list(positions)
    rest = [i for i in range(tokens.shape[1]) if i not in positions]
    assert_close(p[layer][:, HEAD, rows], predicted[:, HEAD, rows], atol=1e-5, rtol=0)
    assert (p[layer][:, HEAD, rows] - base_p[layer][:, HEAD, rows]).abs().max() > 1e-2
    assert_close(p[layer][:, HEAD, rest], base_p[layer][:, HEAD, rest], atol=1e-6, rtol=0)
    assert_close(p[layer][:, _others(layout, [HEAD])], base_p[layer][:, _others(layout, [HEAD])],
                 atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- key scaling


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_key_scale_changes_exactly_the_query_heads_of_its_group(tiny, tokens, family):
    model, layout = tiny(family)
    assert layout.n_kv_heads < layout.n_heads
    _, base_p, base_s = _run(model, tokens)
    for layer in range(layout.n_layers):
        predicted = _predicted(layout, layer, base_p, base_s, ALPHA)
        for kv in range(layout.n_kv_heads):
            ks = KeyScale(layer, kv, ALPHA)
            group = list(ks.affected_heads(layout))
            assert group == [h for h in range(layout.n_heads) if h // layout.group_size == kv]
            _, p, _ = _run(model, tokens, ks)
            assert layout.k_bilinear[layer]
            assert_close(p[layer][:, group], predicted[:, group], atol=1e-5, rtol=0)
            assert (p[layer][:, group] - base_p[layer][:, group]).abs().max() > 1e-2
            rest = _others(layout, group)
            assert_close(p[layer][:, rest], base_p[layer][:, rest], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "family", [f for f in FAMILIES if f not in GQA_FAMILIES + ("gemma3", "gemma2", "bloom")]
)
def test_key_scale_equals_query_scale_without_grouping(tiny, tokens, family):
    model, layout = tiny(family)
    assert layout.n_kv_heads == layout.n_heads and all(layout.q_bilinear) and all(layout.k_bilinear)
    for layer in range(layout.n_layers):
        q_logits, q_p, _ = _run(model, tokens, QueryScale(layer, HEAD, ALPHA))
        k_logits, k_p, _ = _run(model, tokens, KeyScale(layer, HEAD, ALPHA))
        for l in range(layout.n_layers):
            assert_close(k_p[l], q_p[l], atol=1e-5, rtol=0)
        assert_close(k_logits, q_logits, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- batched alpha


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "qwen3"])
@pytest.mark.parametrize("scale", ["query", "key", "logit"])
def test_batched_alpha_equals_separate_forward_passes(tiny, tokens, family, scale):
    model, layout = tiny(family)
    layer, alphas = 0, [0.5, 1.0, 3.0]
    make = {
        "query": lambda a: QueryScale(layer, HEAD, a),
        "key": lambda a: KeyScale(layer, layout.kv_head(HEAD), a),
        "logit": lambda a: LogitScale(layer, HEAD, a),
    }[scale]
    batched_tokens, alpha_rows = repeat_for_alphas(tokens, alphas)
    b = tokens.shape[0]
    assert torch.equal(batched_tokens, tokens.repeat(len(alphas), 1))
    assert alpha_rows.tolist() == [a for a in alphas for _ in range(b)]
    logits, p, _ = _run(model, batched_tokens, make(alpha_rows))
    for i, a in enumerate(alphas):
        rows = slice(i * b, (i + 1) * b)
        ref_logits, ref_p, _ = _run(model, tokens, make(a))
        assert_close(logits[rows], ref_logits, atol=1e-5, rtol=1e-5)
        for l in range(layout.n_layers):
            assert_close(p[l][rows], ref_p[l], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- logit scaling


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_scale_equals_softmax_of_alpha_log_p(tiny, tokens, family):
    model, layout = tiny(family)
    if not layout.pattern_editable:  # OPT in TL 4.3: hook_pattern is observed, not used
        with pytest.raises(SpectraError, match="observe-only"):
            with attached(model, LogitScale(0, HEAD, ALPHA)):
                pass
        assert count_hooks(model) == 0
        return
    base_logits, base_p, _ = _run(model, tokens)
    for layer in range(layout.n_layers):
        logits, p, _ = _run(model, tokens, LogitScale(layer, HEAD, ALPHA))
        expected = torch.softmax(ALPHA * torch.log(base_p[layer][:, HEAD]), dim=-1)
        assert_close(p[layer][:, HEAD], expected, atol=1e-6, rtol=0)
        others = _others(layout, [HEAD])
        assert_close(p[layer][:, others], base_p[layer][:, others], atol=1e-6, rtol=0)
        assert (logits - base_logits).abs().max() > 1e-4, "the edited pattern must reach the output"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: QueryScale(2, 0, 2.0), r"layer must be an int in \[0, 2\), got 2"),
        (lambda: QueryScale(-1, 0, 2.0), r"layer must be an int in \[0, 2\), got -1"),
        (lambda: QueryScale(0, 4, 2.0), r"head must be an int in \[0, 4\), got 4"),
        (lambda: QueryScale(0, -1, 2.0), r"head must be an int in \[0, 4\), got -1"),
        (lambda: LogitScale(0, 7, 2.0), r"head must be an int in \[0, 4\), got 7"),
        (lambda: KeyScale(0, 2, 2.0), r"kv head must be in \[0, 2\), got 2"),
        (lambda: KeyScale(5, 0, 2.0), r"layer must be an int in \[0, 2\), got 5"),
        (lambda: QueryScale(0, 0, 0.0), r"alpha must be finite and > 0, got 0.0"),
        (lambda: QueryScale(0, 0, -1.5), r"alpha must be finite and > 0, got -1.5"),
        (lambda: QueryScale(0, 0, float("nan")), r"alpha must be finite and > 0, got nan"),
        (lambda: QueryScale(0, 0, float("inf")), r"alpha must be finite and > 0, got inf"),
        (lambda: QueryScale(0, 0, torch.tensor([1.0, 0.0])),
         r"alpha must be finite and > 0, got \[1.0, 0.0\]"),
        (lambda: QueryScale(0, 0, torch.tensor([[1.0]])), r"1-D and non-empty, got shape \(1, 1\)"),
        (lambda: QueryScale(0, 0, torch.tensor([])), r"1-D and non-empty, got shape \(0,\)"),
    ],
    ids=["layer-high", "layer-negative", "head-high", "head-negative", "logit-head", "kv-head",
         "key-layer", "alpha-zero", "alpha-negative", "alpha-nan", "alpha-inf",
         "alpha-row-zero", "alpha-2d", "alpha-empty"],
)
def test_bad_scaling_arguments_raise_before_any_forward(tiny, make, match):
    model, _ = tiny("llama_gqa")
    with pytest.raises(SpectraError, match=match):
        with attached(model, make()):
            pytest.fail("the body must not run")
    assert count_hooks(model) == 0


@pytest.mark.parametrize(
    "bad, match",
    [
        (True, "must be a number or a 1-D tensor, got bool"),
        (False, "must be a number or a 1-D tensor, got bool"),
        ("2", "must be a number or a 1-D tensor, got str"),
        (None, "must be a number or a 1-D tensor, got NoneType"),
        ([1.0], "must be a number or a 1-D tensor, got list"),
        (-0.0, "must be finite and > 0, got -0.0"),
    ],
)
def test_check_alpha_rejects_non_numbers(bad, match):
    # What QueryScale/KeyScale/LogitScale.hooks() run on their alpha. (Constructing them with a
    # bool is also refused by beartype in the test suite, before check_alpha is reached.)
    with pytest.raises(SpectraError, match="alpha " + match):
        check_alpha(bad)


def test_alpha_grid_errors(tokens):
    with pytest.raises(SpectraError, match="at least 1 value, got an empty grid"):
        repeat_for_alphas(tokens, [])
    with pytest.raises(SpectraError, match=r"every alpha must be finite and > 0 .*got \[-2.0\]"):
        repeat_for_alphas(tokens, [1.0, -2.0])
    with pytest.raises(SpectraError, match="every alpha must be finite"):
        repeat_for_alphas(tokens, torch.tensor([1.0, float("nan")]))
    with pytest.raises(SpectraError, match="distinct"):
        repeat_for_alphas(tokens, [2.0, 2.0])
    rows, row_alpha = repeat_for_alphas(tokens, [2.0, 0.5])  # copy i runs with alphas[i], unsorted
    assert row_alpha.tolist() == [2.0] * tokens.shape[0] + [0.5] * tokens.shape[0]
    assert torch.equal(rows, tokens.repeat(2, 1))


def test_alpha_rows_must_match_the_batch(tiny, tokens):
    model, _ = tiny("llama_gqa")
    with pytest.raises(SpectraError, match=r"one alpha per batch row expected \(2\), got 3"):
        with torch.no_grad(), attached(model, QueryScale(0, 0, torch.tensor([1.0, 2.0, 3.0]))):
            model(tokens)
    assert count_hooks(model) == 0


@pytest.mark.parametrize(
    "make, field, value, match",
    [
        (lambda: QueryScale(0, HEAD, 2.0), "n_heads", 8,
         r"blocks\.0\.attn\.hook_rot_q: expected \[batch pos head d_head\] = "
         r"\('\?', '\?', 8, 16\), "
         r"got \(2, 10, 4, 16\)"),
        (lambda: KeyScale(0, 0, 2.0), "n_kv_heads", 4,
         r"blocks\.0\.attn\.hook_rot_k: expected \[batch pos kv_head d_head\] = "
         r"\('\?', '\?', 4, 16\), "
         r"got \(2, 10, 2, 16\)"),
        (lambda: LogitScale(1, HEAD, 2.0), "n_heads", 8,
         r"blocks\.1\.attn\.hook_pattern: expected \[batch head query_pos key_pos\] = "
         r"\('\?', 8, '\?', '\?'\), got \(2, 4, 10, 10\)"),
        (None, "d_head", 32, r"blocks\.0\.attn\.hook_rot_q: expected .* = \('\?', '\?', 4, 32\), "
         r"got \(2, 10, 4, 16\)"),
    ],
    ids=["query-n_heads", "key-n_kv_heads", "logit-n_heads", "capture-d_head"],
)
def test_hook_tensor_of_unexpected_shape_raises(tiny, tokens, make, field, value, match):
    model, layout = tiny("llama_gqa")
    wrong = dataclasses.replace(layout, **{field: value})
    item = MetricCapture(wrong) if make is None else make()
    with pytest.raises(SpectraError, match=match):
        with torch.no_grad(), attached(model, item, layout=wrong):
            model(tokens)
    assert count_hooks(model) == 0


def test_alpha_outside_float32_is_refused():
    """Case 7: α below ~1e-45 rounds to 0 in float32 (a uniform pattern, not a small scale)."""
    for bad in (1e-46, 1e-40, 1e39):
        with pytest.raises(SpectraError, match="float32"):
            check_alpha(bad)
        with pytest.raises(SpectraError, match="float32|finite and > 0"):  # 1e-46 is 0 in float32
            repeat_for_alphas(torch.ones(1, 2, dtype=torch.long), [1.0, bad])


# --------------------------------------------------------------------------- rotation


@pytest.fixture
def toks() -> torch.Tensor:
    return torch.randint(1, 97, (8, 12), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("family", ["llama_gqa", "neox", "qwen3", "gpt2"])
def test_rotation_keeps_the_query_norm_and_turns_by_the_angle(tiny, toks, family):
    model, layout = tiny(family)
    layer, head, angle = 1, 2, 0.6
    q0 = effective_q(model, layout, toks, layer)
    q1 = effective_q(model, layout, toks, layer, QueryRotate(layer, head, angle, seed=3))
    n0, n1 = q0[:, :, head].double().norm(dim=-1), q1[:, :, head].double().norm(dim=-1)
    assert (n1 - n0).abs().max() < 1e-6 * max(1.0, float(n0.max()))
    cos = (q0[:, :, head].double() * q1[:, :, head].double()).sum(-1) / (n0 * n1)
    torch.testing.assert_close(torch.arccos(cos.clamp(-1, 1)), torch.full_like(cos, angle), atol=1e-3, rtol=0)
    others = [h for h in range(layout.n_heads) if h != head]
    assert torch.equal(q0[:, :, others], q1[:, :, others])
    # angle 0 is the identity; a per-row angle tensor equals separate passes
    assert torch.equal(effective_q(model, layout, toks, layer, QueryRotate(layer, head, 0.0)), q0)
    two = toks[:2]
    batched = effective_q(model, layout, two, layer, QueryRotate(layer, head, torch.tensor([0.3, 0.9]), seed=3))
    for i, a in enumerate((0.3, 0.9)):
        single = effective_q(model, layout, two, layer, QueryRotate(layer, head, a, seed=3))
        torch.testing.assert_close(batched[i], single[i], atol=1e-6, rtol=1e-6)
    assert count_hooks(model) == 0


def test_rotation_rejects_bad_angles(tiny, toks):
    model, layout = tiny("gpt2")
    for bad in (-0.1, 4.0, float("nan")):
        with pytest.raises(SpectraError, match="angle"):
            QueryRotate(0, 0, bad).hooks(layout)
    with pytest.raises(SpectraError, match="head"):
        QueryRotate(0, layout.n_heads, 0.1).hooks(layout)

"""spectra_lens.capture on the real forward pass of tiny models of every architecture family.

Ground truth is TransformerLens's own `hook_pattern` / `hook_attn_scores` (which equal the HF
model's attentions), never a recomputation by the library under test.
"""


import pytest
import torch
from torch.testing import assert_close

from spectra_lens.capture import (
    METRIC_NAMES,
    MetricCapture,
    attached,
    capture_metrics,
    count_hooks,
)
from spectra_lens.errors import SpectraError
from spectra_lens.interventions import KeyScale, QueryScale, repeat_for_alphas
from spectra_lens.layout import hook_name
from spectra_lens.metrics import causal_mask
from spectra_lens.testing import FAMILIES

ALPHA = 2.5
HEAD = 1
GQA_FAMILIES = ("llama_gqa", "qwen3")
QK_NORM_FAMILIES = ("qwen3", "gemma3")


def _hand_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.double()
    return -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0).sum(-1)


# --------------------------------------------------------------------------- capture


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_metrics_equal_hand_computation_from_hook_pattern(tiny, tokens, family):
    model, layout = tiny(family)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    tm = capture_metrics(model, tokens, patterns_for=[(1, 2)])
    n = tokens.shape[1]
    visible = causal_mask(n)
    for l in range(layout.n_layers):
        p = cache[hook_name(l, "pattern")]
        H = _hand_entropy(p)
        assert_close(tm.entropy[:, l].double(), H, atol=1e-5, rtol=0)
        assert_close(tm.max_attn[:, l], p.float().amax(-1), atol=1e-5, rtol=0)
        assert_close(tm.k_eff_exp[:, l].double(), H.exp(), atol=1e-4, rtol=1e-5)
        assert_close(tm.k_eff_pr[:, l], 1 / (p.float() ** 2).sum(-1), atol=1e-4, rtol=1e-5)
        assert_close(tm.sink_mass[:, l], p[..., 0].float(), atol=1e-6, rtol=0)
        assert_close(tm.entropy_norm[:, l, :, 1:].double(),
                     H[..., 1:] / torch.arange(2, n + 1).double().log(), atol=1e-5, rtol=0)
        assert torch.isnan(tm.entropy_norm[:, l, :, 0]).all()  # the first query sees one key
        # local gain: -Var_p(s) of the model's own logits (log p: the same up to a row shift)
        s = cache[hook_name(l, "attn_scores")] if layout.scores_faithful else torch.log(p)
        s = s.double().masked_fill(~visible, 0.0)
        mean = (p * s).sum(-1, keepdim=True)
        gain = -(p * (s - mean) ** 2).sum(-1)
        assert_close(tm.local_gain[:, l].double(), gain, atol=1e-5, rtol=1e-4)

        # norms of the hooks the layout names; k_norm through the h // group_size map
        q = cache[layout.q_hook(l)]
        assert_close(tm.q_norm[:, l], q.norm(dim=-1).transpose(1, 2), atol=1e-6, rtol=1e-6)
        k = cache[layout.k_hook(l)]
        assert_close(tm.k_norm[:, l], k.norm(dim=-1)[:, :, layout.kv_index()].transpose(1, 2),
                     atol=1e-6, rtol=1e-6)

        if layout.q_kind == "rot_q":  # rotary is a rotation: the norm before it is the same
            if hook_name(l, "q_normed") in cache:  # QK-norm: [batch, head, pos, d_head]
                pre_q = cache[hook_name(l, "q_normed")].transpose(1, 2)
                pre_k = cache[hook_name(l, "k_normed")].transpose(1, 2)
            else:
                pre_q, pre_k = cache[hook_name(l, "q")], cache[hook_name(l, "k")]
            assert_close(pre_q.norm(dim=-1), q.norm(dim=-1), atol=1e-5, rtol=1e-5)
            assert_close(pre_k.norm(dim=-1), k.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert_close(tm.patterns[(1, 2)], cache[hook_name(1, "pattern")][:, 2])
    # the effective query is the rotated one wherever the bridge exposes it
    assert (layout.q_kind == "rot_q") == (hook_name(0, "rot_q") in cache)


def test_k_norm_uses_repeat_interleave_grouping(tiny, tokens):
    model, layout = tiny("llama_gqa")
    assert (layout.n_heads, layout.n_kv_heads) == (4, 2)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    tm = capture_metrics(model, tokens)
    for l in range(layout.n_layers):
        kn = cache[hook_name(l, "rot_k")].norm(dim=-1)  # [batch, pos, kv_head]
        expected = torch.stack([kn[..., 0], kn[..., 0], kn[..., 1], kn[..., 1]], dim=1)
        modulo_bug = torch.stack([kn[..., 0], kn[..., 1], kn[..., 0], kn[..., 1]], dim=1)
        assert_close(tm.k_norm[:, l], expected)
        assert not torch.allclose(tm.k_norm[:, l], modulo_bug)  # the test can tell them apart


def test_capture_with_a_subset_of_layers_and_to_frame(tiny, tokens):
    model, layout = tiny("gpt2")
    tm = capture_metrics(model, tokens, layers=[1])
    full = capture_metrics(model, tokens)
    assert tm.layers == (1,)
    assert tm.entropy.shape == (2, 1, layout.n_heads, tokens.shape[1])
    assert_close(tm.entropy[:, 0], full.entropy[:, 1])
    assert_close(tm.head(1, 3)["max_attn"], full.max_attn[:, 1, 3])
    frame = full.to_frame(shard=0)
    assert len(frame) == full.entropy.numel()
    columns = {"shard", "sequence", "layer", "head", "position", "entropy", "k_eff_top90"}
    assert columns <= set(frame.columns)
    assert "TokenMetrics" in repr(full) and "(2, 2, 4, 10)" in repr(full)


def test_metric_capture_is_reusable(tiny, tokens):
    model, layout = tiny("llama_gqa")
    cap = MetricCapture(layout)
    with torch.no_grad(), attached(model, cap):
        model(tokens)
    first = cap.result()
    with torch.no_grad(), attached(model, cap):
        model(tokens[:1])
    second = cap.result()
    assert second.entropy.shape[0] == 1
    assert_close(second.entropy[0], first.entropy[0])


def test_capture_results_follow_the_layer_order_and_own_their_memory(tiny, tokens):
    """The pass's metrics are written layer by layer into one tensor per metric: in the order
    of `layers`, and a result is not overwritten by the capture's next pass."""
    model, layout = tiny("llama_gqa")
    every = MetricCapture(layout).run(model, tokens)
    cap = MetricCapture(layout, layers=[1, 0])
    first = cap.run(model, tokens)
    kept = {n: first.metric(n).clone() for n in METRIC_NAMES}
    for name in METRIC_NAMES:
        assert_close(first.metric(name), every.metric(name)[:, [1, 0]], rtol=0, atol=0, equal_nan=True)
    second = cap.run(model, tokens.flip(1))
    assert not torch.equal(second.entropy, first.entropy)
    for name in METRIC_NAMES:
        assert_close(first.metric(name), kept[name], rtol=0, atol=0, equal_nan=True)
    with pytest.raises(SpectraError, match="must not repeat"):
        MetricCapture(layout, layers=[0, 1, 0])


def test_a_pass_of_another_shape_forgets_the_layers_of_a_failed_pass(tiny, tokens):
    """A pass that fails after every layer was captured, then a pass of another batch size that
    fails before the last layer: `result()` refuses (the last layer belongs to the first pass,
    whose tensors the second pass replaced), rather than returning unwritten memory."""
    model, layout = tiny("llama_gqa")
    last = layout.n_layers - 1

    class Stop(Exception):
        pass

    def stop(x, hook):
        raise Stop

    cap = MetricCapture(layout)
    with pytest.raises(Stop), torch.no_grad(), attached(model, cap, ("unembed.hook_in", stop)):
        model(tokens)
    with pytest.raises(Stop), torch.no_grad(), attached(model, (hook_name(last, "pattern"), stop), cap):
        model(tokens[:1])
    with pytest.raises(SpectraError, match=rf"no forward pass reached layers \[{last}\]"):
        cap.result()


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "qwen3", "gemma2", "bloom"])
@pytest.mark.parametrize("padded", [False, True])
def test_run_ends_the_pass_at_the_last_pattern_with_the_values_of_a_full_pass(tiny, tokens, family, padded):
    """MetricCapture.run stops after the last captured layer's pattern (no MLP of that layer, no
    unembedding), gives exactly the metrics and patterns of a whole forward pass, and leaves the
    model as it was."""
    model, layout = tiny(family)
    last = layout.n_layers - 1
    batch, mask = _padded(tokens, 3, "left") if padded else (tokens, None)
    mask = None if mask is None else mask.bool()
    before = model(batch, return_type="logits", attention_mask=None if mask is None else mask.long())
    fired: list[str] = []
    spies = [(name, lambda x, hook, name=name: fired.append(name))
             for name in (f"blocks.{last}.mlp.hook_in", "unembed.hook_in")]
    cap = MetricCapture(layout, patterns_for=[(last, 0)])
    cap.set_attention_mask(mask)
    short = cap.run(model, batch, interventions=spies)
    assert fired == []
    cap.set_attention_mask(mask)
    with torch.no_grad(), attached(model, *spies, cap):
        model(batch, return_type="logits", attention_mask=None if mask is None else mask.long())
    full = cap.result()
    assert sorted(fired) == sorted(name for name, _ in spies)
    for name in METRIC_NAMES:
        assert_close(short.metric(name), full.metric(name), rtol=0, atol=0, equal_nan=True, msg=name)
    assert_close(short.patterns[(last, 0)], full.patterns[(last, 0)], rtol=0, atol=0)
    assert count_hooks(model) == 0
    after = model(batch, return_type="logits", attention_mask=None if mask is None else mask.long())
    assert_close(after, before, rtol=0, atol=0)


# --------------------------------------------------------------------------- hook hygiene


def _boom(x, hook):
    raise RuntimeError("boom from a hook")


def _interrupt(x, hook):
    raise KeyboardInterrupt


@pytest.mark.parametrize("family", ["llama_gqa", "opt"])
def test_no_hook_remains_after_errors(tiny, tokens, family):
    model, layout = tiny(family)
    with torch.no_grad():
        clean = model(tokens, return_type="logits")

    def items():
        return (QueryScale(0, 0, 2.0), KeyScale(1, 0, 2.0), MetricCapture(layout))

    # raised from a hook function during the forward pass
    with pytest.raises(RuntimeError, match="boom from a hook"):
        with torch.no_grad(), attached(model, *items(), (hook_name(1, "pattern"), _boom)):
            assert count_hooks(model) > 0
            model(tokens)
    assert count_hooks(model) == 0
    # raised from the body of the with-block
    with pytest.raises(ValueError, match="body"):
        with attached(model, *items()):
            assert count_hooks(model) > 0
            raise ValueError("raised in the body")
    assert count_hooks(model) == 0
    # KeyboardInterrupt, from the body and from a hook
    with pytest.raises(KeyboardInterrupt):
        with attached(model, *items()):
            raise KeyboardInterrupt
    assert count_hooks(model) == 0
    with pytest.raises(KeyboardInterrupt):
        with torch.no_grad(), attached(model, *items(), (hook_name(0, "q"), _interrupt)):
            model(tokens)
    assert count_hooks(model) == 0
    # a SpectraError while the hooks are being built attaches nothing
    with pytest.raises(SpectraError):
        with attached(model, QueryScale(0, 0, 2.0), QueryScale(0, 0, -1.0)):
            pass
    assert count_hooks(model) == 0
    with torch.no_grad():
        assert torch.equal(model(tokens, return_type="logits"), clean)


def test_nested_attached_removes_only_its_own_hooks(tiny, tokens):
    model, _ = tiny("gpt2")
    with attached(model, QueryScale(0, 0, 2.0)):
        outer = count_hooks(model)
        with attached(model, QueryScale(1, 0, 2.0), KeyScale(1, 1, 2.0)):
            assert count_hooks(model) == outer + 2
        assert count_hooks(model) == outer
    assert count_hooks(model) == 0


# --------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(2, 5),
         r"integer torch.Tensor \[batch, pos\], got Tensor of dtype torch.float32"),
        (torch.zeros(2, 5, dtype=torch.bool), r"got Tensor of dtype torch.bool"),
        ([[1, 2, 3]], r"integer torch.Tensor \[batch, pos\], got list"),
        (torch.zeros(5, dtype=torch.long), r"shape \[batch, pos\], got \(5,\)"),
        (torch.zeros(1, 2, 5, dtype=torch.long), r"shape \[batch, pos\], got \(1, 2, 5\)"),
        (torch.zeros(1, 0, dtype=torch.long), r"shape \[batch, pos\], got \(1, 0\)"),
    ],
    ids=["float", "bool", "list", "1d", "3d", "no-positions"],
)
def test_bad_tokens_raise(tiny, bad, match):
    model, _ = tiny("gpt2")
    with pytest.raises(SpectraError, match=match):
        capture_metrics(model, bad)
    with pytest.raises(SpectraError, match=match):
        repeat_for_alphas(bad, [1.0])


def test_capture_and_attach_misuse(tiny, tokens):
    model, layout = tiny("gpt2")
    with pytest.raises(SpectraError, match="at least one layer"):
        MetricCapture(layout, layers=[])
    with pytest.raises(SpectraError, match=r"layer must be an int in \[0, 2\), got 5"):
        MetricCapture(layout, layers=[5])
    with pytest.raises(SpectraError, match=r"head must be an int in \[0, 4\), got 9"):
        MetricCapture(layout, patterns_for=[(0, 9)])
    with pytest.raises(SpectraError, match="layer 0 is not captured"):
        MetricCapture(layout, layers=[1], patterns_for=[(0, 1)])
    with pytest.raises(SpectraError, match=r"top_mass must be in \(0, 1\] or None, got 0.0"):
        MetricCapture(layout, top_mass=0.0)
    with pytest.raises(SpectraError, match=r"no forward pass reached layers \[0, 1\]"):
        MetricCapture(layout).result()
    with pytest.raises(SpectraError, match=r"positions must be in \[0, 10\), got \[3, 10\]"):
        with torch.no_grad(), attached(model, QueryScale(0, 0, 2.0, positions=(3, 10))):
            model(tokens)
    with pytest.raises(SpectraError, match="no hook point named 'blocks.9.attn.hook_q'"):
        with attached(model, ("blocks.9.attn.hook_q", lambda x, hook: x)):
            pass
    with pytest.raises(SpectraError, match="expected a scaling/capture object .* got 42"):
        with attached(model, 42):
            pass
    assert count_hooks(model) == 0
    tm = capture_metrics(model, tokens, layers=[1])
    with pytest.raises(SpectraError, match="unknown metric 'entropyy'"):
        tm.metric("entropyy")
    with pytest.raises(SpectraError, match=r"layer 0 was not captured; captured layers: \(1,\)"):
        tm.head(0, 0)
    with pytest.raises(SpectraError, match="sequence_ids must have 2 entries, got 3"):
        tm.to_frame(sequence_ids=[0, 1, 2])


def test_top_mass_none_skips_only_that_metric(tiny, tokens):
    from spectra_lens.capture import METRIC_NAMES, capture_metrics

    model, _ = tiny("llama_gqa")
    full = capture_metrics(model, tokens)
    lean = capture_metrics(model, tokens, top_mass=None)
    assert torch.isnan(lean.k_eff_top90).all()
    for name in METRIC_NAMES:
        if name not in ("k_eff_top90", "k_eff_top90_nosink"):
            assert_close(getattr(full, name), getattr(lean, name), rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------- padding and context


def _padded(tokens: torch.Tensor, n_pad: int, side: str, pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """`tokens` with `n_pad` pad ids on `side`, and the mask of real tokens (1 = real)."""
    b = tokens.shape[0]
    fill = torch.full((b, n_pad), pad, dtype=tokens.dtype)
    ones, zeros = torch.ones_like(tokens), torch.zeros_like(fill)
    if side == "left":
        return torch.cat([fill, tokens], 1), torch.cat([zeros, ones], 1)
    return torch.cat([tokens, fill], 1), torch.cat([ones, zeros], 1)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "opt", "gemma2", "bloom"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_positions_are_excluded_and_real_tokens_unchanged(tiny, tokens, family, side):
    """Issue 11 case 5: with the mask, real tokens get the metrics of the unpadded batch (left
    padding included: the bridge derives position ids from the mask); padding gets NaN."""
    model, _ = tiny(family)
    ref = capture_metrics(model, tokens)
    padded, mask = _padded(tokens, 3, side)
    got = capture_metrics(model, padded, attention_mask=mask)
    real = slice(3, None) if side == "left" else slice(0, tokens.shape[1])
    pads = slice(0, 3) if side == "left" else slice(tokens.shape[1], None)
    for name in METRIC_NAMES:
        assert_close(got.metric(name)[..., real], ref.metric(name), atol=2e-5, rtol=1e-4,
                     equal_nan=True, msg=name)
        assert got.metric(name)[..., pads].isnan().all(), name
    frame, ref_frame = got.to_frame(), ref.to_frame()
    assert len(frame) == len(ref_frame) and not frame["entropy"].isna().any()
    assert (frame["position"].to_numpy() == ref_frame["position"].to_numpy()).all()
    # pad_id marks the same padding when it occurs only at the ends
    by_id = capture_metrics(model, padded, pad_id=3) if not (tokens == 3).any() else got
    assert_close(by_id.entropy, got.entropy, equal_nan=True)


def test_a_pad_id_between_real_tokens_is_refused(tiny, tokens):
    """The pad id (often EOS) also separates documents inside a sequence: not padding there."""
    model, _ = tiny("llama_gqa")
    inner = tokens.clone()
    inner[0, 4] = 3
    with pytest.raises(SpectraError, match="pad id 3 occurs between real tokens .row 0, position 4."):
        capture_metrics(model, inner, pad_id=3)
    with pytest.raises(SpectraError, match="padding between real tokens"):
        capture_metrics(model, tokens, attention_mask=torch.tensor([[1, 1, 0, 1] + [1] * 6] * 2))
    with pytest.raises(SpectraError, match="hold no real token"):
        capture_metrics(model, tokens, attention_mask=torch.zeros_like(tokens))
    with pytest.raises(SpectraError, match="shape"):
        capture_metrics(model, tokens, attention_mask=torch.ones(2, 3))
    with pytest.raises(SpectraError, match="0 .padding. and 1"):
        capture_metrics(model, tokens, attention_mask=torch.full_like(tokens, 2))


def test_a_capture_refuses_a_pass_that_attended_to_padding(tiny, tokens):
    model, layout = tiny("llama_gqa")
    padded, mask = _padded(tokens, 3, "left")  # right padding is never seen under a causal mask
    cap = MetricCapture(layout)
    cap.set_attention_mask(mask.bool())
    with pytest.raises(SpectraError, match="went to padding"), attached(model, cap):
        model(padded, return_type=None)  # the model was not given the mask
    assert count_hooks(model) == 0


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama_gqa"])
def test_tokens_beyond_the_context_are_refused(tiny, family):
    """Case 5: GPT-2/OPT failed with a bare IndexError, rotary models extrapolated silently."""
    model, _ = tiny(family)
    n_ctx = model.cfg.n_ctx
    with pytest.raises(SpectraError, match=f"exceed the model's context of {n_ctx} tokens"):
        capture_metrics(model, torch.ones(1, n_ctx + 1, dtype=torch.long))


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_first_key_excluded_metrics_and_direction_spread_from_hook_pattern(tiny, tokens, family):
    """The *_nosink metrics are those of p_j / (1 − p_0), j ≥ 1; dir_spread is the sd over
    visible keys of s_j / ‖q‖ — both recomputed by hand from the cached hooks."""
    model, layout = tiny(family)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    tm = capture_metrics(model, tokens)
    n = tokens.shape[1]
    visible = causal_mask(n)
    for l in range(layout.n_layers):
        p = cache[hook_name(l, "pattern")].double()
        rest = p[..., 1:] / (1 - p[..., :1])
        H = _hand_entropy(rest)
        assert_close(tm.entropy_nosink[:, l, :, 1:].double(), H[..., 1:], atol=1e-5, rtol=0)
        assert torch.isnan(tm.entropy_nosink[:, l, :, 0]).all()
        assert torch.isnan(tm.k_eff_top90_nosink[:, l, :, 0]).all()
        assert_close(tm.max_attn_nosink[:, l, :, 1:].double(), rest.amax(-1)[..., 1:],
                     atol=1e-5, rtol=0)
        assert_close(tm.k_eff_exp_nosink[:, l, :, 1:].double(), H[..., 1:].exp(),
                     atol=1e-4, rtol=1e-5)
        assert_close(tm.k_eff_pr_nosink[:, l, :, 1:].double(),
                     1 / (rest**2).sum(-1)[..., 1:], atol=1e-4, rtol=1e-5)
        top = (rest.sort(-1, descending=True).values.cumsum(-1) < 0.9 - 1e-6).sum(-1) + 1
        assert (tm.k_eff_top90_nosink[:, l, :, 1:].double() == top[..., 1:].double()).float().mean() > 0.99
        s = cache[hook_name(l, "attn_scores")] if layout.scores_faithful else torch.log(p)
        s = s.double().masked_fill(~visible, 0.0)
        count = visible.sum(-1).double()
        mean = s.sum(-1, keepdim=True) / count[:, None]
        sd = (((s - mean) ** 2) * visible).sum(-1).div(count).sqrt()
        q = cache[layout.q_hook(l)].double().norm(dim=-1).transpose(1, 2)
        assert_close(tm.dir_spread[:, l].double(), sd / q, atol=1e-5, rtol=1e-4)

"""spectra_lens.sweep: the fast path softmax(α·s) against real forward passes, on every family."""

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from spectra_lens import metrics as M
from spectra_lens.capture import MetricCapture, SweepCapture, attached, count_hooks
from spectra_lens.errors import SpectraError
from spectra_lens.interventions import KeyScale, QueryScale, Scan
from spectra_lens.kernels.alpha import alpha_metrics
from spectra_lens.kernels.blocked import pattern_metrics
from spectra_lens.metrics import SWEEP_METRICS
from spectra_lens.stats.inference import t_interval
from spectra_lens.sweep import (
    analytic_gain,
    head_curves,
    intervention_effects,
)
from spectra_lens.validate import check_alphas

BILINEAR = ("gpt2", "neox", "llama_gqa", "qwen3", "gemma3", "opt")
NON_BILINEAR = ("gemma2", "bloom")


def fast_sweep(*args, **kw):
    return head_curves(*args, method="fast", **kw)


def exact_head_sweep(*args, **kw):
    return head_curves(*args, method="exact", **kw)


ALPHAS = (0.25, 0.5, 0.8, 1.0, 1.25, 2.0, 4.0)


@pytest.fixture(scope="module")
def toks() -> torch.Tensor:
    return torch.randint(1, 97, (3, 12), generator=torch.Generator().manual_seed(7))


# --------------------------------------------------------------------------- pure functions


def test_check_alphas_sorts_and_rejects_bad_grids():
    assert check_alphas([2, 0.5, 1]) == (0.5, 1.0, 2.0)
    assert check_alphas(torch.tensor([1.0, 3.0])) == (1.0, 3.0)
    for bad, words in (([], "empty"), ([1.0, 0.0], "> 0"), ([-1.0], "> 0"), ([float("nan")], "finite"),
                       ([float("inf")], "finite"), ([1.0, 1.0], "distinct"), (2.0, "sequence"),
                       (["a"], "must be a number")):
        with pytest.raises(SpectraError, match=words):
            check_alphas(bad)


def test_alpha_metrics_on_hand_computed_rows():
    # one uniform row over 4 keys, one peaked row over 2 visible keys
    s = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, -1e9, -1e9]]])
    visible = torch.tensor([[[True] * 4, [True, True, False, False]]])
    got = alpha_metrics(s, visible, [1.0, 2.0])
    # α = 1: row 1 uniform (H = log 4), row 2 = (3/4, 1/4)
    h2 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert got["entropy"][0, 0].item() == pytest.approx((math.log(4) + h2) / 2, abs=1e-6)
    assert got["max_attn"][0, 0].item() == pytest.approx((0.25 + 0.75) / 2, abs=1e-6)
    assert got["k_eff_pr"][0, 0].item() == pytest.approx((4 + 1 / (0.75**2 + 0.25**2)) / 2, abs=1e-5)
    assert got["k_eff_top90"][0, 0].item() == pytest.approx((4 + 2) / 2)
    # α = 2: row 2 = (9/10, 1/10): 0.9 of the mass is on the top key
    assert got["max_attn"][1, 0].item() == pytest.approx((0.25 + 0.9) / 2, abs=1e-6)
    assert got["k_eff_top90"][1, 0].item() == pytest.approx((4 + 1) / 2)


def test_alpha_metrics_equals_rescale_pattern_and_chunking():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 20, 20, generator=g) * 3
    visible = M.causal_mask(20).expand_as(s)
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)
    whole = alpha_metrics(s, visible, ALPHAS)
    tiny_chunks = alpha_metrics(s, visible, ALPHAS, chunk_elements=1)
    for i, a in enumerate(ALPHAS):
        pa = M.rescale_pattern(p, a)
        H = M.entropy(pa)
        want = {"entropy": H, "max_attn": M.max_attention(pa), "k_eff_exp": M.k_eff_exp(H),
                "k_eff_pr": M.k_eff_participation(pa), "k_eff_top90": M.k_eff_top_mass(pa)}
        for n in SWEEP_METRICS:
            torch.testing.assert_close(whole[n][i], want[n].mean(-1), atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(tiny_chunks[n][i], whole[n][i], atol=0, rtol=0)
    got = pattern_metrics(p, visible)
    for n in SWEEP_METRICS:
        torch.testing.assert_close(got[n], whole[n][ALPHAS.index(1.0)], atol=2e-5, rtol=1e-5)


def test_t_interval():
    x = np.array([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]])
    mean, low, high = t_interval(x, ci=0.95)
    assert mean.tolist() == [3.0, 2.0]
    half = 4.302652729911275 * 2.0 / math.sqrt(3)  # t_{2, 0.975} · sd / √n
    assert low[0] == pytest.approx(3 - half) and high[0] == pytest.approx(3 + half)
    assert low[1] == high[1] == 2.0
    one = t_interval(np.array([[1.0]]))
    assert np.isnan(one[1]).all() and np.isnan(one[2]).all()
    with pytest.raises(SpectraError, match="ci"):
        t_interval(x, ci=1.5)


# --------------------------------------------------------------------------- fast vs exact


@pytest.mark.parametrize("family", BILINEAR)
def test_fast_path_equals_exact_mode(tiny, toks, family):
    model, layout = tiny(family)
    fast = fast_sweep(model, toks, ALPHAS)
    exact = exact_head_sweep(model, toks, ALPHAS, max_rows=8)
    assert fast.method == ("fast",) * layout.n_layers and exact.method == ("exact",) * layout.n_layers
    for n in SWEEP_METRICS:
        torch.testing.assert_close(fast.metrics.metric(n), exact.metrics.metric(n), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(fast.local_gain, exact.local_gain)
    assert count_hooks(model) == 0


@pytest.mark.parametrize("family", NON_BILINEAR)
def test_fast_path_refused_where_not_bilinear(tiny, toks, family):
    model, layout = tiny(family)
    with pytest.raises(SpectraError, match="fast path"):
        fast_sweep(model, toks, ALPHAS)
    sweep = head_curves(model, toks, ALPHAS)
    assert sweep.method == ("exact",) * layout.n_layers
    assert all(r and ("soft-capped" in r or "ALiBi" in r) for r in sweep.reason)
    summary = sweep.summary()
    assert set(summary["method"]) == {"exact"} and summary["reason"].str.len().gt(0).all()
    exact = exact_head_sweep(model, toks, ALPHAS)
    torch.testing.assert_close(sweep.metrics.entropy, exact.metrics.entropy)
    # the softmax(α·s) prediction is really wrong here, so refusing it matters
    sw = intervention_effects(model, toks, (4.0,), QueryScale.scan(1, 0), layers=[1], patterns_for=[(1, 0)])
    predicted = M.rescale_pattern(sw.base_patterns[(1, 0)], 4.0)
    assert (sw.patterns[(1, 0)][0] - predicted).abs().max() > 1e-4
    assert count_hooks(model) == 0


def test_sweep_heads_summary_columns(tiny, toks):
    model, layout = tiny("llama_gqa")
    sweep = head_curves(model, toks, ALPHAS, layers=[1], batch_size=2)
    s = sweep.summary(ci=0.9)
    assert len(s) == layout.n_heads * len(ALPHAS)
    for c in ("layer", "head", "scale", "mean_entropy", "mean_entropy_ci_low", "mean_entropy_ci_high",
              "mean_max_attn", "mean_k_eff_exp", "mean_k_eff_pr", "mean_k_eff_top90", "n_sequences",
              "method", "reason"):
        assert c in s.columns
    assert (s["mean_entropy_ci_low"] <= s["mean_entropy"]).all()
    assert (s["mean_entropy"] <= s["mean_entropy_ci_high"]).all()
    whole = head_curves(model, toks, ALPHAS, layers=[1])
    torch.testing.assert_close(sweep.metrics.entropy, whole.metrics.entropy)
    assert "fast/exact=1/0" in repr(sweep)


@pytest.mark.parametrize("family", BILINEAR)
def test_real_forward_entropy_falls_and_max_attention_rises(tiny, toks, family):
    model, layout = tiny(family)
    sweep = exact_head_sweep(model, toks, ALPHAS)  # real forward passes with QueryScale
    H = sweep.metrics.entropy  # [alpha, batch, layer, head]
    mx = sweep.metrics.max_attn
    assert (H.diff(dim=0) <= 1e-6).all(), "entropy must be non-increasing in α"
    assert (mx.diff(dim=0) >= -1e-6).all(), "max attention must be non-decreasing in α"
    assert (H[0] - H[-1] > 1e-3).any(), "the scaling had no visible effect"


@pytest.mark.parametrize("family", BILINEAR)
def test_analytic_gain_matches_central_difference(tiny, toks, family):
    model, layout = tiny(family)
    h = 0.02
    sweep = exact_head_sweep(model, toks, (math.exp(-h), 1.0, math.exp(h)))
    fd = (sweep.metrics.entropy[2] - sweep.metrics.entropy[0]) / (2 * h)  # dH/d ln α at α = 1
    torch.testing.assert_close(fd, sweep.local_gain, atol=3e-4, rtol=2e-2)
    assert (sweep.local_gain <= 0).all()
    torch.testing.assert_close(analytic_gain(model, toks), sweep.local_gain)


# --------------------------------------------------------------------------- exact sweep


def test_measured_metrics_equal_metric_capture(tiny, toks):
    model, layout = tiny("qwen3")
    sweep = intervention_effects(model, toks, (1.0,), QueryScale.scan(0, 0))
    cap = MetricCapture(layout)
    with torch.no_grad(), attached(model, cap):
        model(toks)
    tm = cap.result()
    for n in SWEEP_METRICS:
        torch.testing.assert_close(sweep.unscaled.metric(n), getattr(tm, n)[..., 1:].mean(-1), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(sweep.local_gain, tm.local_gain[..., 1:].mean(-1), atol=1e-5, rtol=1e-5)


def test_exact_sweep_downstream_effects(tiny, toks):
    model, layout = tiny("llama_gqa")
    layer, head = 0, 1
    sw = intervention_effects(model, toks, ALPHAS, QueryScale.scan(layer, head), patterns_for=[(layer, head)], max_rows=6)
    i1 = sw.alphas.index(1.0)
    assert sw.kl[i1].abs().max() == 0 and sw.delta_loss[i1].abs().max() == 0
    assert (sw.kl >= -1e-7).all() and (sw.kl[0] > 0).all()
    d = sw.scaled.entropy - sw.unscaled.entropy[None]
    others = [h for h in range(layout.n_heads) if h != head]
    assert d[:, :, 0, others].abs().max() < 1e-6, "query scaling must not touch the layer's other heads"
    assert d[:, :, 1].abs().max() > 1e-4, "later heads must feel the change"
    # loss at α = 4 equals a direct forward pass with the scaling
    with torch.no_grad(), attached(model, QueryScale(layer, head, 4.0)):
        logits = model(toks)
    nll = -torch.log_softmax(logits, -1)[:, :-1].gather(-1, toks[:, 1:, None]).squeeze(-1).mean(-1)
    torch.testing.assert_close(sw.loss[sw.alphas.index(4.0)], nll, atol=1e-5, rtol=1e-5)
    # the captured pattern at α is softmax(α·s) of the unscaled one (bilinear layer)
    torch.testing.assert_close(sw.patterns[(layer, head)][-1], M.rescale_pattern(sw.base_patterns[(layer, head)], 4.0),
                               atol=1e-5, rtol=1e-5)
    # chunking does not change anything
    one = intervention_effects(model, toks, ALPHAS, QueryScale.scan(layer, head), max_rows=1)
    torch.testing.assert_close(one.scaled.entropy, sw.scaled.entropy, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(one.kl, sw.kl, atol=1e-6, rtol=1e-4)
    frame = sw.head_frame(layer, head)
    assert list(frame["scale"]) == list(ALPHAS)
    for c in ("mean_entropy", "mean_entropy_ci_low", "mean_max_attn", "mean_k_eff", "k_eff_pr", "k_eff_top90",
              "delta_entropy", "delta_loss", "kl_from_unscaled", "n_sequences"):
        assert c in frame.columns
    down = sw.downstream_frame(min_layer=1)
    assert set(down["layer"]) == {1} and len(down) == len(ALPHAS) * layout.n_heads
    assert count_hooks(model) == 0


def test_paired_sweeps_hand_over_each_pass_in_step(tiny, toks):
    model, layout = tiny("llama_gqa")
    ivs = {"q": QueryScale.scan(1, 3), "k": KeyScale.scan(1, 1)}
    heads = [(1, 2), (1, 3)]
    seen = []

    def take(step):
        assert set(step) == {"q", "k"}
        starts = {p.start for p in step.values()}
        alphas = {tuple(sorted(p.scaled)) for p in step.values()}
        assert len(starts) == 1 and len(alphas) == 1  # the same block and α values from both
        for p in step.values():
            for pats in p.scaled.values():
                assert set(pats) == set(heads) and all(v.shape[0] <= 2 for v in pats.values())
        seen.extend((starts.pop(), i) for i in alphas.pop())

    grid = (0.5, 1.0, 2.0)
    paired = intervention_effects(model, toks, grid, ivs, on_patterns=take, layers=[1], patterns_for=heads,
                                  max_rows=2)
    # 3 sequences in blocks of 2 and 1, one α per pass; α = 1 comes with the unscaled pass
    assert sorted(seen) == [(s, i) for s in (0, 2) for i in range(len(grid))]
    for name, iv in ivs.items():
        alone = intervention_effects(model, toks, grid, iv, layers=[1], patterns_for=heads, max_rows=2)
        assert not paired[name].patterns and not paired[name].base_patterns
        for n in SWEEP_METRICS:
            torch.testing.assert_close(paired[name].scaled.metric(n), alone.scaled.metric(n), atol=0, rtol=0)
        torch.testing.assert_close(paired[name].kl, alone.kl, atol=0, rtol=0)
        torch.testing.assert_close(paired[name].loss, alone.loss, atol=0, rtol=0)
    with pytest.raises(SpectraError, match="non-empty"):
        intervention_effects(model, toks, grid, {}, on_patterns=take)


def test_a_scan_gets_its_value_as_an_argument_and_may_edit_several_heads(tiny, toks):
    model, layout = tiny("llama_gqa")
    both = Scan("heads 0 and 3", lambda a: [QueryScale(1, 0, a), QueryScale(1, 3, a)])
    sw = intervention_effects(model, toks, (0.5, 2.0), both, layers=[1])
    assert sw.intervention == "heads 0 and 3"
    d = (sw.scaled.entropy - sw.unscaled.entropy[None])[:, :, 0].abs().amax((0, 1))  # [head]
    assert d[0] > 1e-3 and d[3] > 1e-3
    assert torch.all(d[[1, 2] + list(range(4, layout.n_heads))] == 0)
    for h in (0, 3):
        alone = intervention_effects(model, toks, (0.5, 2.0), QueryScale.scan(1, h), layers=[1])
        assert alone.intervention == f"QueryScale(layer=1, head={h}, positions=None, alpha=grid)"
        assert_close(sw.scaled.entropy[..., 0, h], alone.scaled.entropy[..., 0, h], atol=0, rtol=0)


def test_exact_sweep_key_scaling_reaches_the_whole_group(tiny, toks):
    model, layout = tiny("llama_gqa")
    sw = intervention_effects(model, toks, (0.5, 1.0, 2.0), KeyScale.scan(1, 1), layers=[1])
    d = (sw.scaled.entropy - sw.unscaled.entropy[None])[:, :, 0]  # [alpha, batch, head]
    group = layout.heads_of_kv(1)
    assert group == (2, 3)
    assert (d[:, :, list(group)].abs().amax(dim=(0, 1)) > 1e-4).all()
    assert d[:, :, [0, 1]].abs().max() < 1e-6


def test_exact_sweep_rejects_bad_input(tiny, toks):
    model, layout = tiny("gpt2")
    with pytest.raises(SpectraError, match="alpha"):
        intervention_effects(model, toks, [], QueryScale.scan(0, 0))
    with pytest.raises(SpectraError, match="> 0"):
        intervention_effects(model, toks, [0.0, 1.0], QueryScale.scan(0, 0))
    with pytest.raises(SpectraError, match="head"):
        intervention_effects(model, toks, [1.0, 2.0], QueryScale.scan(0, layout.n_heads))
    with pytest.raises(SpectraError, match="must be a Scan"):
        intervention_effects(model, toks, [1.0, 2.0], "q")
    with pytest.raises(SpectraError, match="min_position"):
        intervention_effects(model, toks, [1.0, 2.0], QueryScale.scan(0, 0), min_position=toks.shape[1])
    with pytest.raises(SpectraError, match="layer"):
        fast_sweep(model, toks, [1.0, 2.0], layers=[layout.n_layers])
    with pytest.raises(SpectraError, match="max_rows"):
        exact_head_sweep(model, toks, [1.0, 2.0], max_rows=0)
    assert count_hooks(model) == 0


def test_intervention_effects_of_one_head_match_its_own_curve(tiny, toks):
    model, _ = tiny("neox")
    got = intervention_effects(model, toks, (0.5, 1.0, 2.0), QueryScale.scan(1, 3), layers=[1])
    assert got.scaled.layers == (1,)
    fast = fast_sweep(model, toks, (0.5, 1.0, 2.0))
    torch.testing.assert_close(got.scaled.entropy[:, :, 0, 3], fast.metrics.entropy[:, :, 1, 3], atol=1e-5, rtol=1e-6)


# --------------------------------------------------------------------------- padding


@pytest.mark.parametrize("family", ["llama_gqa", "gemma2", "opt"])  # fast, exact fallback, unfaithful scores
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_give_the_per_sequence_results_of_unpadded_ones(tiny, family, side):
    """Issue 11 case 5: a batch of a 10-token and a padded 7-token sequence gives, per sequence,
    what each gives alone: curves, analytic gain, loss and KL leave padding out."""
    model, _ = tiny(family)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(4, 97, (1, 10), generator=g), torch.randint(4, 97, (1, 7), generator=g)
    alphas = (0.5, 1.0, 2.0)
    pad, real = torch.full((1, 3), 3), torch.ones(1, 7, dtype=torch.long)
    bb = torch.cat([b, pad], 1) if side == "right" else torch.cat([pad, b], 1)
    mb = torch.cat([real, 0 * pad], 1) if side == "right" else torch.cat([0 * pad, real], 1)
    toks, mask = torch.cat([a, bb]), torch.cat([torch.ones(1, 10, dtype=torch.long), mb])
    curves = head_curves(model, toks, alphas, attention_mask=mask)
    gain = analytic_gain(model, toks, attention_mask=mask)
    effects = intervention_effects(model, toks, alphas, QueryScale.scan(1, 0), attention_mask=mask)
    for i, alone in enumerate((a, b)):
        ref = head_curves(model, alone, alphas)
        for n in ("entropy", "max_attn", "k_eff_exp", "k_eff_top90"):
            assert_close(curves.metrics.metric(n)[:, i], ref.metrics.metric(n)[:, 0], atol=1e-5, rtol=1e-5)
        assert_close(gain[i], analytic_gain(model, alone)[0], atol=1e-5, rtol=1e-5)
        ref_e = intervention_effects(model, alone, alphas, QueryScale.scan(1, 0))
        assert_close(effects.loss[:, i], ref_e.loss[:, 0], atol=1e-5, rtol=1e-5)
        assert_close(effects.kl[:, i], ref_e.kl[:, 0], atol=1e-5, rtol=1e-5)
        assert_close(effects.scaled.metric("entropy")[:, i], ref_e.scaled.metric("entropy")[:, 0],
                     atol=1e-5, rtol=1e-5)


def test_sweeps_refuse_tokens_beyond_the_context(tiny):
    model, _ = tiny("gpt2")
    too_long = torch.ones(1, model.cfg.n_ctx + 1, dtype=torch.long)
    for call in (lambda: head_curves(model, too_long, (1.0, 2.0)),
                 lambda: analytic_gain(model, too_long),
                 lambda: intervention_effects(model, too_long, (1.0, 2.0), QueryScale.scan(0, 0))):
        with pytest.raises(SpectraError, match="exceed the model's context"):
            call()


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gemma2"])
def test_sweep_pass_ends_at_its_last_layer(tiny, tokens, family):
    """Without logits, a SweepCapture pass stops after its last layer's pattern: that layer's
    MLP and the unembedding never run, the values equal those of a full pass, and the model is
    left as it was (no hooks, the same logits)."""
    model, layout = tiny(family)
    before = model(tokens, return_type="logits")
    alphas = check_alphas([0.5, 1.0, 2.0])
    fired: list[str] = []
    spies = [(name, lambda x, hook, name=name: fired.append(name))
             for name in (f"blocks.{layout.n_layers - 1}.mlp.hook_in", "unembed.hook_in")]
    kw = dict(layers=[0, layout.n_layers - 1], alphas=alphas, gain_layers=[layout.n_layers - 1])

    short = SweepCapture(layout, **kw)
    assert short.run(model, tokens, interventions=spies) is None
    assert fired == []
    full = SweepCapture(layout, **kw)
    full.run(model, tokens, interventions=spies, logits=True)
    assert sorted(fired) == sorted(name for name, _ in spies)
    for l in kw["layers"]:
        for n in SWEEP_METRICS:
            assert_close(short.metrics[l][n], full.metrics[l][n], rtol=0, atol=0)
    assert_close(short.gain[layout.n_layers - 1], full.gain[layout.n_layers - 1], rtol=0, atol=0)
    assert count_hooks(model) == 0
    assert_close(model(tokens, return_type="logits"), before, rtol=0, atol=0)

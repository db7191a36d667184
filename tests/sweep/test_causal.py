"""Causal outcomes and controls (spectra_lens.causal): sham, rotation, document bootstrap,
control-head rule, and the downstream effects against an independent computation."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from spectra_lens.capture import attached, capture_metrics, count_hooks
from spectra_lens.causal import (
    SmallClusterWarning,
    choose_control_head,
    control_ranking,
    document_bootstrap,
    effect_row,
    head_r_table,
    query_direction_spread,
    sham_check,
    sweep_effects,
)
from spectra_lens.errors import SpectraError
from spectra_lens.interventions import QueryRotate, QueryScale
from spectra_lens.sweep import intervention_effects
from spectra_lens.testing import effective_q


@pytest.fixture(scope="module")
def toks() -> torch.Tensor:
    return torch.randint(1, 97, (8, 12), generator=torch.Generator().manual_seed(5))


DOCS = [0, 0, 1, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("family", ["llama_gqa", "qwen3", "gemma2", "gpt2"])
def test_sham_changes_nothing_bit_for_bit(tiny, toks, family):
    model, layout = tiny(family)
    summary, effects = sham_check(model, toks, 0, 1, batch_size=3)
    assert summary["bitwise_equal"] is True
    assert summary["max_abs_logit_diff"] == 0.0 and summary["max_abs_metric_diff"] == 0.0
    row = effect_row(effects, DOCS)
    for name in ("delta_loss", "kl_unscaled_scaled", "own_delta_entropy", "later_mean_abs_delta_entropy"):
        assert row[name] == 0.0 and row[f"{name}_ci_low"] == 0.0 and row[f"{name}_ci_high"] == 0.0
    assert row["later_heads_changed"] == 0 and row["n_later_heads"] == layout.n_heads
    assert count_hooks(model) == 0


def test_rotation_sweep_changes_the_head_both_ways_and_reaches_the_output(tiny, toks):
    """Unlike scaling, a rotation's effect on the head's own entropy is not fixed in sign."""
    model, layout = tiny("llama_gqa")
    sw = intervention_effects(model, toks, (0.4, 0.8, 1.6), QueryRotate.scan(0, 1, seed=1), layers=range(0, 2))
    assert sw.intervention.startswith("QueryRotate(") and "angle=grid" in sw.intervention
    d = sw.scaled.entropy[:, :, 0, 1] - sw.unscaled.entropy[None, :, 0, 1]
    assert (d > 0).any() and (d < 0).any()
    assert (sw.kl > 0).all()
    others = [h for h in range(layout.n_heads) if h != 1]
    assert (sw.scaled.entropy[:, :, 0, others] - sw.unscaled.entropy[None, :, 0, others]).abs().max() < 1e-6


def test_document_bootstrap_stays_inside_the_bounds():
    rng = np.random.default_rng(0)
    # skewed values near the lower bound 0, as KL or max attention of a flat head
    values = np.concatenate([np.zeros(20), rng.exponential(0.01, 4) * 50])
    docs = np.repeat(np.arange(12), 2)
    mean, low, high = document_bootstrap(values, docs, n_boot=500)
    assert 0 <= low <= mean <= high
    t_low = values.mean() - 2.07 * values.std(ddof=1) / math.sqrt(len(values))
    assert t_low < 0, "the t-interval leaves the bounds here; the bootstrap must not"
    probs = np.concatenate([np.ones(10), rng.uniform(0.9, 1.0, 10)])  # in [0, 1], piled at 1
    _, lo, hi = document_bootstrap(probs, np.arange(20), n_boot=500)
    assert 0 <= lo <= hi <= 1


def test_document_bootstrap_resamples_documents_not_sequences():
    # two documents, all sequences of a document equal: the interval is the two document means
    values = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    docs = np.array([7, 7, 7, 9, 9, 9])
    with pytest.warns(SmallClusterWarning):
        mean, low, high = document_bootstrap(values, docs, n_boot=400, ci=0.9)
    assert mean == 0.5 and low == 0.0 and high == 1.0
    same = document_bootstrap(values, None, n_boot=400, ci=0.9)  # sequences as units: narrower
    assert same[2] - same[1] < 1.0
    assert np.isnan(document_bootstrap(values, np.zeros(6), n_boot=10)[1])  # one document
    with pytest.raises(SpectraError, match="one id per sequence"):
        document_bootstrap(values, [0, 1])


def test_effect_intervals_of_a_real_sweep_stay_in_bounds(tiny, toks):
    model, layout = tiny("llama_gqa")
    sw = intervention_effects(model, toks, (0.25, 1.0, 4.0), QueryScale.scan(0, 1), layers=range(0, 2))
    for e in sweep_effects(sw, 0, 1):
        row = effect_row(e, DOCS, n_boot=300)
        assert 0 <= row["kl_unscaled_scaled_ci_low"] <= row["kl_unscaled_scaled"] <= row["kl_unscaled_scaled_ci_high"]
        assert 0 <= row["later_mean_abs_delta_entropy_ci_low"]
        assert row["n_documents"] == 6 and row["n_sequences"] == 8
    frame = sw.head_frame(0, 1, documents=DOCS)
    log_n = math.log(toks.shape[1])
    assert (frame["mean_entropy_ci_low"] >= 0).all() and (frame["mean_entropy_ci_high"] <= log_n).all()
    assert (frame["mean_max_attn_ci_low"] >= 0).all() and (frame["mean_max_attn_ci_high"] <= 1).all()
    assert (frame["kl_from_unscaled_ci_low"] >= 0).all()


@pytest.mark.parametrize("family", ["llama_gqa", "gemma2"])
def test_delta_loss_and_kl_equal_two_plain_forward_passes(tiny, toks, family):
    """Independent computation: two ordinary forward passes, float64 log-softmax by hand."""
    model, layout = tiny(family)
    layer, head, alpha = 1, 3, 2.5
    sw = intervention_effects(model, toks, (1.0, alpha), QueryScale.scan(layer, head), max_rows=5)
    with torch.no_grad():
        base = model(toks, return_type="logits").double()
        with attached(model, QueryScale(layer, head, alpha)):
            scaled = model(toks, return_type="logits").double()
    p1, pa = torch.softmax(base, -1), torch.softmax(scaled, -1)
    kl = (p1 * (p1.log() - pa.log())).sum(-1).mean(-1)  # KL(unscaled || scaled) per sequence
    nll = lambda p: -p[:, :-1].gather(-1, toks[:, 1:, None]).squeeze(-1).log().mean(-1)  # noqa: E731
    i = sw.alphas.index(alpha)
    torch.testing.assert_close(sw.kl[i].double(), kl, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(sw.delta_loss[i].double(), nll(pa) - nll(p1), atol=2e-6, rtol=1e-4)
    assert (kl > 0).all()


def test_head_r_table_equals_a_direct_pearson_and_the_control_rule(tiny, toks):
    model, layout = tiny("llama_gqa")
    table = head_r_table(model, toks, DOCS, batch_size=3)
    assert len(table) == layout.n_layers * layout.n_heads
    tm = capture_metrics(model, toks)
    for _, row in table.sample(3, random_state=0).iterrows():
        l, h = int(row["layer"]), int(row["head"])
        x = tm.q_norm[:, l, h, 1:].double().log().reshape(-1).numpy()
        y = tm.entropy[:, l, h, 1:].double().reshape(-1).numpy()
        assert row["r_log_q_entropy"] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-6)
        assert row["r_ci_low"] <= row["r_log_q_entropy"] <= row["r_ci_high"]
        assert row["df_doc"] == 5 and (row["p_doc"] < 0.05) == (row["r_ci_low"] > 0 or row["r_ci_high"] < 0)
    assert set(table["n_documents"]) == {6}
    fake = pd.DataFrame({"layer": [0, 0, 1, 1, 2], "head": [0, 1, 0, 1, 0],
                         "r_log_q_entropy": [0.0, 0.01, 0.02, 0.5, 0.02],
                         "r_ci_low": [-0.4, -0.05, -0.03, 0.4, 0.01], "r_ci_high": [0.4, 0.06, 0.05, 0.6, 0.03],
                         "p_doc": [0.9, 0.7, 0.3, 1e-4, 0.01], "n_documents": 6})
    # smallest max(|low|, |high|) among heads whose interval covers 0; L2H0 (0.03) excludes 0
    assert choose_control_head(fake, (0, 1)) == (1, 0)
    assert choose_control_head(fake, (1, 0)) == (0, 1)
    ranked = control_ranking(fake, (0, 1))
    assert list(zip(ranked["layer"], ranked["head"])) == [(1, 0), (0, 0), (2, 0), (1, 1)]
    assert list(ranked["eligible"]) == [True, True, False, False] and list(ranked["rank"]) == [1, 2, 3, 4]
    with pytest.raises(SpectraError, match="indistinguishable from 0"):
        choose_control_head(fake, (1, 0), layer=1)  # L1H1 is the only candidate and r != 0
    with pytest.raises(SpectraError, match="no head"):
        choose_control_head(fake.iloc[:1], (0, 0))
    one_doc = head_r_table(model, toks, [0] * 8, batch_size=8)
    with pytest.raises(SpectraError, match="at least 2 selection documents, got 1"):
        choose_control_head(one_doc, (0, 0))


def test_direction_spread_is_the_median_angle_to_the_mean_direction(tiny, toks):
    model, layout = tiny("neox")
    spread = query_direction_spread(model, toks, 1, 2, min_position=1)
    q = effective_q(model, layout, toks, 1)[:, 1:, 2].double().reshape(-1, layout.d_head)
    unit = q / q.norm(dim=-1, keepdim=True)
    mean = unit.mean(0) / unit.mean(0).norm()
    assert spread.median_angle == pytest.approx(float(torch.arccos(unit @ mean).median()), abs=1e-9)
    assert spread.sd_log_norm == pytest.approx(float(q.norm(dim=-1).log().std()), abs=1e-9)
    assert spread.n_tokens == q.shape[0] and 0 < spread.median_angle < math.pi
    assert "median" in spread.as_dict()["rule"]


def test_later_heads_are_exactly_the_layers_after_the_intervened_one(toks):
    """The "later heads" of an intervention at layer 1 of a 4-layer model are every head of
    layers 2 and 3: not layer 1 itself, not short of the last layer. Each entry equals the
    entropy change of two plain forward passes (with and without the scaling)."""
    import transformers

    from spectra_lens.layout import attention_layout
    from spectra_lens.models import bridge_from_hf

    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, max_position_embeddings=128)
    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 2 and ("q_proj" in name or "k_proj" in name):
                p.mul_(4.0)
    model = bridge_from_hf(hf.eval())
    layout = attention_layout(model)
    layer, head, alphas = 1, 2, (0.5, 1.0, 3.0)
    sw = intervention_effects(model, toks, alphas, QueryScale.scan(layer, head),
                              layers=range(layer, layout.n_layers))
    base = capture_metrics(model, toks, top_mass=None).entropy[..., 1:].double().mean(-1)
    effects = sweep_effects(sw, layer, head)
    for alpha, e in zip(alphas, effects, strict=True):
        scaled = capture_metrics(model, toks, interventions=[QueryScale(layer, head, alpha)],
                                 top_mass=None).entropy[..., 1:].double().mean(-1)
        delta = scaled - base  # [batch, layer, head]
        assert tuple(e.later_delta_entropy.shape) == (toks.shape[0], 2, layout.n_heads)
        torch.testing.assert_close(e.later_delta_entropy, delta[:, layer + 1 :], rtol=0, atol=2e-5)
        torch.testing.assert_close(e.own_delta_entropy, delta[:, layer, head], rtol=0, atol=2e-5)
        if alpha != 1.0:  # the scaling reaches the last layer, so dropping it would show
            assert delta[:, -1].abs().max() > 1e-3
        row = effect_row(e, DOCS, n_boot=50)
        assert row["n_later_heads"] == 2 * layout.n_heads
    summary, sham = sham_check(model, toks, layer, head, batch_size=4)
    assert tuple(sham.later_delta_entropy.shape) == (toks.shape[0], 2, layout.n_heads)


def _null_sums(rng, n_docs, n_rep, icc=0.5):
    """[document, 6, replicate] sums of 1, x, y, x², y², xy: x and y independent, each with a
    document effect (intraclass correlation `icc`), documents of 1-3 sequences of 16-47 tokens."""
    out = np.zeros((n_docs, 6, n_rep))
    for g in range(n_docs):
        size = int(rng.integers(1, 4)) * int(rng.integers(16, 48))
        v = rng.normal(size=(n_rep, 1, 2)) * np.sqrt(icc) + rng.normal(size=(n_rep, size, 2)) * np.sqrt(1 - icc)
        x, y = v[..., 0], v[..., 1]
        out[g] = [np.full(n_rep, size), x.sum(1), y.sum(1), (x * x).sum(1), (y * y).sum(1), (x * y).sum(1)]
    return out


def test_control_rule_test_is_calibrated_under_a_document_clustered_null():
    """The interval the control rule reads excludes 0 in 5% of null cases at 16 documents
    (4000 replicates: SE 0.0034, tolerance 3.5 SE); the percentile bootstrap of r, the rule's
    former interval, does not (it rejects ≈ 8.7% on the same data)."""
    from spectra_lens.causal import _pearson_from_sums, r_scores_from_sums

    n = 4000
    sums = _null_sums(np.random.default_rng(16), 16, n)
    sc = r_scores_from_sums(sums)
    excludes = (sc["low"] > 0) | (sc["high"] < 0)
    assert np.isfinite(sc["p"]).all() and np.array_equal(excludes, sc["p"] < 0.05)
    tol = 3.5 * np.sqrt(0.05 * 0.95 / n)
    assert abs(excludes.mean() - 0.05) < tol
    w = np.random.default_rng(0).multinomial(16, np.full(16, 1 / 16), size=400).astype(float)
    boot = np.einsum("bg,gkr->bkr", w, sums)
    rb = _pearson_from_sums(*(boot[:, k] for k in range(6)))
    lo, hi = np.percentile(rb, [2.5, 97.5], axis=0)
    assert ((lo > 0) | (hi < 0)).mean() > 0.05 + tol


def test_r_scores_equal_a_direct_leave_one_document_out_fit():
    rng = np.random.default_rng(1)
    docs = [rng.normal(size=(int(rng.integers(5, 20)), 2)) + rng.normal(size=2) for _ in range(7)]
    sums = np.array([[len(d), d[:, 0].sum(), d[:, 1].sum(), (d[:, 0] ** 2).sum(), (d[:, 1] ** 2).sum(),
                      (d[:, 0] * d[:, 1]).sum()] for d in docs])[..., None]
    from spectra_lens.causal import r_scores_from_sums
    sc = r_scores_from_sums(sums)
    allx = np.concatenate(docs)
    slope = lambda a: np.polyfit(a[:, 0], a[:, 1], 1)[0]  # noqa: E731
    loo = np.array([slope(np.concatenate(docs[:g] + docs[g + 1:])) for g in range(7)])
    se = np.sqrt(6 / 7 * ((loo - loo.mean()) ** 2).sum())
    half = __import__("scipy").stats.t.ppf(0.975, 6) * se * allx[:, 0].std() / allx[:, 1].std()
    r = np.corrcoef(allx.T)[0, 1]
    assert sc["r"][0] == pytest.approx(r, abs=1e-12)
    assert sc["high"][0] - sc["low"][0] == pytest.approx(2 * half, rel=1e-9)
    assert sc["low"][0] + sc["high"][0] == pytest.approx(2 * r, abs=1e-12)
    assert np.isnan(r_scores_from_sums(sums[:1])["p"]).all()  # one document: undefined

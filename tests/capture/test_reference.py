"""Every captured metric, every α-sweep row metric and the local gain against `reference`.

`reference` computes from the definitions in float64 with loops, on patterns that a plain
Hugging Face forward pass returns (`output_attentions=True`), and on queries and keys read
with plain torch hooks on the HF projection modules; a head's query at α comes from editing
its projection weights. The library computes the same numbers on the TransformerBridge of
the same weights with its own hooks and kernels.
"""

import math

import numpy as np
import pytest
import reference as R
import torch

from spectra_lens.capture import capture_metrics
from spectra_lens.kernels.alpha import alpha_metrics
from spectra_lens.kernels.blocked import pattern_metrics
from spectra_lens.sweep import analytic_gain, head_curves
from spectra_lens.testing import FAMILIES, tiny_hf_model

TOKEN_METRICS = ("entropy", "entropy_norm", "max_attn", "k_eff_exp", "k_eff_pr", "k_eff_top90",
                 "sink_mass", "local_gain")
SWEEP_ALPHAS = (0.5, 2.0, 5.0)


@pytest.fixture(scope="module")
def plain():
    """family -> (logits, attentions) of the plain HF model on the shared `tokens`."""
    cache = {}

    def get(family, tokens):
        if family not in cache:
            cache[family] = R.forward(tiny_hf_model(family), tokens)
        return cache[family]

    return get


def _reference_token_metrics(attentions) -> dict[str, np.ndarray]:
    """{metric: [batch, layer, head, pos]} from the HF patterns; row t sees keys 0..t."""
    n_layers = len(attentions)
    b, n_heads, n_pos, _ = attentions[0].shape
    out = {m: np.zeros((b, n_layers, n_heads, n_pos)) for m in TOKEN_METRICS}
    for l in range(n_layers):
        for i in range(b):
            for h in range(n_heads):
                for t in range(n_pos):
                    p = attentions[l][i, h, t, : t + 1].numpy()
                    row = R.row_metrics(p)
                    # log p is s up to a per-row constant, and Var_p is shift invariant.
                    row["local_gain"] = -R.row_variance(p, np.log(p))
                    for m in TOKEN_METRICS:
                        out[m][i, l, h, t] = row[m]
    return out


# --------------------------------------------------------------------------- capture


@pytest.mark.parametrize("family", FAMILIES)
def test_every_pattern_metric_equals_the_reference(tiny, tokens, plain, family):
    model, _ = tiny(family)
    got = capture_metrics(model, tokens)
    want = _reference_token_metrics(plain(family, tokens)[1])
    for m in TOKEN_METRICS:
        np.testing.assert_allclose(getattr(got, m).numpy(), want[m], rtol=1e-5, atol=2e-6,
                                   err_msg=f"{family}: {m}")
    assert (want["k_eff_top90"] > 1).any() and (want["k_eff_top90"] < want["entropy"].shape[-1]).any()


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_query_and_key_norms_equal_the_projection_outputs(tiny, tokens, family):
    """‖q‖ of each head and ‖k‖ of the kv head it reads, from the HF projections (rotary is a
    rotation, so it keeps the norm). llama_gqa has 4 query heads on 2 kv heads."""
    model, layout = tiny(family)
    got = capture_metrics(model, tokens)
    proj = R.projections(tiny_hf_model(family), family, tokens)
    n_heads, n_kv = layout.n_heads, layout.n_kv_heads
    for l, (q, k) in proj.items():
        for h in range(n_heads):
            q_norm = np.sqrt((q[:, :, h].numpy() ** 2).sum(-1))
            k_norm = np.sqrt((k[:, :, R.kv_head_of(h, n_heads, n_kv)].numpy() ** 2).sum(-1))
            np.testing.assert_allclose(got.q_norm[:, l, h].numpy(), q_norm, rtol=1e-5)
            np.testing.assert_allclose(got.k_norm[:, l, h].numpy(), k_norm, rtol=1e-5)


def test_to_frame_rows_carry_their_own_labels(tiny, tokens, plain):
    """Each row's (sequence, layer, head, position) labels the reference values of exactly that
    token and head: a transposed or shifted label would pair a row with another token's value."""
    family = "llama_gqa"
    model, _ = tiny(family)
    sequence_ids = [41, 7]
    got = capture_metrics(model, tokens, layers=[1])
    frame = got.to_frame(sequence_ids=sequence_ids, shard=3)
    want = _reference_token_metrics(plain(family, tokens)[1])
    proj = R.projections(tiny_hf_model(family), family, tokens)
    b, n_pos = tokens.shape
    assert len(frame) == b * 1 * 4 * n_pos
    assert (frame["shard"] == 3).all()
    seen = set()
    for row in frame.itertuples(index=False):
        i = sequence_ids.index(row.sequence)
        l, h, t = row.layer, row.head, row.position
        assert l == 1
        seen.add((i, h, t))
        for m in TOKEN_METRICS:
            v = want[m][i, l, h, t]
            if math.isnan(v):
                assert math.isnan(getattr(row, m)), (row, m)
            else:
                assert getattr(row, m) == pytest.approx(v, rel=1e-5, abs=2e-6), (row, m)
        q = proj[l][0][i, t, h].numpy()
        assert row.q_norm == pytest.approx(float(np.sqrt((q**2).sum())), rel=1e-5)
    assert len(seen) == b * 4 * n_pos


# --------------------------------------------------------------------------- α-sweep rows


def _rows(seed: int, n_rows: int, n_keys: int):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_rows, n_keys, generator=g, dtype=torch.float64) * 2
    visible = torch.ones(n_rows, n_keys, dtype=torch.bool).tril()
    return scores, visible


def test_alpha_metrics_equal_the_reference_row_by_row():
    """Mean over query rows of every sweep metric of softmax(α·s), one causal block of rows;
    scores shifted per row by a constant give the same answer (log p works as scores)."""
    scores, visible = _rows(0, 20, 20)  # 20 rows: more than one block of query rows
    alphas = (0.3, 1.0, 2.5, 7.0)
    got = alpha_metrics(scores.float()[None], visible[None], alphas)
    shifted = alpha_metrics((scores + torch.arange(20.0)[:, None] * 3).float()[None], visible[None], alphas)
    for j, a in enumerate(alphas):
        rows = [R.row_metrics(R.softmax(scores[t, : t + 1].numpy(), a)) for t in range(20)]
        for m in R.SWEEP_METRICS:
            want = np.mean([r[m] for r in rows])
            assert float(got[m][j, 0]) == pytest.approx(want, rel=2e-5), (a, m)
            assert float(shifted[m][j, 0]) == pytest.approx(want, rel=2e-5), (a, m)


def test_pattern_metrics_equal_the_reference_row_by_row():
    scores, visible = _rows(1, 18, 18)
    p = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
    got = pattern_metrics(p.float()[None, None], visible[None, None])
    rows = [R.row_metrics(p[t, : t + 1].numpy()) for t in range(18)]
    for m in R.SWEEP_METRICS:
        assert float(got[m][0, 0]) == pytest.approx(np.mean([r[m] for r in rows]), rel=2e-5), m


def test_top90_count_at_the_tolerance_boundary():
    """A row whose top keys reach exactly 0.9 − 1e-6 (in float32) counts as reaching 0.9; one
    just below needs one more key. Same answer from the capture and the sweep kernels."""
    from spectra_lens.metrics import k_eff_top_mass

    edge = float(torch.tensor(0.9 - 1e-6, dtype=torch.float32))
    below = float(torch.tensor(edge, dtype=torch.float32).nextafter(torch.tensor(0.0)))
    for first, want in ((edge, 1.0), (below, 2.0)):
        rest = (1 - first) / 3
        p = torch.tensor([[first, rest, rest, rest]], dtype=torch.float32)
        assert R.row_top_mass_count(p[0].double().tolist()) == want
        assert float(k_eff_top_mass(p)[0]) == want
        assert float(pattern_metrics(p[None].expand(1, 1, 4).clone())["k_eff_top90"][0]) == want


def test_top_mass_count_kernel_at_exact_ties_in_every_branch():
    """The sorted-row count kernel behind k_eff_top90 (capture and sweep): the fewest leading
    keys whose float64 sum reaches `lim`; a row that never does gets a count ≥ W, which the
    callers read as every key (so the test clamps at W). Keys of 2⁻¹⁰
    make every partial sum exact, so `lim` can equal a partial sum: inside the first keys summed
    one by one, at a chunk's last key and inside a chunk after them, and never reached."""
    from spectra_lens.kernels.blocked import _TOP_CHUNK, _TOP_PREFIX, _top_count_sorted

    W = _TOP_PREFIX + 4 * _TOP_CHUNK
    unit = 2.0**-10
    want = {10: 10, _TOP_PREFIX: _TOP_PREFIX, _TOP_PREFIX + _TOP_CHUNK: _TOP_PREFIX + _TOP_CHUNK,
            _TOP_PREFIX + 6: _TOP_PREFIX + 6, W: W, W + 3: W}  # lim / unit -> count
    E = torch.full((len(want), W), unit, dtype=torch.float32)
    lim = torch.tensor([k * unit for k in want], dtype=torch.float64)
    assert _top_count_sorted(E, lim).clamp_max(W).tolist() == list(want.values())
    # General rows against a plain loop (float64 sums of the float32 keys, sorted descending).
    gen = torch.Generator().manual_seed(3)
    for width in (_TOP_CHUNK, _TOP_PREFIX, W):
        E = torch.rand(40, width, generator=gen).pow(8).sort(-1, descending=True).values
        E = E / E.sum(-1, keepdim=True) * torch.linspace(0.85, 1.0, 40)[:, None]
        lim = torch.full((40,), 0.9 - 1e-6, dtype=torch.float64)
        ref = []
        for row in E.double().tolist():
            total, count = 0.0, width
            for i, v in enumerate(row):
                total += v
                if total >= 0.9 - 1e-6:
                    count = i + 1
                    break
            ref.append(count)
        assert _top_count_sorted(E, lim).clamp_max(width).tolist() == ref
        assert width in ref and min(ref) < width, "rows that reach the mass and rows that do not"


@pytest.mark.parametrize("family,method", [("gpt2", "fast"), ("llama_gqa", "fast"),
                                           ("neox", "exact"), ("opt", "fast")])
def test_head_curves_equal_plain_forward_passes_with_scaled_query_weights(tiny, tokens, family, method):
    """Each head's metrics at α = its pattern in a plain HF pass whose query projection of that
    head is multiplied by α (all heads of one layer at once: a head's own pattern depends only on
    its own query), averaged over positions ≥ 1 per sequence."""
    model, layout = tiny(family)
    got = head_curves(model, tokens, SWEEP_ALPHAS, method=method)
    assert set(got.method) == {method}
    for l in range(layout.n_layers):
        for j, a in enumerate(SWEEP_ALPHAS):
            hf = tiny_hf_model(family)
            for h in range(layout.n_heads):
                R.scale_query(hf, family, l, h, a)
            _, att = R.forward(hf, tokens)
            for h in range(layout.n_heads):
                want = R.head_means(att[l][:, h])
                for m in R.SWEEP_METRICS:
                    np.testing.assert_allclose(got.metrics.metric(m)[j, :, l, h].numpy(), want[m],
                                               rtol=2e-5, atol=1e-6, err_msg=f"{family} α={a} L{l}H{h} {m}")


def test_head_curves_summary_rows_equal_the_reference(tiny, tokens):
    family = "llama_gqa"
    model, layout = tiny(family)
    summary = head_curves(model, tokens, SWEEP_ALPHAS, method="fast").summary()
    assert len(summary) == layout.n_layers * layout.n_heads * len(SWEEP_ALPHAS)
    atts = {}
    for a in SWEEP_ALPHAS:
        for l in range(layout.n_layers):
            hf = tiny_hf_model(family)
            for h in range(layout.n_heads):
                R.scale_query(hf, family, l, h, a)
            atts[(a, l)] = R.forward(hf, tokens)[1][l]
    for row in summary.itertuples(index=False):
        want = R.head_means(atts[(row.scale, row.layer)][:, row.head])
        for m in R.SWEEP_METRICS:
            mean, low, high = R.t_interval(want[m])
            got = [getattr(row, f"mean_{m}"), getattr(row, f"mean_{m}_ci_low"),
                   getattr(row, f"mean_{m}_ci_high")]
            np.testing.assert_allclose(got, [mean, low, high], rtol=2e-5, atol=2e-5, err_msg=str(row))
        assert row.n_sequences == tokens.shape[0]


# --------------------------------------------------------------------------- local gain


def test_local_gain_equals_the_reference_at_every_alpha():
    from spectra_lens.metrics import local_gain

    scores, visible = _rows(2, 9, 9)
    for a in (0.5, 1.0, 3.0):
        got = local_gain(scores.float().masked_fill(~visible, float("-inf")), alpha=a)
        want = [R.row_local_gain(scores[t, : t + 1].numpy(), a) for t in range(9)]
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=1e-6)
        # and the finite difference of the reference entropy in ln α
        eps = 1e-4
        fd = [(R.row_entropy(R.softmax(scores[t, : t + 1].numpy(), a * math.exp(eps)))
               - R.row_entropy(R.softmax(scores[t, : t + 1].numpy(), a * math.exp(-eps)))) / (2 * eps)
              for t in range(9)]
        np.testing.assert_allclose(want, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_analytic_gain_equals_the_entropy_derivative_of_plain_forward_passes(tiny, tokens, family):
    """dH/d ln α at α = 1, per-sequence mean over positions ≥ 1: the library's −Var_p(s) from
    one unscaled pass against a central difference of H between two plain HF passes with the
    query weights scaled by e^{±ε}."""
    model, layout = tiny(family)
    got = analytic_gain(model, tokens)
    eps = 1e-3
    for l in range(layout.n_layers):
        ent = {}
        for sign in (1, -1):
            hf = tiny_hf_model(family)
            for h in range(layout.n_heads):
                R.scale_query(hf, family, l, h, math.exp(sign * eps))
            att = R.forward(hf, tokens)[1][l]
            ent[sign] = [R.head_means(att[:, h])["entropy"] for h in range(layout.n_heads)]
        for h in range(layout.n_heads):
            fd = (ent[1][h] - ent[-1][h]) / (2 * eps)
            np.testing.assert_allclose(got[:, l, h].numpy(), fd, rtol=2e-3, atol=2e-5)

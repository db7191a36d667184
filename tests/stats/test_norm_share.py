"""norm_share from per-document moments: its point value and its document-bootstrap interval
equal the same quantities computed from the tokens, and it is 0 where ‖q‖ is constant per bin."""

import numpy as np
import pytest
import torch

from spectra_lens.capture import MetricCapture, attached
from spectra_lens.reference import estimate_reference_norm
from spectra_lens.stats.counterfactual import norm_share
from spectra_lens.stats.inference import _bootstrap_counts
from spectra_lens.stats.moments import DocumentMoments, counterfactual_variables


def _tokens(seed=0, n_seq=6, n_heads=2, n_pos=16):
    """Token values [sequence, head, pos, var] of the counterfactual variables, and documents."""
    rng = np.random.default_rng(seed)
    names = counterfactual_variables(n_pos, 1)
    pos = np.arange(n_pos)
    bins = np.array([(int(t) + 1).bit_length() - 1 for t in pos])
    h = rng.normal(size=(n_seq, n_heads, n_pos)) + 0.1 * bins
    cf = 0.5 * h + rng.normal(scale=0.3, size=h.shape)
    cols = {"entropy": h, "entropy_cf": cf, "abs_delta_h_cf": np.abs(h - cf)}
    for name in names[3:]:
        b = int(name.removeprefix("position_bin_"))
        cols[name] = np.broadcast_to((bins == b).astype(float), h.shape)
    values = np.stack([cols[n] for n in names], axis=-1)
    valid = np.ones(h.shape, bool)
    valid[..., 0] = False  # min_position 1
    docs = np.array([0, 0, 1, 2, 3, 4])[:n_seq]
    return values, valid, docs, names, bins


def _share_from_tokens(h, cf, bins):
    raw = 1 - cf.var() / h.var()
    wh = sum(((h[bins == b] - h[bins == b].mean()) ** 2).sum() for b in np.unique(bins))
    wc = sum(((cf[bins == b] - cf[bins == b].mean()) ** 2).sum() for b in np.unique(bins))
    return raw, 1 - wc / wh


def test_norm_share_equals_token_computation():
    values, valid, docs, names, bins = _tokens()
    m = DocumentMoments.from_tokens(values, valid, docs, layers=[0, 0], heads=[0, 1], variables=names)
    got = norm_share(m, exclude_documents=[4], n_boot=50, seed=3)
    keep = docs != 4
    for k in range(2):
        sel = valid[keep, k]
        h = values[keep, k][sel][:, 0]
        cf = values[keep, k][sel][:, 1]
        b = np.broadcast_to(bins, valid[keep, k].shape)[sel]
        raw, within = _share_from_tokens(h, cf, b)
        assert got["norm_share"][k] == pytest.approx(raw, abs=1e-12)
        assert got["norm_share_given_position"][k] == pytest.approx(within, abs=1e-12)
        assert got["mean_abs_delta_h_cf"][k] == pytest.approx(np.abs(h - cf).mean(), abs=1e-12)
    assert (got["n_documents_norm_share"] == 4).all()  # document 4 is the selection


def test_interval_resamples_documents():
    """Each bootstrap replicate is the share of the tokens of the documents drawn (a document
    drawn twice counts twice); the interval is the percentile interval of those replicates."""
    values, valid, docs, names, bins = _tokens(seed=1)
    m = DocumentMoments.from_tokens(values, valid, docs, layers=[0, 0], heads=[0, 1], variables=names)
    n_boot, seed = 40, 7
    got = norm_share(m, n_boot=n_boot, seed=seed, chunk=7)
    counts = _bootstrap_counts(m.n_documents, n_boot, seed)
    reps = []
    for c in counts:
        hs, cfs = [], []
        for g, doc in enumerate(m.documents):
            rows = np.flatnonzero(docs == doc)
            for _ in range(int(c[g])):
                hs.append(values[rows, 0][valid[rows, 0]][:, 0])
                cfs.append(values[rows, 0][valid[rows, 0]][:, 1])
        h, cf = np.concatenate(hs), np.concatenate(cfs)
        reps.append(1 - cf.var() / h.var())
    low, high = np.percentile(reps, [2.5, 97.5])
    assert got["norm_share_ci_low"][0] == pytest.approx(low, abs=1e-10)
    assert got["norm_share_ci_high"][0] == pytest.approx(high, abs=1e-10)
    assert low < got["norm_share"][0] < high
    # a different draw of documents moves the interval
    other = norm_share(m, n_boot=n_boot, seed=seed + 1)
    assert other["norm_share_ci_low"][0] != got["norm_share_ci_low"][0]


def test_norm_share_zero_when_norm_constant_per_bin(tiny):
    """A model whose effective queries are all rescaled to a norm that depends on the position
    bin only: r equals that norm, α = 1, H_cf = H, norm_share = 0 (and its interval is 0)."""
    model, layout = tiny("llama_gqa")
    tokens = torch.randint(1, 97, (6, 16), generator=torch.Generator().manual_seed(5))
    bins = torch.tensor([(t + 1).bit_length() - 1 for t in range(16)], dtype=torch.float32)
    target = (1.0 + 0.5 * bins)[None, :, None, None]

    def fixed_norm(q, hook):
        return q / q.norm(dim=-1, keepdim=True) * target

    hooks = [(layout.q_hook(l), fixed_norm) for l in range(layout.n_layers)]
    with attached(model, *hooks, layout=layout):
        ref = estimate_reference_norm(model, [tokens[:2]], (0,), n_bins=5, layout=layout)
    cap = MetricCapture(layout, reference=ref)
    tm = cap.run(model, tokens, interventions=hooks)
    docs = np.array([0, 1, 2, 3, 4, 5])
    m = DocumentMoments.from_metrics(tm, docs, variables=counterfactual_variables(16, 1))
    got = norm_share(m, exclude_documents=[0], n_boot=100)
    assert np.abs(got["norm_share"]).max() < 1e-4
    assert np.abs(got["norm_share_given_position"]).max() < 1e-4
    assert np.abs(got[["norm_share_ci_low", "norm_share_ci_high"]].to_numpy()).max() < 1e-4
    assert got["mean_abs_delta_h_cf"].max() < 1e-5
    # without the fixed norms the same model's norm share is not 0
    tm2 = MetricCapture(layout, reference=estimate_reference_norm(
        model, [tokens[:2]], (0,), n_bins=5, layout=layout)).run(model, tokens)
    m2 = DocumentMoments.from_metrics(tm2, docs, variables=counterfactual_variables(16, 1))
    assert np.abs(norm_share(m2, exclude_documents=[0], n_boot=20)["norm_share"]).max() > 1e-2

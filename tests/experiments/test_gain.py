"""EXP2 (experiments/gain.py): fitted gains against ln α and the analytic local gain."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from spectra_lens.experiments import gain

from spectra_lens.capture import count_hooks
from spectra_lens.config import ALPHAS_21, GainConfig
from spectra_lens.errors import SpectraError
from spectra_lens.stats.fits import fit_log_slope
from spectra_lens.sweep import head_curves

SUMMARY_COLUMNS = (
    "layer", "head", "head_type", "gain_entropy", "gain_entropy_ci_low", "gain_entropy_ci_high",
    "gain_max_attn", "gain_max_attn_ci_low", "gain_max_attn_ci_high", "gain_k_eff", "gain_k_eff_pr",
    "gain_k_eff_top90", "r_squared", "std_error", "is_monotonic", "intercept", "r_squared_max_attn",
    "std_error_max_attn", "is_monotonic_max_attn", "r_squared_k_eff", "std_error_k_eff",
    "is_monotonic_k_eff", "analytic_gain", "analytic_gain_ci_low", "analytic_gain_ci_high",
    "analytic_gain_applies", "fd_gain_entropy", "mean_entropy_unscaled", "n_sequences", "method",
    "reason",
)


@pytest.fixture(scope="module")
def toks() -> torch.Tensor:
    return torch.randint(1, 97, (4, 12), generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("family, method", [("llama_gqa", "fast"), ("qwen3", "fast"), ("bloom", "exact")])
def test_run_writes_gain_summary(tmp_path, tiny, toks, family, method):
    model, layout = tiny(family)
    out = tmp_path / "exp2"
    result = gain.run(GainConfig(out=str(out)), model=model, tokens=toks, progress=False)
    s = pd.read_csv(out / "gain_summary.csv", keep_default_na=False)
    assert [c for c in SUMMARY_COLUMNS if c not in s.columns] == []
    assert len(s) == layout.n_layers * layout.n_heads
    assert set(s["method"]) == {method}
    assert (s["reason"] != "").all() == (method == "exact")
    assert sorted(s["head_type"]) == sorted(["target", "control"] + [""] * (len(s) - 2))
    assert (s["gain_entropy"] < 0).all() and (s["gain_max_attn"] > 0).all()
    assert (s["analytic_gain"] <= 0).all()
    assert "gain_entropy" in result._repr_html_()
    assert (s["analytic_gain_ci_low"] <= s["analytic_gain"]).all()
    if method == "fast":
        # the entropy of a bilinear head falls monotonically; the analytic gain is its derivative
        assert s["is_monotonic"].all() and s["analytic_gain_applies"].all()
        np.testing.assert_allclose(s["fd_gain_entropy"], s["analytic_gain"], rtol=0.05, atol=2e-3)
    else:
        assert not s["analytic_gain_applies"].any()
    curves = pd.read_csv(out / "gain_curves.csv")
    assert len(curves) == len(s) * len(ALPHAS_21)
    for name in ("gain_heatmap_entropy", "gain_heatmap_analytic_gain", "gain_comparison", "gain_vs_analytic"):
        assert (out / "figures" / f"{name}.html").exists()
    l, h = result.choice.target
    assert (out / "figures" / f"gain_fit_L{l}_H{h}_target.html").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["experiment"] == "gain" and manifest["status"] == "complete"
    assert set(manifest["methods"].values()) == {method}
    assert not [p for p in out.rglob(".tmp*")]
    assert count_hooks(model) == 0


def test_gain_table_matches_fit_log_slope(tiny, toks):
    model, layout = tiny("neox")
    alphas = (0.25, 0.5, 1.0, 2.0, 4.0)
    sweep = head_curves(model, toks, alphas)
    table = gain.gain_table(sweep, layout)
    row = table[(table["layer"] == 1) & (table["head"] == 2)].iloc[0]
    curve = sweep.metrics.entropy[:, :, 1, 2].double().mean(1).numpy()
    fit = fit_log_slope(alphas, curve)
    assert row["gain_entropy"] == pytest.approx(fit.slope)
    assert row["r_squared"] == pytest.approx(fit.r_squared)
    assert row["std_error"] == pytest.approx(fit.std_error)
    # mean of per-sequence slopes = slope of the mean curve, so the interval brackets it
    assert row["gain_entropy_ci_low"] <= row["gain_entropy"] <= row["gain_entropy_ci_high"]
    assert row["mean_entropy_unscaled"] == pytest.approx(curve[2])
    assert row["analytic_gain"] == pytest.approx(float(sweep.local_gain[:, 1, 2].double().mean()))


def test_gain_rejects_bad_grids(tmp_path, tiny, toks):
    model, _ = tiny("gpt2")
    for alphas, words in (((1.0, 2.0), "at least 3"), ((0.5, 1.0, -2.0), "> 0"), ((), "empty")):
        with pytest.raises(SpectraError, match=words):
            gain.run(GainConfig(out=str(tmp_path / "g"), alphas=alphas), model=model, tokens=toks,
                     progress=False)
    with pytest.raises(SpectraError, match="head"):
        gain.run(GainConfig(out=str(tmp_path / "g2"), target_head=4), model=model, tokens=toks, progress=False)

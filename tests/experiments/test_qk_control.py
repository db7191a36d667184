"""EXP3 (experiments/qk_control.py): query scaling vs key scaling."""

import json

import pandas as pd
import pytest
import torch
from spectra_lens.experiments import qk_control

from spectra_lens.capture import count_hooks
from spectra_lens.config import QKConfig
from spectra_lens.errors import SpectraError
from spectra_lens.interventions import KeyScale, QueryScale
from spectra_lens.metrics import rescale_pattern
from spectra_lens.runs.pipeline import RunTokens
from spectra_lens.sweep import intervention_effects

ALPHAS = (0.5, 1.0, 2.0, 4.0)
COMPARISON_COLUMNS = ("scaled", "scale", "layer", "head", "kv_head", "is_target", "mean_entropy",
                      "mean_entropy_ci_low", "mean_entropy_ci_high", "mean_max_attn", "mean_k_eff",
                      "delta_entropy", "delta_loss", "kl_from_unscaled", "max_abs_pattern_diff_qk",
                      "max_abs_dev_from_prediction", "prediction", "pattern_changed", "group_size",
                      "method", "bilinear", "reason")
SENSITIVITY_COLUMNS = ("layer", "head", "kv_head", "is_target", "entropy_slope_q", "entropy_slope_k",
                       "sensitivity_ratio", "max_attn_slope_q", "max_attn_slope_k", "k_eff_slope_q",
                       "k_eff_slope_k", "max_abs_delta_loss_q", "max_abs_delta_loss_k", "max_kl_q",
                       "max_kl_k", "pattern_changed_q", "pattern_changed_k", "max_abs_pattern_diff_qk")


@pytest.fixture(scope="module")
def toks() -> torch.Tensor:
    return torch.randint(1, 97, (3, 12), generator=torch.Generator().manual_seed(13))


def _run(tmp_path, tiny, toks, family, **kw):
    model, layout = tiny(family)
    cfg = QKConfig(out=str(tmp_path / family), alphas=ALPHAS, target_layer=1, target_head=3, **kw)
    result = qk_control.run(cfg, model=model, tokens=toks, progress=False)
    assert "sensitivity_ratio" in result._repr_html_()
    assert count_hooks(model) == 0
    return result, layout


@pytest.mark.parametrize("family", ["gpt2", "neox"])
def test_query_and_key_scaling_agree_without_grouped_keys(tmp_path, tiny, toks, family):
    result, layout = _run(tmp_path, tiny, toks, family)
    assert result.group == (3,) and result.kv_head == 3
    c = result.comparison
    assert c["max_abs_pattern_diff_qk"].max() <= 1e-5
    assert c["max_abs_dev_from_prediction"].max() <= 1e-5  # both equal softmax(α·s)
    q, k = (c[c["scaled"] == s].reset_index(drop=True) for s in ("query", "key"))
    for col in ("mean_entropy", "delta_loss", "kl_from_unscaled"):
        pd.testing.assert_series_equal(q[col], k[col], atol=1e-5, rtol=1e-4)
    s = result.sensitivity.iloc[0]
    assert s["sensitivity_ratio"] == pytest.approx(1.0, abs=1e-4) and s["entropy_slope_q"] < 0


def test_grouped_keys_change_every_head_of_the_group(tmp_path, tiny, toks):
    result, layout = _run(tmp_path, tiny, toks, "llama_gqa")
    assert result.kv_head == 3 // (layout.n_heads // layout.n_kv_heads) == 1
    assert result.group == (2, 3)
    s = result.sensitivity.set_index("head")
    assert s.loc[3, "is_target"] and not s.loc[2, "is_target"]
    assert s.loc[2, "pattern_changed_k"] and not s.loc[2, "pattern_changed_q"]
    assert s.loc[3, "pattern_changed_k"] and s.loc[3, "pattern_changed_q"]
    assert s.loc[3, "sensitivity_ratio"] == pytest.approx(1.0, abs=1e-4)
    assert s.loc[2, "sensitivity_ratio"] == 0 and s.loc[2, "entropy_slope_k"] < 0
    assert s.loc[3, "max_abs_pattern_diff_qk"] <= 1e-5 and s.loc[2, "max_abs_pattern_diff_qk"] > 1e-3
    c = result.comparison
    # every pattern is what the bilinear prediction says: softmax(α·s) where scaled, else unchanged
    assert c["max_abs_dev_from_prediction"].max() <= 1e-5
    # the output feels the difference: key scaling moves two heads
    big = c[(c["scale"] == 4.0) & (c["head"] == 3)].set_index("scaled")
    assert big.loc["key", "kl_from_unscaled"] != pytest.approx(big.loc["query", "kl_from_unscaled"], rel=1e-3)


def test_soft_capping_breaks_the_softmax_prediction(tmp_path, tiny, toks):
    result, layout = _run(tmp_path, tiny, toks, "gemma2")
    c = result.comparison
    target = c[c["is_target"]]
    assert target["max_abs_pattern_diff_qk"].max() <= 1e-5  # q·k scales the same either way
    at4 = target[target["scale"] == 4.0]
    assert (at4["max_abs_dev_from_prediction"] > 1e-4).all()  # but not as softmax(α·s)
    assert not c["bilinear"].any() and "soft-capped" in c["reason"].iloc[0]
    others = c[~c["is_target"]]
    assert others[others["scaled"] == "key"]["pattern_changed"].any()
    assert not others[others["scaled"] == "query"]["pattern_changed"].any()


def test_files_and_columns(tmp_path, tiny, toks):
    result, _ = _run(tmp_path, tiny, toks, "qwen3")
    out = result.out
    comparison = pd.read_csv(out / "qk_comparison_results.csv")
    sensitivity = pd.read_csv(out / "sensitivity_summary.csv")
    assert [c for c in COMPARISON_COLUMNS if c not in comparison.columns] == []
    assert [c for c in SENSITIVITY_COLUMNS if c not in sensitivity.columns] == []
    assert len(comparison) == 2 * len(ALPHAS) * len(result.group)
    assert set(comparison["scaled"]) == {"query", "key"}
    for stem in ("qk_entropy_comparison", "qk_delta_entropy", "qk_max_attn_comparison", "qk_keff_comparison"):
        assert (out / "figures" / f"{stem}_L1_H3.html").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["experiment"] == "qk_control" and manifest["group"] == list(result.group)
    assert "KeyScale" in manifest["interventions"]["key"]
    assert not [p for p in out.rglob(".tmp*")]


def test_bad_input(tmp_path, tiny, toks):
    model, _ = tiny("gpt2")
    for kw, words in ((dict(target_head=4), "head"), (dict(alphas=(0.0, 1.0)), "> 0"),
                      (dict(alphas=()), "empty"), (dict(target_layer=-1), "target_layer")):
        with pytest.raises(SpectraError, match=words):
            qk_control.run(QKConfig(out=str(tmp_path / "x"), **kw), model=model, tokens=toks, progress=False)


def _held_pattern_comparison(sweeps, layer, target, group, kv_head) -> pd.DataFrame:
    """The comparison recomputed from both sweeps' full patterns `[α, batch, T, T]` at once."""
    frames = []
    for scaled in ("query", "key"):
        sw, other = sweeps[scaled], sweeps["key" if scaled == "query" else "query"]
        for head in group:
            f = sw.head_frame(layer, head)
            f.insert(0, "scaled", scaled)
            f.insert(3, "kv_head", kv_head)
            f.insert(4, "is_target", head == target)
            base = sw.base_patterns[(layer, head)]
            head_is_scaled = scaled == "key" or head == target
            pats, others = sw.patterns[(layer, head)], other.patterns[(layer, head)]
            f["max_abs_pattern_diff_qk"] = [float((pats[i] - others[i]).abs().max()) for i in range(len(sw.alphas))]
            f["max_abs_dev_from_prediction"] = [
                float((pats[i] - (rescale_pattern(base, a) if head_is_scaled else base)).abs().max())
                for i, a in enumerate(sw.alphas)]
            f["prediction"] = "softmax(alpha*s)" if head_is_scaled else "unchanged"
            f["pattern_changed"] = [float((pats[i] - base).abs().max()) > qk_control.CHANGE_TOL
                                    for i in range(len(sw.alphas))]
            frames.append(f)
    return pd.concat(frames, ignore_index=True)


@pytest.mark.parametrize("max_rows", [2, 32])
def test_streamed_comparison_equals_the_held_patterns(tiny, max_rows):
    # 5 sequences: max_rows 2 runs blocks of 2, 2, 1 sequences and one α per pass; 32 one block
    # with every α in one pass. The running maxima must equal the maxima over all patterns.
    model, layout = tiny("llama_gqa")
    toks = torch.randint(1, 97, (5, 12), generator=torch.Generator().manual_seed(21))
    result = qk_control.compute(QKConfig(alphas=ALPHAS, target_layer=1, target_head=3, max_rows=max_rows),
                                model, RunTokens(select=toks, measure=toks, held_out=False, corpus="random ids"))
    assert all(not sw.patterns and not sw.base_patterns for sw in result.sweeps.values())
    layer, group = 1, result.group
    held = {"query": intervention_effects(model, toks, ALPHAS, QueryScale.scan(layer, 3), layers=[layer],
                                          patterns_for=[(layer, h) for h in group], max_rows=max_rows),
            "key": intervention_effects(model, toks, ALPHAS, KeyScale.scan(layer, result.kv_head), layers=[layer],
                                        patterns_for=[(layer, h) for h in group], max_rows=max_rows)}
    expected = _held_pattern_comparison(held, layer, 3, group, result.kv_head)
    pd.testing.assert_frame_equal(result.comparison[list(expected.columns)], expected, check_exact=True)
    # the key scaling moves the other head of the group, so the maxima are not trivially 0
    assert expected["max_abs_pattern_diff_qk"].max() > 1e-3

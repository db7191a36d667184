"""`spectra-lens ablate-norm` and `spectra-lens causal-map` end to end on a tiny model."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from spectra_lens.experiments import ablate_norm, cli

from spectra_lens.capture import count_hooks
from spectra_lens.config import AblateNormConfig, CausalMapConfig
from spectra_lens.data.shards import write_shards
from spectra_lens.errors import SpectraError
from spectra_lens.runs import pipeline
from spectra_lens.runs.rundir import LOCK

SEQ = 12


@pytest.fixture()
def shards(tmp_path):
    """14 sequences of 12 tokens from 7 documents (two sequences each, in document order)."""
    tokens = torch.randint(1, 97, (14, SEQ), generator=torch.Generator().manual_seed(21))
    docs = [d for d in range(7) for _ in range(2)]
    write_shards(tokens, tmp_path / "shards", shard_size=7, tokenizer_name="tiny", documents=docs)
    return tmp_path / "shards", tokens, docs


def test_selection_and_measured_documents_are_disjoint(tiny, shards):
    model, _ = tiny("llama_gqa")
    path, tokens, docs = shards
    cfg = AblateNormConfig(corpus=str(path), seq_len=SEQ, n_select=3, n_sequences=6)
    got = ablate_norm.disjoint_tokens(cfg, model)
    # the 3rd selection sequence is document 1's first: document 1's second is not measured
    assert list(got.select_documents) == [0, 0, 1]
    assert list(got.measure_documents) == [2, 2, 3, 3, 4, 4]
    assert torch.equal(got.select, tokens[:3]) and torch.equal(got.measure, tokens[4:10])
    assert not set(got.select_documents) & set(got.measure_documents)
    with pytest.raises(SpectraError, match="not used for selection"):
        ablate_norm.disjoint_tokens(AblateNormConfig(corpus=str(path), seq_len=SEQ, n_select=3, n_sequences=11),
                                    model)


def test_shards_without_document_ids_are_refused(tiny, tmp_path):
    model, _ = tiny("llama_gqa")
    write_shards(torch.randint(1, 97, (8, SEQ)), tmp_path / "s", shard_size=8, tokenizer_name="tiny")
    with pytest.raises(SpectraError, match="document ids"):
        ablate_norm.disjoint_tokens(AblateNormConfig(corpus=str(tmp_path / "s"), seq_len=SEQ, n_select=2,
                                                     n_sequences=4), model)


def _argv(path, out, *extra):
    return ["--model", "tiny", "--corpus", str(path), "--out", str(out), "--seq-len", str(SEQ),
            "--n-sequences", "6", "--n-select", "3", "--n-boot", "200", "--no-progress", *extra]


def test_cli_end_to_end(tmp_path, tiny, shards, monkeypatch, capsys):
    model, layout = tiny("llama_gqa")
    path, _, _ = shards
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: model)
    out = tmp_path / "abl"
    assert cli.main(["ablate-norm", *_argv(path, out)]) == 0
    assert "norm ablation of 8 heads" in capsys.readouterr().out
    t = pd.read_csv(out / "norm_ablation.csv")
    assert len(t) == layout.n_layers * layout.n_heads
    assert list(zip(t["layer"], t["head"])) == [(l, h) for l in range(2) for h in range(4)]
    assert list(t["head_label"][:2]) == ["L0H0", "L0H1"]
    for cond in ("norm", "mean_ablation", "rotation"):
        assert (t[f"{cond}_kl_ci_low"] >= 0).all() and (t[f"{cond}_kl"] >= t[f"{cond}_kl_ci_low"]).all()
        assert (t[f"{cond}_kl"] <= t[f"{cond}_kl_ci_high"]).all()
        assert t[f"{cond}_delta_loss_ci_low"].notna().all()
    assert t.loc[t["layer"] == 1, "norm_later_abs_delta_entropy"].isna().all()
    assert (t["mean_ablation_own_delta_entropy"] == 0).all()
    assert set(t["n_documents"]) == {3} and set(t["n_sequences"]) == {6}
    assert "norm_minus_rotation_kl_ci_low" in t.columns and (t["rotation_angle_rad"] > 0).all()
    ref = pd.read_csv(out / "reference_norms.csv")
    assert (ref["reference_norm"] > 0).all() and set(ref["bin"]) == {0, 1, 2, 3, 4}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["model"]["spec"] == "tiny"
    assert manifest["tokens"]["documents_disjoint"] is True
    assert manifest["tokens"]["selection_documents"] == [0, 1]
    assert manifest["tokens"]["measured_documents"] == [2, 3, 4]
    assert "geometric-mean" in manifest["reference"]["rule"] and "disjoint" in manifest["reference"]["rule"]
    assert manifest["passes"]["early_layers_skipped"] is True
    assert set(manifest["outputs"]) >= {"norm_ablation.csv", "reference_norms.csv"}
    assert (out / "figures" / "norm_ablation_kl_map.html").exists()
    assert not (out / LOCK).exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp")]
    assert cli.main(["ablate-norm", *_argv(path, out)]) == 2  # a finished run is not replaced silently
    assert "overwrite" in capsys.readouterr().err

    m_out = tmp_path / "map"
    argv = _argv(path, m_out, "--norm-ablation", str(out / "norm_ablation.csv"), "--alphas", "0.5", "2")
    assert cli.main(["causal-map", *argv]) == 0
    assert "Spearman(gain_analytic, KL)" in capsys.readouterr().out
    m = pd.read_csv(m_out / "causal_map.csv")
    assert len(m) == 2 * layout.n_layers * layout.n_heads
    assert sorted(set(m["alpha"])) == [0.5, 2.0]
    assert m.groupby(["layer", "head"]).size().eq(2).all()
    assert (m["kl_ci_low"] >= 0).all() and m["gain_analytic"].lt(0).all()
    assert m["norm_kl"].notna().all()
    merged = m.merge(t[["layer", "head", "norm_kl"]], on=["layer", "head"], suffixes=("", "_src"))
    assert np.allclose(merged["norm_kl"], merged["norm_kl_src"])
    s = pd.read_csv(m_out / "causal_map_summary.csv")
    row = s[(s["alpha"] == 2.0) & (s["x"] == "gain_analytic") & (s["y"] == "kl")].iloc[0]
    assert row["n_heads"] == 8 and row["spearman_ci_low"] <= row["spearman"] <= row["spearman_ci_high"]
    assert (m_out / "figures" / "causal_map_gain_vs_kl.html").exists()
    assert (m_out / "figures" / "causal_map_kl_alpha_2.html").exists()
    assert json.loads((m_out / "manifest.json").read_text())["status"] == "complete"
    assert count_hooks(model) == 0


def test_heads_flag_and_bad_input(tmp_path, tiny, shards, monkeypatch, capsys):
    model, _ = tiny("llama_gqa")
    path, _, _ = shards
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: model)
    out = tmp_path / "two"
    assert cli.main(["ablate-norm", *_argv(path, out, "--heads", "L1H2", "--heads", "L0H3", "--no-baselines")]) == 0
    t = pd.read_csv(out / "norm_ablation.csv")
    assert list(t["head_label"]) == ["L0H3", "L1H2"] and "rotation_kl" not in t.columns
    assert cli.main(["ablate-norm", *_argv(path, tmp_path / "bad", "--heads", "L5H0")]) == 2
    assert "layer" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert cli.main(["causal-map", *_argv(path, tmp_path / "m", "--alphas", "1", "2")]) == 2
    assert "must not include 1" in capsys.readouterr().err
    assert cli.main(["causal-map", *_argv(path, tmp_path / "m", "--norm-ablation", str(tmp_path / "none.csv"))]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SpectraError, match="n_select"):
        CausalMapConfig(n_select=0).validate()

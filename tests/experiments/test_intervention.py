"""EXP1 (experiments/intervention.py) and the run pipeline it starts from (spectra_lens.runs.pipeline)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from spectra_lens.experiments import cli, intervention

from spectra_lens.capture import count_hooks
from spectra_lens.config import InterventionConfig
from spectra_lens.data.shards import write_shards
from spectra_lens.errors import SpectraError
from spectra_lens.interventions import QueryScale
from spectra_lens.kernels.alpha import alpha_metrics
from spectra_lens.runs import pipeline
from spectra_lens.sweep import intervention_effects

ALPHAS = (0.5, 1.0, 2.0, 4.0)
HEAD_COLUMNS = ("scale", "layer", "head", "head_type", "mean_entropy", "mean_max_attn", "mean_k_eff",
                "mean_entropy_ci_low", "mean_entropy_ci_high", "mean_max_attn_ci_low",
                "mean_max_attn_ci_high", "mean_k_eff_ci_low", "mean_k_eff_ci_high", "k_eff_pr",
                "k_eff_top90", "delta_entropy", "delta_entropy_ci_low", "delta_entropy_ci_high",
                "delta_loss", "delta_loss_ci_low", "delta_loss_ci_high", "kl_from_unscaled",
                "kl_from_unscaled_ci_low", "kl_from_unscaled_ci_high", "n_sequences",
                "mean_entropy_fast", "analytic_gain", "method", "fast_path_valid", "reason")


@pytest.fixture(scope="module")
def toks() -> torch.Tensor:
    return torch.randint(1, 97, (4, 12), generator=torch.Generator().manual_seed(3))


def _no_temp_files(path):
    return not [p for p in path.rglob("*") if p.name.startswith(".tmp") or p.suffix == ".tmp"]


@pytest.mark.parametrize("family", ["llama_gqa", "gemma2"])
def test_run_writes_tables_figures_and_manifest(tmp_path, tiny, toks, family):
    model, layout = tiny(family)
    out = tmp_path / "exp1"
    cfg = InterventionConfig(out=str(out), alphas=ALPHAS, target_layer=1, target_head=2, control_head=0)
    result = intervention.run(cfg, model=model, tokens=toks, progress=False)
    assert "target" in result._repr_html_() and "<table" in result._repr_html_()
    assert result.heads == {"target": (1, 2), "control": (1, 0)}
    for role, (l, h) in result.heads.items():
        frame = pd.read_csv(out / f"q_scale_intervention_L{l}_H{h}_{role}.csv")
        assert [c for c in HEAD_COLUMNS if c not in frame.columns] == []
        assert list(frame["scale"]) == list(ALPHAS) and set(frame["head_type"]) == {role}
        assert set(frame["method"]) == {"exact"}
        assert bool(frame["fast_path_valid"].iloc[0]) == layout.q_bilinear[1]
        one = frame[frame["scale"] == 1.0].iloc[0]
        assert one["delta_loss"] == 0 and one["kl_from_unscaled"] == 0 and one["delta_entropy"] == 0
        if layout.q_bilinear[1]:  # the fast path's prediction is the measurement
            assert (frame["mean_entropy"] - frame["mean_entropy_fast"]).abs().max() < 1e-5
        else:  # soft-capping: softmax(α·s) is not what query scaling does
            assert (frame["mean_entropy"] - frame["mean_entropy_fast"]).abs().max() > 1e-6
            assert "soft-capped" in frame["reason"].iloc[0]
        down = pd.read_csv(out / f"downstream_heads_L{l}_H{h}_{role}.csv")
        for c in ("head_type", "scaled_layer", "scaled_head", "scale", "layer", "head", "entropy",
                  "delta_entropy", "delta_entropy_ci_low", "delta_entropy_ci_high", "delta_max_attn",
                  "is_scaled_head"):
            assert c in down.columns
        assert down["is_scaled_head"].sum() == len(ALPHAS)
        for stem in ("entropy_vs_scale", "max_attn_vs_scale", "keff_vs_scale", "intervention_combined"):
            assert (out / "figures" / f"{stem}_L{l}_H{h}.html").exists()
    assert (out / "figures" / "intervention_output_effects.html").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["experiment"] == "intervention" and manifest["status"] == "complete"
    assert manifest["config"]["alphas"] == list(ALPHAS) and manifest["seed"] == 0
    assert manifest["selection"]["target"] == [1, 2] and "torch" in manifest["versions"]
    assert {"load_model_s", "target_sweep_s", "control_sweep_s"} <= set(manifest["timings"])
    assert _no_temp_files(out)
    assert count_hooks(model) == 0


def test_default_heads_follow_the_rule(tmp_path, tiny, toks):
    model, layout = tiny("gpt2")
    result = intervention.run(InterventionConfig(out=str(tmp_path / "r"), alphas=ALPHAS),
                              model=model, tokens=toks, progress=False)
    gains = result.choice.gains[layout.n_layers // 2]
    target, control = result.heads["target"], result.heads["control"]
    assert target == (layout.n_layers // 2, min(range(layout.n_heads), key=gains.__getitem__))
    # the control: the rule's first candidate (r near 0, its document interval covering 0)
    sel = result.control_selection
    assert list(sel["rank"]) == list(range(1, len(sel) + 1)) and len(sel) == 5
    assert sel["chosen"].sum() == 1 and sel.loc[sel["chosen"], "rank"].iloc[0] == 1
    chosen = sel[sel["chosen"]].iloc[0]
    assert (int(chosen["layer"]), int(chosen["head"])) == control != target
    assert chosen["eligible"] and chosen["p_doc"] >= 0.05 and chosen["r_ci_low"] <= 0 <= chosen["r_ci_high"]
    eligible = sel[sel["eligible"]]
    assert chosen["control_score"] == eligible["control_score"].min()
    assert set(sel["role"].fillna("")) == {"control", ""}
    written = pd.read_csv(tmp_path / "r" / "control_selection.csv")
    assert len(written) == 5 and written["chosen"].sum() == 1
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert "jackknife" in manifest["selection"]["rule"] and "r(log ||q||, entropy)" in manifest["selection"]["rule"]
    assert manifest["controls"]["control_chosen_by"] == "rule"
    assert [c["rank"] for c in manifest["controls"]["control_candidates"]] == [1, 2, 3, 4, 5]


def test_rerun_refuses_without_overwrite(tmp_path, tiny, toks):
    model, _ = tiny("gpt2")
    cfg = InterventionConfig(out=str(tmp_path / "r"), alphas=ALPHAS, target_head=0, control_head=1)
    intervention.run(cfg, model=model, tokens=toks, progress=False)
    with pytest.raises(SpectraError, match="overwrite"):
        intervention.run(cfg, model=model, tokens=toks, progress=False)
    again = InterventionConfig(out=str(tmp_path / "r"), alphas=ALPHAS, target_head=0, control_head=1,
                               overwrite=True)
    assert intervention.run(again, model=model, tokens=toks, progress=False).out == tmp_path / "r"
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(SpectraError, match="not empty"):
        intervention.run(InterventionConfig(out=str(stray), alphas=ALPHAS), model=model, tokens=toks,
                         progress=False)


@pytest.mark.parametrize("changes, words", [
    (dict(alphas=(0.5, 0.0, 2.0)), "> 0"),
    (dict(alphas=(-1.0, 1.0)), "> 0"),
    (dict(alphas=()), "empty"),
    (dict(alphas=(1.0, 1.0)), "distinct"),
    (dict(target_head=99), "head"),
    (dict(target_layer=7), "layer"),
    (dict(control_head=-1), "control_head"),
    (dict(target_head=1, control_head=1), "differ"),
    (dict(n_sequences=0), "n_sequences"),
    (dict(min_position=500), "min_position"),
])
def test_bad_input_raises_a_clear_error(tmp_path, tiny, toks, changes, words):
    model, _ = tiny("gpt2")
    cfg = InterventionConfig(out=str(tmp_path / "bad"), **{"alphas": ALPHAS, **changes})
    with pytest.raises(SpectraError, match=words):
        intervention.run(cfg, model=model, tokens=toks, progress=False)
    assert count_hooks(model) == 0


def test_tokens_from_shards_hold_out_the_selection_sequences(tmp_path, tiny):
    model, _ = tiny("gpt2")
    tokens = torch.randint(1, 97, (7, 10), generator=torch.Generator().manual_seed(5))
    write_shards(tokens, tmp_path / "shards", shard_size=3, tokenizer_name="tiny")
    cfg = InterventionConfig(corpus=str(tmp_path / "shards"), n_sequences=4, n_select=2, seq_len=10)
    got = pipeline.load_run_tokens(cfg, model)
    assert got.held_out and torch.equal(got.select, tokens[:2]) and torch.equal(got.measure, tokens[2:6])
    short = InterventionConfig(corpus=str(tmp_path / "shards"), n_sequences=6, n_select=4, seq_len=10)
    got = pipeline.load_run_tokens(short, model)  # only one sequence left to hold out
    assert got.held_out and got.select.shape[0] == 1 and torch.equal(got.measure, tokens[1:7])
    with pytest.raises(SpectraError, match="seq_len"):
        pipeline.load_run_tokens(InterventionConfig(corpus=str(tmp_path / "shards"), seq_len=12), model)
    with pytest.raises(SpectraError, match="at least n_sequences"):
        pipeline.load_run_tokens(InterventionConfig(corpus=str(tmp_path / "shards"), n_sequences=9, seq_len=10), model)
    with pytest.raises(SpectraError, match="vocabulary"):
        pipeline.load_run_tokens(cfg, model, tokens=torch.full((2, 5), 500))


def test_cli_main(tmp_path, tiny, monkeypatch, capsys):
    model, _ = tiny("llama_gqa")
    tokens = torch.randint(1, 97, (6, 10), generator=torch.Generator().manual_seed(6))
    write_shards(tokens, tmp_path / "shards", shard_size=6, tokenizer_name="tiny")
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: model)
    out = tmp_path / "cli"
    argv = ["--model", "tiny", "--corpus", str(tmp_path / "shards"), "--out", str(out), "--seq-len", "10",
            "--n-sequences", "4", "--n-select", "2", "--alphas", "0.5,1", "2", "--target-layer", "1",
            "--target-head", "3", "--no-progress"]
    assert cli.main(["intervene", *argv]) == 0
    printed = capsys.readouterr().out
    assert "target  L1H3" in printed and str(out) in printed
    assert (out / "q_scale_intervention_L1_H3_target.csv").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["spec"] == "tiny" and manifest["selection"]["held_out"] is True
    assert manifest["config"]["alphas"] == [0.5, 1.0, 2.0]
    assert cli.main(["intervene", *argv]) == 2  # refuses the finished run
    assert "overwrite" in capsys.readouterr().err
    assert cli.main(["intervene", *argv, "--overwrite"]) == 0
    assert cli.main(["intervene", *argv[:-1], "--overwrite", "--alphas", "0", "1"]) == 2
    assert "> 0" in capsys.readouterr().err


def test_effects_table_has_every_condition_with_bounded_intervals(tmp_path, tiny, toks):
    model, layout = tiny("llama_gqa")
    cfg = InterventionConfig(out=str(tmp_path / "e"), alphas=ALPHAS, target_layer=0, target_head=1,
                             n_boot=200)
    result = intervention.run(cfg, model=model, tokens=toks, progress=False)
    e = pd.read_csv(tmp_path / "e" / "intervention_effects.csv")
    assert set(e["condition"]) == {"target_scale", "control_scale", "sham", "rotation"}
    sham = e[e["condition"] == "sham"].iloc[0]
    assert bool(sham["bitwise_equal"])
    for c in ("delta_loss", "kl_unscaled_scaled", "own_delta_entropy", "later_mean_abs_delta_entropy"):
        assert sham[c] == 0 and sham[f"{c}_ci_low"] == 0 and sham[f"{c}_ci_high"] == 0
    assert (e["kl_unscaled_scaled_ci_low"] >= 0).all()
    assert (e["later_mean_abs_delta_entropy_ci_low"].dropna() >= 0).all()  # NaN: no later layer
    assert (e["kl_unscaled_scaled_ci_low"] <= e["kl_unscaled_scaled"]).all()
    rot = e[e["condition"] == "rotation"]
    spread = result.controls["direction_spread"]["median_angle_rad"]
    assert sorted(rot["angle_multiple"]) == [0.5, 1.0, 2.0]
    assert rot.loc[rot["angle_multiple"] == 1.0, "value"].iloc[0] == pytest.approx(spread)
    assert set(e.loc[e["condition"] == "target_scale", "own_effect"]) == {"identity check"}
    assert set(rot["own_effect"]) == {"outcome"}
    head = pd.read_csv(tmp_path / "e" / "q_scale_intervention_L0_H1_target.csv")
    assert head["own_curve"].str.contains("identity check").all()
    assert (tmp_path / "e" / "figures" / "intervention_effects.html").exists()
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["controls"]["sham"]["bitwise_equal"] is True
    assert "KL(p_1 || p_x)" in manifest["definitions"]["kl_unscaled_scaled"]
    assert count_hooks(model) == 0


def test_intervals_resample_the_documents_the_shards_record(tmp_path, tiny):
    model, _ = tiny("llama_gqa")
    tokens = torch.randint(1, 97, (12, 12), generator=torch.Generator().manual_seed(8))
    docs = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    write_shards(tokens, tmp_path / "shards", shard_size=5, tokenizer_name="tiny", documents=docs)
    cfg = InterventionConfig(out=str(tmp_path / "d"), corpus=str(tmp_path / "shards"), seq_len=12,
                             n_sequences=8, n_select=4, alphas=(0.5, 1.0, 2.0), target_layer=0,
                             target_head=1, n_boot=200)
    run_tokens = pipeline.load_run_tokens(cfg, model)
    assert list(run_tokens.select_documents) == [0, 0, 1, 1]
    assert list(run_tokens.measure_documents) == [2, 2, 3, 3, 4, 4, 5, 5]
    result = intervention.run(cfg, model=model, progress=False)
    assert set(result.effects["n_documents"]) == {4} and set(result.effects["n_sequences"]) == {8}


@pytest.mark.parametrize("source", ["shards", "text"])
def test_selection_and_measured_documents_are_disjoint_and_recorded(tmp_path, tiny, source, monkeypatch):
    """Documents of several sequences each, on both input paths: no document is both chosen on
    and measured, the manifest lists each side's documents, and too few measured documents is
    refused."""
    from spectra_lens.testing import word_corpus, word_tokenizer

    model, _ = tiny("llama_gqa")
    if source == "shards":
        tokens = torch.randint(1, 97, (18, 12), generator=torch.Generator().manual_seed(9))
        docs = [d for d in range(6) for _ in range(3)]  # 6 documents of 3 sequences
        write_shards(tokens, tmp_path / "c", shard_size=7, tokenizer_name="tiny", documents=docs)
        corpus, seq_len = str(tmp_path / "c"), 12
    else:
        monkeypatch.setattr(model, "tokenizer", word_tokenizer(), raising=False)
        (tmp_path / "c").mkdir()
        corpus, seq_len = word_corpus(tmp_path / "c", 8, 60, name="doc{i:02d}.txt"), 12
    cfg = InterventionConfig(out=str(tmp_path / "r"), corpus=corpus, seq_len=seq_len, n_sequences=8,
                             n_select=4, alphas=(0.5, 1.0), target_layer=0, target_head=1, n_boot=100)
    got = pipeline.load_run_tokens(cfg, model)
    sel, meas = set(got.split["select_documents"]), set(got.split["measure_documents"])
    assert got.held_out and sel and len(meas) >= 4 and not sel & meas
    assert set(got.select_documents.tolist()) == sel and set(got.measure_documents.tolist()) == meas
    assert len(got.measure) == 8 and len(got.select) == 4
    intervention.run(cfg, model=model, progress=False)
    split = json.loads((tmp_path / "r" / "manifest.json").read_text())["selection"]["split"]
    assert split["select_documents"] == sorted(sel) and split["measure_documents"] == sorted(meas)
    with pytest.raises(SpectraError, match="remain to measure; at least 4"):
        pipeline.load_run_tokens(InterventionConfig(corpus=corpus, seq_len=seq_len, n_sequences=4,
                                                    n_select=12 if source == "shards" else 20), model)


def test_split_by_document_cuts_between_documents():
    docs = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 5, 5])
    sel, meas = pipeline.split_by_document(docs, 12, 4, 5)
    assert set(docs[sel]).isdisjoint(docs[meas])
    assert list(sel) == [0, 1, 3, 4] and list(meas) == [5, 6, 8, 9, 10]  # round robin over 2..5
    sel, meas = pipeline.split_by_document(None, 7, 4, 6)  # each sequence its own document
    assert list(sel) == [0] and list(meas) == [1, 2, 3, 4, 5, 6]
    sel, meas = pipeline.split_by_document(docs, 12, 4, 12)  # nothing left to hold out
    assert len(sel) == 0 and len(meas) == 12


def _held_pattern_head_tables(model, layout, toks, cfg, heads) -> dict:
    """{role: (q_scale table, downstream table)} from sweeps that keep every pattern
    `[α, batch, T, T]`, the fast path's prediction from all unscaled patterns at once."""
    out = {}
    for role, (l, h) in heads.items():
        sw = intervention_effects(model, toks, cfg.alphas, QueryScale.scan(l, h),
                                  layers=range(l, layout.n_layers), patterns_for=[(l, h)],
                                  min_position=cfg.min_position, max_rows=cfg.max_rows)
        assert sw.patterns[(l, h)].shape == (len(cfg.alphas), *toks.shape, toks.shape[1])
        f = sw.head_frame(l, h, ci=cfg.ci, n_boot=cfg.n_boot, seed=cfg.seed)
        f.insert(3, "head_type", role)
        pattern = sw.base_patterns[(l, h)][:, cfg.min_position:]
        predicted = alpha_metrics(torch.log(pattern), pattern > 0, sw.alphas)
        f["mean_entropy_fast"] = predicted["entropy"].double().mean(1).numpy()
        f["mean_max_attn_fast"] = predicted["max_attn"].double().mean(1).numpy()
        f["mean_k_eff_fast"] = predicted["k_eff_exp"].double().mean(1).numpy()
        d = sw.downstream_frame(ci=cfg.ci, min_layer=l, n_boot=cfg.n_boot, seed=cfg.seed)
        out[role] = (f, d)
    return out


@pytest.mark.parametrize("max_rows", [2, 32])
def test_streamed_fast_prediction_equals_the_held_patterns(tiny, max_rows):
    # 5 sequences: max_rows 2 runs blocks of 2, 2, 1 sequences and one α per pass; 32 one block
    # with every α in one pass. The prediction reduced block by block must equal the one from
    # all unscaled patterns at once, and the sweeps keep no patterns.
    model, layout = tiny("llama_gqa")
    toks = torch.randint(1, 97, (5, 12), generator=torch.Generator().manual_seed(21))
    cfg = InterventionConfig(alphas=ALPHAS, target_layer=0, target_head=1, control_layer=1,
                             control_head=2, max_rows=max_rows, n_boot=50)
    result = intervention.compute(cfg, model, pipeline.RunTokens(select=toks, measure=toks, held_out=False,
                                                          corpus="random ids"))
    assert all(not sw.patterns and not sw.base_patterns for sw in result.sweeps.values())
    expected = _held_pattern_head_tables(model, layout, toks, cfg, result.heads)
    for role, (table, down) in expected.items():
        pd.testing.assert_frame_equal(result.tables[role][list(table.columns)], table, check_exact=True)
        pd.testing.assert_frame_equal(result.downstream[role][list(down.columns)], down, check_exact=True)
    # a bilinear layer: the prediction is the measurement, not a copy of a constant
    target = result.tables["target"]
    assert (target["mean_entropy"] - target["mean_entropy_fast"]).abs().max() < 1e-5
    assert target["mean_entropy_fast"].iloc[0] - target["mean_entropy_fast"].iloc[-1] > 0.01
    unfed = intervention.FastPrediction("target", ALPHAS, 0, 1, min_position=cfg.min_position)
    with pytest.raises(SpectraError, match="covers 0 sequences"):
        unfed.metrics(result.sweeps["target"])

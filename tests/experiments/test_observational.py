"""Tests for experiments.observational (EXP0): planted effects, nulls, confounds, outputs, resume,
bad input and the command line, on a tiny Llama (GQA, rotary) bridge with an offline tokenizer."""

import dataclasses
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from spectra_lens.experiments import cli, observational
from transformers import PreTrainedTokenizerFast

from spectra_lens.capture import attached, count_hooks
from spectra_lens.config import ObservationalConfig
from spectra_lens.data.prepare import prepare
from spectra_lens.data.shards import load_shard
from spectra_lens.errors import SpectraError
from spectra_lens.layout import attention_layout
from spectra_lens.models import bridge_from_hf
from spectra_lens.runs import pipeline
from spectra_lens.stats.decisions import VERDICTS, head_statistics
from spectra_lens.stats.moments import MOMENT_VARIABLES, DocumentMoments, moments_from_records
from spectra_lens.testing import tiny_hf_model, word_corpus, word_tokenizer

TABLES = ("head_summary", "significant_heads", "consistent_heads", "layer_statistics",
          "agreement", "agreement_summary")
PLANTED = (1, 2)  # last layer: the planted scale cannot reach any other head



@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return word_tokenizer()


@pytest.fixture(scope="module")
def bridge(tok):
    model = bridge_from_hf(tiny_hf_model("llama_gqa"), tok)
    assert attention_layout(model).q_bilinear == (True, True)  # larger |q| -> sharper, exactly
    return model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Sixteen random-word documents (~1600 tokens); a glob, as --corpus takes it."""
    return word_corpus(tmp_path_factory.mktemp("corpus"), 16, 100, name="doc{i:02d}.txt")


def config(out, corpus, **kw) -> ObservationalConfig:
    """12 sequences of 24 tokens (12 documents) in 3 shards: ~1 s of capture on a tiny model."""
    base = dict(corpus=corpus, out=str(out), seq_len=24, n_sequences=12, shard_size=4,
                batch_size=4, n_boot=100, top_heads=3, fd_sequences=2,
                records=True)
    return ObservationalConfig(**(base | kw))


@pytest.fixture(scope="module")
def finished(bridge, corpus, tmp_path_factory):
    """One uninterrupted run, shared (read-only) by the tests below."""
    cfg = config(tmp_path_factory.mktemp("finished") / "run", corpus)
    return cfg, observational.run(cfg, model=bridge, progress=False)


def read_manifest(out) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())


def looks_incomplete(out) -> bool:
    """No output that looks complete: no finished manifest and no head summary."""
    out = Path(out)
    if (out / "head_summary.csv").exists():
        return False
    return not (out / "manifest.json").exists() or read_manifest(out)["status"] != "complete"


def figure_traces(html: Path) -> list[dict]:
    """The traces of the figure in a plotly HTML page (the JSON passed to Plotly.newPlot)."""
    text = html.read_text(encoding="utf-8")
    rest = text[text.index("Plotly.newPlot(") + len("Plotly.newPlot("):].lstrip()
    decoder = json.JSONDecoder()
    _, end = decoder.raw_decode(rest)  # the div id
    traces, _ = decoder.raw_decode(rest[end:].lstrip()[1:].lstrip())
    return traces


def has_data(trace: dict) -> bool:
    def filled(v):
        return bool(v.get("bdata")) if isinstance(v, dict) else v is not None and len(v) > 0

    return any(filled(trace.get(axis)) for axis in ("x", "y", "z"))


def head_row(summary: pd.DataFrame, layer: int, head: int) -> pd.Series:
    return summary[(summary["layer"] == layer) & (summary["head"] == head)].iloc[0]


# --- synthetic records --------------------------------------------------------------------

_EXTRA = ("k_norm", "max_attn", "k_eff_exp", "k_eff_pr", "k_eff_top90", "local_gain", "sink_mass")


def synthetic_records(log_q, entropy, *, shard_size: int, rng) -> pd.DataFrame:
    """Records from [layer, head, sequence, position] arrays of ln q_norm and entropy."""
    grid = np.meshgrid(*(np.arange(n) for n in log_q.shape), indexing="ij")
    layer, head, sequence, position = (g.ravel() for g in grid)
    frame = pd.DataFrame({
        "shard": sequence // shard_size, "sequence": sequence, "document": sequence,
        "layer": layer, "head": head,
        "position": position, "q_norm": np.exp(log_q.ravel()), "entropy": entropy.ravel(),
    })
    frame["entropy_norm"] = frame["entropy"] / np.log1p(frame["position"]).clip(lower=1e-3)
    for name in _EXTRA:
        frame[name] = rng.random(len(frame))
    return frame


SYNTHETIC_VARIABLES = ("log_q_norm", "q_norm", "log_position", "sink_mass", "entropy",
                       "entropy_norm", "max_attn", "k_eff_exp", "k_eff_top90", "local_gain")


def moments_of(records: pd.DataFrame, min_position: int = 1) -> DocumentMoments:
    return moments_from_records(records, SYNTHETIC_VARIABLES, min_position=min_position)


def ar1(rng, shape, phi=0.6) -> np.ndarray:
    """Unit-variance AR(1) series along the last axis (tokens of a sequence are correlated)."""
    e = rng.standard_normal(shape)
    out = np.empty(shape)
    out[..., 0] = e[..., 0]
    for t in range(1, shape[-1]):
        out[..., t] = phi * out[..., t - 1] + np.sqrt(1 - phi**2) * e[..., t]
    return out


def circular_shift_q(records: pd.DataFrame, rng) -> pd.DataFrame:
    """q_norm rotated within each (layer, head, sequence) by an offset in [T/4, 3T/4]."""
    records = records.sort_values(["layer", "head", "sequence", "position"], ignore_index=True)
    n_pos = records["position"].nunique()
    q = records["q_norm"].to_numpy().reshape(-1, n_pos)
    offset = rng.integers(n_pos // 4, 3 * n_pos // 4 + 1, size=len(q))
    index = (np.arange(n_pos)[None, :] + offset[:, None]) % n_pos
    return records.assign(q_norm=np.take_along_axis(q, index, axis=1).ravel())


# --- the statistics find planted effects and only those ----------------------------------


def test_planted_query_scale_is_found(bridge, corpus, finished, tmp_path):
    """Scaling one head's effective query by a random log-normal factor per token makes that
    head's r(ln |q|, entropy) strongly negative (its logits are bilinear: larger |q|, sharper)."""
    layer, head = PLANTED
    layout = attention_layout(bridge)
    other = (head + 1) % layout.n_heads

    def plant(q, hook):  # [batch, pos, head, d_head]; one factor per token of the batch
        # random log-normal factors seeded by the sequence (read from another head's query), so
        # every pass over the same sequence (the reference pass too) draws the same ones
        seeds = (q[:, :, other].double().abs().sum((1, 2)) * 1e6).long() % 2**31
        factor = torch.exp(1.5 * torch.stack([
            torch.randn(q.shape[1], generator=torch.Generator().manual_seed(int(s)))
            for s in seeds]))
        q = q.clone()
        q[:, :, head] *= factor[:, :, None]
        return q

    cfg = config(tmp_path / "planted", corpus)
    with attached(bridge, (layout.q_hook(layer), plant)):
        result = observational.run(cfg, model=bridge, progress=False)
    assert count_hooks(bridge) == 0

    summary, base = result.head_summary, finished[1].head_summary
    row = head_row(summary, layer, head)
    assert row["r_logq_entropy"] < -0.4 and row["r_logq_entropy_given_pos"] < -0.4
    assert row["r_ci_high_logq_entropy"] < 0 and row["significant"]
    assert row["r_logq_entropy"] == summary["r_logq_entropy"].min()
    assert row["r_logq_entropy"] < head_row(base, layer, head)["r_logq_entropy"] - 0.3
    # A pure temperature: the observed slope is the causal gain on the same tokens (slope = gain
    # is not rejected; 12 documents are too few to show equivalence within ±20%).
    agree = head_row(result.agreement, layer, head)
    assert agree["verdict"] in ("equivalent to a temperature", "undetermined")
    assert agree["q_difference_doc_cr2"] >= 0.05 and 0.7 < agree["ratio"] < 1.3
    # Every other head saw exactly the same tokens and attention as without the plant.
    others = ~((summary["layer"] == layer) & (summary["head"] == head))
    np.testing.assert_allclose(summary.loc[others, "r_logq_entropy"],
                               base.loc[others, "r_logq_entropy"], rtol=1e-5, atol=1e-6)

    # Circularly shifting q_norm within each sequence decouples it again: the effect is gone.
    records = observational.read_records(sorted((result.out / "records").glob("*.parquet")))
    shifted = circular_shift_q(records, np.random.default_rng(1))
    tables = observational.analyze(moments_of(shifted), cfg)
    row = head_row(tables["head_summary"], layer, head)
    assert abs(row["r_logq_entropy"]) < 0.15 and not row["significant"]


def test_null_false_discoveries_near_nominal():
    """q_norm coupled to entropy within sequences (all 100 heads found), then decoupled by
    circular shifts within each sequence: false discoveries at FDR 0.05 stay <= 10% of heads,
    although tokens of a sequence are autocorrelated (token-level tests would be optimistic)."""
    rng = np.random.default_rng(0)
    shape = (4, 25, 24, 24)  # layer, head, sequence, position
    u = ar1(rng, shape)
    log_q = u + 0.5 * rng.standard_normal(shape[:3])[..., None]  # own sequence-level offsets
    position = np.arange(shape[-1])
    entropy = (np.log1p(position) + 0.3 * (-u + ar1(rng, shape))
               + 0.15 * rng.standard_normal(shape[:3])[..., None])
    records = synthetic_records(log_q, entropy, shard_size=6, rng=rng)
    cfg = ObservationalConfig(n_boot=200)

    coupled = observational.analyze(moments_of(records), cfg)["head_summary"]
    assert coupled["significant"].all() and (coupled["r_logq_entropy"] < 0).all()
    null = observational.analyze(moments_of(circular_shift_q(records, rng)), cfg)
    assert null["head_summary"]["significant"].mean() <= 0.10
    assert len(null["significant_heads"]) == null["head_summary"]["significant"].sum()


def test_position_confound_is_removed_by_the_partial_correlation():
    """ln q_norm and entropy both depend only on ln(position + 1): raw |r| is large, the partial
    r controlling for ln(position + 1) is near zero."""
    rng = np.random.default_rng(2)
    shape = (2, 3, 48, 32)  # ~1500 tokens per head: sampling sd of r ~ 0.026
    z = np.log1p(np.arange(shape[-1]))
    log_q = 0.5 * z + 0.1 * rng.standard_normal(shape)
    entropy = z + 0.1 * rng.standard_normal(shape)
    records = synthetic_records(log_q, entropy, shard_size=4, rng=rng)
    summary = observational.analyze(moments_of(records),
                                    ObservationalConfig(n_boot=50))["head_summary"]
    assert (summary["r_logq_entropy"].abs() > 0.8).all()
    assert (summary["r_logq_entropy_given_pos"].abs() < 0.1).all()


# --- outputs ------------------------------------------------------------------------------


def test_tables_carry_the_original_and_our_columns(finished):
    cfg, result = finished
    out = Path(cfg.out)
    tables = {name: pd.read_csv(out / f"{name}.csv") for name in TABLES}
    summary = tables["head_summary"]
    assert len(summary) == 2 * 4 and not summary.duplicated(["layer", "head"]).any()
    ours = ["r_logq_entropy", "slope_logq_entropy", "p_doc_cr2_logq_entropy",
            "q_doc_cr2_logq_entropy", "r_logq_entropy_given_pos",
            "r_logq_entropy_mediator_adjusted", "p_doc_cr2_logq_entropy_mediator_adjusted",
            "r_ci_low_logq_entropy", "r_ci_high_logq_entropy", "r_logq_entropy_nosink",
            "r_logq_log_dir_spread", "p_token_logq_entropy", "significant",
            "significant_mediator_adjusted", "n_folds", "consistent", "selected", "replicated",
            "n_tokens", "n_documents", "mean_q_norm", "mean_entropy", "mean_k_eff_top90"]
    assert set(observational.ORIGINAL_SIGNIFICANT + tuple(ours)) <= set(summary.columns)
    assert (summary["r_ci_low_logq_entropy"] <= summary["r_ci_high_logq_entropy"]).all()
    assert (summary["n_documents"] == 12).all() and (summary["n_tokens"] == 12 * 23).all()
    assert (summary["num_tokens"] == summary["n_tokens"]).all()
    assert summary["significant"].dtype == bool and summary["consistent"].dtype == bool
    # The flag and the p/q beside it come from one test.
    assert (summary["significant"] == (summary["q_doc_cr2_logq_entropy"] < cfg.fdr_alpha)).all()

    keys = ["layer", "head"]
    sig = tables["significant_heads"]
    assert list(sig.columns[:12]) == list(observational.ORIGINAL_SIGNIFICANT)
    marked = set(map(tuple, summary.loc[summary["significant"], keys].to_numpy()))
    assert set(map(tuple, sig[keys].to_numpy())) == marked and sig["significant"].all()
    cons = tables["consistent_heads"]
    assert {"layer", "head", "n_folds", "frac_significant_same_sign",
            "consistent"} <= set(cons.columns)
    layers = tables["layer_statistics"]
    assert list(layers.columns[:4]) == list(observational.ORIGINAL_LAYER)
    assert layers["layer"].tolist() == [0, 1] and layers["n_heads"].tolist() == [4, 4]
    abs_r = summary["r_q_entropy"].abs().groupby(summary["layer"])
    np.testing.assert_allclose(layers["std_abs_r"], abs_r.std(ddof=1).to_numpy())

    agreement = tables["agreement"]
    assert len(agreement) == 8 and set(agreement["verdict"]) <= set(VERDICTS)
    assert (agreement["gain_analytic"] <= 0).all()
    # The finite difference of real forward passes equals the analytic gain on its sample.
    np.testing.assert_allclose(agreement["gain_fd"], agreement["gain_analytic_sample"],
                               rtol=0.02, atol=1e-4)
    assert tables["agreement_summary"]["layer"].astype(str).tolist() == ["all", "0", "1"]

    # The returned tables are the written ones.
    pd.testing.assert_frame_equal(result.head_summary.reset_index(drop=True), summary,
                                  check_dtype=False)
    assert "heads=8" in repr(result)


def test_statistics_from_records_equal_the_moments_path(finished):
    """The per-token records of a run and its per-document moments give the same tables."""
    cfg, result = finished
    out = Path(cfg.out)
    records = observational.read_records(sorted((out / "records").glob("*.parquet")))
    from_records = moments_from_records(records, MOMENT_VARIABLES,
                                        min_position=cfg.min_position)
    from_capture = observational.read_moments(sorted((out / "moments").glob("shard_*.npz")))
    assert from_records.variables == from_capture.variables
    np.testing.assert_array_equal(from_records.documents, from_capture.documents)
    a = head_statistics(from_records, n_boot=50)
    b = head_statistics(from_capture, n_boot=50)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=0, atol=1e-9)


def test_k_eff_top90_of_a_default_run_is_the_count_at_mass_0_9(finished, bridge):
    """A run with the default settings reports, as k_eff_top90, the number of top keys holding
    90% of the attention (recomputed from `hook_pattern`), not another mass (0.8 differs here)."""
    from spectra_lens.data.shards import read_manifest as read_shards
    from spectra_lens.metrics import k_eff_top_mass

    cfg, _ = finished
    assert cfg.top_mass == ObservationalConfig.top_mass
    out = Path(cfg.out)
    records = observational.read_records([out / "records" / "shard_00000.parquet"])
    tokens = load_shard(read_shards(out / "shards"), 0)
    layout = attention_layout(bridge)
    patterns = {}

    def grab(x, hook):
        patterns[hook.name] = x.detach().clone()

    hooks = [(f"blocks.{layer}.attn.hook_pattern", grab) for layer in range(layout.n_layers)]
    with torch.no_grad(), attached(bridge, *hooks, layout=layout):
        bridge(tokens, return_type=None)
    got = records.sort_values(["sequence", "layer", "head", "position"])
    for mass, same in ((0.9, True), (0.8, False)):
        want = torch.stack([k_eff_top_mass(patterns[f"blocks.{layer}.attn.hook_pattern"], mass=mass)
                            for layer in range(layout.n_layers)], dim=1)  # [seq, layer, head, pos]
        want = want.numpy().ravel()
        assert np.array_equal(got["k_eff_top90"].to_numpy(), want) is same


def test_manifest_records_versions_timings_and_provenance(finished):
    cfg, _ = finished
    m = read_manifest(cfg.out)
    assert m["status"] == "complete" and m["experiment"] == "observational"
    assert m["config"] == json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert {"python", "torch", "transformer-lens", "transformers", "pandas"} <= set(m["versions"])
    assert {"load_model_s", "shards_s", "capture_s", "finite_difference_s", "statistics_s",
            "figures_s", "total_s"} <= set(m["timings"])
    assert m["model"]["n_layers"] == 2 and m["model"]["n_heads"] == 4
    assert m["model"]["n_kv_heads"] == 2 and m["model"]["q_hook"] == "rot_q"
    assert "SmolLM2" not in m["model"]["spec"]  # a pre-loaded model is not the default's name
    assert m["n_sequences"] == 12 and m["seq_len"] == 24 and m["resumed"] is False
    assert m["n_tokens_per_head"] == 12 * 23 and m["n_documents"] == 12
    assert m["max_document_share"] == pytest.approx(1 / 12) and "equivalent to a temperature" in m["verdict_rule"]
    assert m["equivalence_margin"] == 0.2 and "±0.2·|g|" in m["verdict_rule"]
    assert "text files" in m["corpus"]


def test_figures_exist_and_hold_data(finished):
    out = Path(finished[0].out)
    figures = out / "figures"
    names = {"heatmap_r_logq_entropy", "heatmap_r_logq_entropy_mediator_adjusted",
             "heatmap_r_logq_entropy_nosink", "r_distribution", "layer_statistics", "agreement",
             "scatter_strongest_heads"}
    assert {p.stem for p in figures.glob("*.html")} == names
    assert not (figures / "plotly.min.js").exists()  # one copy per results tree, beside the report
    for name in names:
        traces = figure_traces(figures / f"{name}.html")
        # The heatmaps' marker trace of significant heads may rightly be empty.
        assert traces and has_data(traces[0]), name
    scatter = figure_traces(figures / "scatter_strongest_heads.html")
    assert len(scatter) == 3 and all(has_data(t) for t in scatter)  # top_heads panels
    assert all(has_data(t) for t in figure_traces(figures / "layer_statistics.html"))
    # Every file was renamed into place (no temporary left) and is readable as usual.
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.startswith(".")]
    mask = os.umask(0)
    os.umask(mask)
    # (shards/ is written by spectra_lens.data.shards, which still uses mkstemp's 0600)
    ours = [p for p in files if p.parent.name != "shards"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in ours} == {0o666 & ~mask}


# --- resume and overwrite -----------------------------------------------------------------


def test_interrupted_run_resumes_with_identical_results(bridge, corpus, finished, tmp_path,
                                                        monkeypatch):
    cfg = config(tmp_path / "run", corpus)
    out = Path(cfg.out)
    real_load_shard = load_shard
    loaded: list[int] = []

    def interrupt_after_first_shard(manifest, i):
        if i >= 1:  # shard 0's records are written by now
            raise KeyboardInterrupt
        return real_load_shard(manifest, i)

    monkeypatch.setattr(observational, "load_shard", interrupt_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        observational.run(cfg, model=bridge, progress=False)
    assert count_hooks(bridge) == 0
    first = out / "moments" / "shard_00000.npz"
    assert first.exists() and not (out / "moments" / "shard_00001.npz").exists()
    assert looks_incomplete(out) and read_manifest(out)["status"] == "interrupted"
    mtime = first.stat().st_mtime_ns

    def counting(manifest, i):
        loaded.append(i)
        return real_load_shard(manifest, i)

    monkeypatch.setattr(observational, "load_shard", counting)
    result = observational.run(cfg, model=bridge, progress=False)
    assert loaded == [1, 2]  # shard 0 was not captured again
    assert first.stat().st_mtime_ns == mtime
    m = read_manifest(out)
    assert m["status"] == "complete" and m["resumed"] is True
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_csv(out / f"{name}.csv"),
                                      pd.read_csv(Path(finished[0].out) / f"{name}.csv"),
                                      check_exact=True)
    pd.testing.assert_frame_equal(result.head_summary, finished[1].head_summary, check_exact=True)


def test_finished_run_is_refused_and_overwrite_reruns(bridge, corpus, finished, tmp_path,
                                                      monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(finished[0].out, out)
    before = (out / "head_summary.csv").read_bytes()
    with pytest.raises(SpectraError, match="already holds a finished observational run"):
        observational.run(config(out, corpus), model=bridge, progress=False)
    assert (out / "head_summary.csv").read_bytes() == before

    # --overwrite reruns everything, also with another tokenization (seq_len, fewer shards).
    real_load_shard = load_shard
    loaded: list[int] = []
    monkeypatch.setattr(observational, "load_shard",
                        lambda manifest, i: loaded.append(i) or real_load_shard(manifest, i))
    cfg = config(out, corpus, seq_len=16, n_sequences=8, overwrite=True)
    result = observational.run(cfg, model=bridge, progress=False)
    assert loaded == [0, 1]
    assert sorted(p.name for p in (out / "records").iterdir()) == [
        "shard_00000.parquet", "shard_00001.parquet"]  # the third, stale shard is gone
    assert sorted(p.name for p in (out / "moments").iterdir()) == [
        "counterfactual_00000.npz", "counterfactual_00001.npz",
        "shard_00000.npz", "shard_00001.npz"]  # and each shard's counterfactual moments
    m = read_manifest(out)
    assert m["status"] == "complete" and m["seq_len"] == 16 and m["resumed"] is False
    assert (result.head_summary["n_tokens"] == 8 * 15).all()
    assert (pd.read_csv(out / "head_summary.csv")["n_tokens"] == 8 * 15).all()


# --- bad input ----------------------------------------------------------------------------


def _empty_file(tmp_path, corpus):
    (tmp_path / "empty.txt").write_text("")
    return {"corpus": str(tmp_path / "empty.txt")}, "empty"


def _too_short(tmp_path, corpus):
    (tmp_path / "short.txt").write_text("w1 w2 w3 w4")
    return {"corpus": str(tmp_path / "short.txt"), "seq_len": 100}, "corpus too short.*seq_len=100"


def _jsonl_without_text(tmp_path, corpus):
    (tmp_path / "c.jsonl").write_text('{"text": "w1 w2"}\n{"body": "w3 w4"}\n')
    return {"corpus": str(tmp_path / "c.jsonl")}, r"c.jsonl:2: no field 'text'"


def _corrupt_shard(tmp_path, corpus):
    shards = tmp_path / "shards"
    prepare(corpus, word_tokenizer(), shards, seq_len=24, n_sequences=12, shard_size=4,
                 tokenizer_name="words")
    blob = bytearray((shards / "shard_00001.safetensors").read_bytes())
    blob[-8:] = bytes(b ^ 0xFF for b in blob[-8:])
    (shards / "shard_00001.safetensors").write_bytes(bytes(blob))
    return {"corpus": str(shards)}, "shard_00001.safetensors is corrupt"


@pytest.mark.parametrize("bad", [_empty_file, _too_short, _jsonl_without_text, _corrupt_shard],
                         ids=lambda f: f.__name__.strip("_"))
def test_bad_input_raises_and_leaves_nothing_that_looks_complete(bridge, corpus, tmp_path, bad):
    changes, message = bad(tmp_path, corpus)
    out = tmp_path / "run"
    with pytest.raises(SpectraError, match=message):
        observational.run(config(out, changes.pop("corpus", corpus), **changes), model=bridge,
                          progress=False)
    assert looks_incomplete(out)
    assert count_hooks(bridge) == 0


# --- command line -------------------------------------------------------------------------


def test_cli_bad_input_returns_2_with_a_message(tmp_path, finished, capsys, monkeypatch):
    """Errors found before any model is loaded (the default model is never needed here)."""

    def no_model(*args, **kw):
        raise AssertionError("bad input must be reported before a model is loaded")

    monkeypatch.setattr(pipeline, "load_model", no_model)
    (tmp_path / "empty.txt").write_text("")
    cases = [
        (["--corpus", str(tmp_path / "empty.txt")], "empty"),
        (["--corpus", str(tmp_path / "missing.txt")], "not found"),
        (["--seq-len", "1"], "--seq-len"),
        (["--fdr-alpha", "1.5"], "--fdr-alpha"),
    ]
    for i, (argv, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        assert cli.main(["observe", *argv, "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)
        assert looks_incomplete(out)
    copy = tmp_path / "finished"
    shutil.copytree(finished[0].out, copy)
    assert cli.main(["observe", "--out", str(copy), "--no-progress"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_cli_runs_a_local_model_directory(tmp_path, corpus, tok, capsys):
    model_dir = tmp_path / "tiny-llama"
    tiny_hf_model("llama_gqa").save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "run"
    argv = ["--model", str(model_dir), "--corpus", corpus, "--out", str(out), "--seq-len", "16",
            "--n-sequences", "8", "--shard-size", "4", "--n-boot", "50", "--top-heads", "2",
            "--device", "cpu", "--no-progress"]
    assert cli.main(["observe", *argv]) == 0
    printed = capsys.readouterr().out
    assert "8 heads" in printed and f"wrote {out}" in printed
    m = read_manifest(out)
    assert m["status"] == "complete" and m["model"]["spec"] == str(model_dir)


def test_cli_help_lists_the_commands(capsys):
    assert cli.main(["--help"]) == 0
    usage = capsys.readouterr().out
    for command in ("observe", "intervene", "gain", "qk-control", "prepare", "report"):
        assert command in usage
    assert cli.main(["observe", "--help"]) == 0
    assert "--corpus" in capsys.readouterr().out


def test_a_reference_norm_of_other_shards_is_refused_on_resume(bridge, tok, tmp_path):
    """The reference norm is the run's first file; a run stopped after it whose shards are then
    re-prepared must not reuse it (no moment file exists yet to catch the change)."""
    from spectra_lens.data.shards import write_shards

    class Run:  # what reference_norm needs of a run directory
        def __init__(self, path):
            self.path = path

        def output(self, name):
            return self.path / name

        def timed(self, name, seconds):
            pass

    def shards(seed):
        tokens = torch.randint(1, 50, (8, 16), generator=torch.Generator().manual_seed(seed))
        return write_shards(tokens, tmp_path / f"shards{seed}", shard_size=4, tokenizer_name="words",
                            corpus="random", documents=torch.arange(8) // 2)

    run = Run(tmp_path)
    first = observational.reference_norm(bridge, shards(0), run, seed=0, batch_size=4)
    assert first is not None and first.meta["shards_sha256"]
    again = observational.reference_norm(bridge, shards(0), run, seed=0, batch_size=4)
    np.testing.assert_array_equal(again.log_norm, first.log_norm)  # the same shards: read back
    with pytest.raises(SpectraError, match="shards changed since.*--overwrite"):
        observational.reference_norm(bridge, shards(1), run, seed=0, batch_size=4)


def test_the_finite_difference_check_runs_where_the_pattern_is_eager_unless_asked():
    from spectra_lens.config import BLOCKED_ABOVE, fd_sequences_for

    assert fd_sequences_for(ObservationalConfig(), 128) == 4
    assert fd_sequences_for(ObservationalConfig(), BLOCKED_ABOVE + 1) == 0  # blocked capture
    assert fd_sequences_for(ObservationalConfig(attention="eager"), BLOCKED_ABOVE + 1) == 4
    assert fd_sequences_for(ObservationalConfig(fd_sequences=2), 8192) == 2
    assert fd_sequences_for(ObservationalConfig(fd_sequences=0), 128) == 0
    with pytest.raises(SpectraError, match="fd_sequences"):
        ObservationalConfig(fd_sequences=-1).validate()

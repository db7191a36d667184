"""The length study end to end on a tiny Llama (GQA, rotary) bridge with an offline tokenizer,
and observe's --attention choice: blocked tables equal eager ones."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from spectra_lens.experiments import length, observational

from spectra_lens.config import BLOCKED_ABOVE, LengthConfig, ObservationalConfig, attention_path
from spectra_lens.errors import SpectraError
from spectra_lens.layout import attention_layout
from spectra_lens.models import bridge_from_hf
from spectra_lens.testing import tiny_hf_model, word_corpus, word_tokenizer

SEQ = 48
N_DOCS = 5


@pytest.fixture(scope="module")
def bridge():
    return bridge_from_hf(tiny_hf_model("llama_gqa"), word_tokenizer())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Seven random-word documents, one too short for SEQ tokens."""
    d = tmp_path_factory.mktemp("corpus")
    word_corpus(d, 6, 80, name="doc{i}.txt")
    (d / "doc9.txt").write_text("a few words only")
    return str(d / "*.txt")


def cfg(out, corpus, **kw) -> LengthConfig:
    return LengthConfig(**(dict(corpus=corpus, out=str(out), seq_len=SEQ, n_documents=N_DOCS,
                                images="none") | kw))


@pytest.fixture(scope="module")
def finished(bridge, corpus, tmp_path_factory):
    c = cfg(tmp_path_factory.mktemp("length") / "run", corpus)
    return c, length.run(c, model=bridge, progress=False)


def test_one_row_per_head_with_intervals(bridge, finished):
    c, r = finished
    layout = attention_layout(bridge)
    s = pd.read_csv(Path(c.out) / "length_summary.csv")
    assert len(s) == layout.n_layers * layout.n_heads
    assert list(zip(s["layer"], s["head"])) == [(l, h) for l in range(layout.n_layers)
                                                for h in range(layout.n_heads)]
    for tag in ("logq", "entropy", "gap"):
        col = f"slope_{tag}_logt"
        assert s[[col, f"{col}_ci_low", f"{col}_ci_high"]].notna().all().all()
        assert (s[f"{col}_ci_low"] < s[col]).all() and (s[col] < s[f"{col}_ci_high"]).all()
    assert (s["n_documents"] == N_DOCS).all()
    assert (s["n_tokens"] == N_DOCS * (SEQ - 1)).all()  # positions 1 .. SEQ-1 of each document
    assert set(s["logq_direction"]) <= {"rises", "falls", "flat"}
    # every document has the same positions (the same design), so CR2 with Bell-McCaffrey df
    # reduces to the t interval over the per-document slopes: two computations, one answer
    for a, b in (("", "_doc_mean"), ("_ci_low", "_doc_ci_low"), ("_ci_high", "_doc_ci_high")):
        np.testing.assert_allclose(s[f"slope_logq_logt{a}"], s[f"slope_logq_logt{b}"], rtol=1e-6, atol=1e-9)
    # H − log(t+1) = H − bound: its slope differs from H's by the slope of log(t+1) on ln t
    t = np.arange(1, SEQ, dtype=float)
    bound_slope = np.polyfit(np.log(t), np.log(t + 1), 1)[0]
    np.testing.assert_allclose(s["slope_entropy_logt"] - s["slope_gap_logt"], bound_slope, atol=1e-9)


def test_profile_bins_cover_every_position_once(bridge, finished):
    c, r = finished
    p = pd.read_csv(Path(c.out) / "length_profile.csv")
    layout = attention_layout(bridge)
    one = p[(p["layer"] == 0) & (p["head"] == 0)]
    assert one["pos_low"].iloc[0] == 1 and one["pos_high"].iloc[-1] == SEQ
    assert (one["pos_low"].iloc[1:].to_numpy() == one["pos_high"].iloc[:-1].to_numpy()).all()
    assert one["n_tokens"].sum() == N_DOCS * (SEQ - 1)
    assert len(p) == layout.n_layers * layout.n_heads * len(one)
    # entropy never exceeds its bound; the token-weighted bin means give the head's mean
    assert (p["mean_entropy"] <= p["mean_entropy_bound"] + 1e-6).all()
    s = r.summary
    for (l, h), g in p.groupby(["layer", "head"]):
        want = float(s[(s["layer"] == l) & (s["head"] == h)]["mean_ln_q_norm"].iloc[0])
        assert np.isclose((g["mean_ln_q_norm"] * g["n_tokens"]).sum() / g["n_tokens"].sum(), want)


def test_manifest_names_the_documents_and_figures_exist(finished):
    c, r = finished
    m = json.loads((Path(c.out) / "manifest.json").read_text())
    assert m["status"] == "complete" and m["attention"] == "blocked"
    assert len(m["documents"]) == N_DOCS
    assert all(d["characters"] > 16 for d in m["documents"])  # the short document is never used
    figs = Path(c.out) / "figures"
    assert (figs / "length_L0.html").exists() and (figs / "length_L1.html").exists()
    assert (figs / "slope_logq_logt.html").exists()


class _PlantedScale:
    """Multiplies the effective query of every head of `layer` at position t >= 1 by t^beta, or
    (`logn`) by log(t + 1)."""

    def __init__(self, layer: int, beta: float, logn: bool = False):
        self.layer, self.beta, self.logn = layer, beta, logn

    def hooks(self, layout):
        def fn(x, hook):  # [batch, pos, head, d_head]
            t = torch.arange(x.shape[1], dtype=x.dtype, device=x.device).clamp_min(1)
            scale = torch.log1p(t) if self.logn else t.pow(self.beta)
            return x * scale[None, :, None, None]

        return [(layout.q_hook(self.layer), fn)]


def test_the_slope_recovers_a_planted_dependence(bridge, corpus, finished, tmp_path):
    c, r = finished
    beta = 0.5
    planted = length.run(cfg(tmp_path / "planted", corpus), model=bridge, progress=False,
                         interventions=[_PlantedScale(1, beta)])
    base, got = r.summary, planted.summary
    last = got["layer"] == 1
    # ln‖q‖ gains exactly beta · ln t, so the slope gains beta (OLS is linear in y)
    np.testing.assert_allclose(got[last]["slope_logq_logt"] - base[last]["slope_logq_logt"], beta,
                               atol=1e-4)
    assert (got[last]["logq_direction"] == "rises").all()
    # the earlier layer is untouched
    np.testing.assert_allclose(got[~last]["slope_logq_logt"], base[~last]["slope_logq_logt"], atol=1e-9)


def test_log_n_scaling_is_found_where_planted(bridge, corpus, finished, tmp_path):
    """A head whose query norm is multiplied by log(t + 1) gains exactly the log-n reference slope;
    the reference is the OLS slope of ln ln(t + 1) on ln t by hand."""
    c, r = finished
    t = np.arange(1, SEQ, dtype=float)
    x, y = np.log(t), np.log(np.log(t + 1))
    want = np.polyfit(x, y, 1)[0]
    assert length.logn_reference_slope(SEQ, 1) == pytest.approx(want, rel=1e-12)
    assert length.logn_reference_slope(SEQ, 0) == pytest.approx(want, rel=1e-12)  # t = 0 has no ln t
    planted = length.run(cfg(tmp_path / "logn", corpus), model=bridge, progress=False,
                         interventions=[_PlantedScale(1, 0.0, logn=True)])
    last = planted.summary["layer"] == 1
    np.testing.assert_allclose(planted.summary[last]["slope_logq_logt"] - r.summary[last]["slope_logq_logt"],
                               want, atol=1e-4)
    np.testing.assert_allclose(r.summary["slope_logn_reference"], want, rtol=1e-12)
    # q values: Benjamini-Hochberg over every head of the run
    from spectra_lens.stats.inference import fdr
    np.testing.assert_allclose(r.summary["q_logq_logt"], fdr(r.summary["p_logq_logt"]))
    for s in (r.summary, planted.summary):
        lo, hi, ref = s["slope_logq_logt_ci_low"], s["slope_logq_logt_ci_high"], s["slope_logn_reference"]
        assert ((s["logq_vs_logn"] == "below") == (hi < ref)).all()
        assert ((s["logq_vs_logn"] == "above") == (lo > ref)).all()


def test_blocked_and_eager_length_tables_agree(bridge, corpus, finished, tmp_path):
    c, r = finished
    eager = length.run(cfg(tmp_path / "eager", corpus, attention="eager"), model=bridge, progress=False)
    num = r.summary.select_dtypes("number").columns
    np.testing.assert_allclose(eager.summary[num].to_numpy(), r.summary[num].to_numpy(),
                               rtol=1e-4, atol=1e-5)


def test_bad_length_input(bridge, corpus, tmp_path):
    with pytest.raises(SpectraError, match="n_documents"):
        cfg(tmp_path / "x", corpus, n_documents=1).validate()
    with pytest.raises(SpectraError, match="attention"):
        cfg(tmp_path / "x", corpus, attention="flash").validate()
    with pytest.raises(SpectraError, match="documents of at least"):
        length.run(cfg(tmp_path / "y", corpus, n_documents=7), model=bridge, progress=False)


def test_auto_attention_threshold():
    assert attention_path("auto", BLOCKED_ABOVE) == "eager"
    assert attention_path("auto", BLOCKED_ABOVE + 1) == "blocked"
    assert attention_path("eager", 10**6) == "eager" and attention_path("blocked", 2) == "blocked"


def test_observe_blocked_tables_equal_eager(bridge, tmp_path):
    """observe --attention blocked against eager on the same corpus: every CSV has the same
    rows and columns; numeric columns agree to rtol 1e-4 / atol 1e-5 (p-values and bootstrap
    percentiles included: the same seed resamples the same documents), text columns exactly."""
    corpus = word_corpus(tmp_path, 8, 60, name="doc{i:02d}.txt")
    base = dict(corpus=corpus, seq_len=24, n_sequences=8, shard_size=4, batch_size=4, n_boot=100,
                top_heads=3, fd_sequences=2, images="none")
    runs = {a: observational.run(ObservationalConfig(out=str(tmp_path / a), attention=a, **base),
                                 model=bridge, progress=False) for a in ("eager", "blocked")}
    for a, res in runs.items():
        assert json.loads((res.out / "manifest.json").read_text())["attention"] == a
    names = sorted(p.name for p in (tmp_path / "eager").glob("*.csv"))
    assert names == sorted(p.name for p in (tmp_path / "blocked").glob("*.csv")) and names
    for name in names:
        e, b = pd.read_csv(tmp_path / "eager" / name), pd.read_csv(tmp_path / "blocked" / name)
        assert list(e.columns) == list(b.columns) and len(e) == len(b), name
        num = e.select_dtypes("number").columns
        np.testing.assert_allclose(b[num].to_numpy(float), e[num].to_numpy(float), rtol=1e-4, atol=1e-5,
                                   equal_nan=True, err_msg=name)
        text = [c for c in e.columns if c not in num]
        pd.testing.assert_frame_equal(b[text], e[text], obj=name)


def test_a_corpus_too_short_reads_its_coarser_one(caplog):
    """kjv (a chapter per document) at a length no chapter reaches reads kjv-books, as observe
    and prepare do; a corpus without a coarser one is refused."""
    from spectra_lens.data.corpus import Corpus

    words = "the cat sat on a mat and then it ran far away".split()
    books = Corpus("books: two", lambda: iter([" ".join(words * 6), " ".join(words * 5)]))
    chapters = Corpus("chapters: four", lambda: iter([" ".join(words)] * 4), coarser=lambda: books)
    c = LengthConfig(seq_len=40, n_documents=2)
    with caplog.at_level("WARNING", logger="spectra_lens"):
        read, tokens, table = length._documents_of(chapters, word_tokenizer(), c)
    assert read is books and tokens.shape == (2, 40) and table["document"].tolist() == [0, 1]
    assert [r.getMessage() for r in caplog.records] == [
        "chapters: fewer than 2 documents hold 40 tokens; reading books instead"]
    with pytest.raises(SpectraError, match="documents of at least 40"):
        length._documents_of(Corpus("chapters", chapters.reader), word_tokenizer(), c)

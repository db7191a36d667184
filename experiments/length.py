"""Length: how each head's query norm and attention entropy change with position in long documents.

    spectra-lens length [--model M] [--corpus kjv-books] [--seq-len 2048] [--n-documents 4]
        [--bins-per-octave 2] [--attention blocked] [--out results/length]

The entropy bound log(t+1) grows with the query position t (t + 1 visible keys, t = 0 the
first token), and methods that scale the logits by a factor growing with log n (Scalable-Softmax,
YaRN's attention factor, "log-n" query scaling) assume attention must sharpen with length to
stay focused. A head can do this itself through its query norm: this experiment measures whether
ln‖q‖ rises with ln t.

Documents: `n_documents` documents of the corpus with at least `seq_len` tokens (BOS included
where the model uses one), spread evenly over the corpus in its order; each contributes its first
`seq_len` tokens as one sequence, captured with attention in query blocks by default
(`blocked_capture`; no [head, T, T] pattern). The default corpus `kjv-books` is the King James
Bible with one document per book; the manifest names the books used.

Outputs (in --out):

- `length_profile.csv`: one row per head × log-position bin (positions t in [pos_low, pos_high),
  edges 2^(k / bins_per_octave), t >= min_position): n_tokens, n_documents, mean_ln_t, and the
  token means of ln‖q‖ (`mean_ln_q_norm`), the entropy H (nats), the bound log(t+1)
  (`mean_entropy_bound`), H − log(t+1) (`mean_entropy_gap`), H / log(t+1) (`mean_entropy_ratio`),
  max attention, sink mass (attention on the first token) and the local gain −Var_p(s)
  (`mean_gain`, dH/d ln α at α = 1).
- `length_summary.csv`: one row per head: the OLS slope of ln‖q‖ on ln t over every token of the
  documents (`slope_logq_logt`), its document-clustered CR2 interval with Bell–McCaffrey degrees
  of freedom (`_ci_low`, `_ci_high`, `p_`, `df_`; `stats.inference.cluster_wald`), the same for
  H (`slope_entropy_logt`) and H − log(t+1) (`slope_gap_logt`), and, as a check on the clustered
  interval, the mean of the per-document slopes with a t interval over documents
  (`slope_logq_logt_doc_mean`, `_doc_ci_low`, `_doc_ci_high`). `logq_direction` is "rises" /
  "falls" where the clustered interval excludes 0, else "flat"; `q_logq_logt` is its
  Benjamini–Hochberg q over every head. A slope of 1 on ln t would be a query norm proportional
  to t; "log-n" scaling (‖q‖ ∝ log(t + 1), the entropy bound) gives the OLS slope of
  ln ln(t + 1) on ln t over the same positions, `slope_logn_reference` (0.187 at 2,048
  tokens, 0.166 at 4,096, 0.150 at 8,192), and `logq_vs_logn` says whether the head's interval
  lies "below", "above" or "includes" it.
- figures: per layer, ln‖q‖ and H against ln t (`length_L{l}`), one line per head, the bound
  log(t+1) dashed; a layer × head map of the ln‖q‖ slope (`slope_logq_logt`).
- `manifest.json`: config, model, corpus, the documents (index, name, characters), attention path.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from spectra_lens.blocked_capture import BlockedCapture
from spectra_lens.capture import MetricCapture
from spectra_lens.config import LengthConfig, attention_path
from spectra_lens.data.corpus import CorpusTooShort, with_coarser
from spectra_lens.data.prepare import corpus_from_spec
from spectra_lens.data.shards import ShardManifest
from spectra_lens.errors import SpectraError
from spectra_lens.layout import attention_layout
from spectra_lens.present import display
from spectra_lens.present import figures as figs
from spectra_lens.runs import outputs as O
from spectra_lens.runs import pipeline as P
from spectra_lens.stats import inference
from spectra_lens.validate import check_context

__all__ = ["OUTPUTS", "PROFILE_METRICS", "LengthResult", "command", "compute", "figures",
           "long_documents", "position_bins", "run"]

EXPERIMENT = "length"
# length_profile.csv's per-bin token means: column -> what it averages
PROFILE_METRICS = {
    "mean_ln_q_norm": "ln ‖q‖ of the effective query",
    "mean_entropy": "attention entropy H (nats)",
    "mean_entropy_bound": "log(t + 1), the largest H at position t",
    "mean_entropy_gap": "H − log(t + 1)",
    "mean_entropy_ratio": "H / log(t + 1)",
    "mean_max_attn": "largest attention weight",
    "mean_sink_mass": "attention on the first token",
    "mean_gain": "local gain −Var_p(s) = dH/d ln α at α = 1",
}
# Variables of the per-document regression moments: x = ln t, then the responses.
_REGRESSION = ("ln_t", "ln_q_norm", "entropy", "entropy_gap")
_SLOPES = {"ln_q_norm": "logq", "entropy": "entropy", "entropy_gap": "gap"}


@dataclass(frozen=True, repr=False)
class LengthResult:
    """The tables of one length run."""

    profile: pd.DataFrame  # length_profile.csv
    summary: pd.DataFrame  # length_summary.csv
    documents: pd.DataFrame  # index, name, characters of the documents used
    out: Path | None = None

    def __repr__(self) -> str:
        d = self.summary["logq_direction"].value_counts().to_dict()
        return (f"LengthResult(heads={len(self.summary)}, documents={len(self.documents)}, "
                f"ln|q| on ln t: {d}, median slope={self.summary['slope_logq_logt'].median():+.3f}, "
                f"out={self.out})")

    def _repr_html_(self) -> str:
        cols = ["layer", "head", "slope_logq_logt", "slope_logq_logt_ci_low", "slope_logq_logt_ci_high",
                "slope_gap_logt", "logq_direction"]
        return f"<b>{escape(repr(self))}</b>" + self.summary[cols].to_html(index=False, float_format="%.3g")


OUTPUTS = O.Outputs(
    "LENGTH", "query norm and entropy against position in long documents", "spectra-lens length",
    (
        O.Table("length_summary.csv", "heads by |slope of ln‖q‖ on ln t|", ("slope_logq_logt",),
                ("layer", "head", "slope_logq_logt", "slope_logq_logt_ci_low", "slope_logq_logt_ci_high",
                 "logq_direction", "slope_gap_logt", "slope_entropy_logt", "n_documents"), rows=20),
        O.Table("length_profile.csv", "per head and log-position bin", (),
                ("layer", "head", "pos_low", "pos_high", "mean_ln_q_norm", "mean_entropy",
                 "mean_entropy_bound", "mean_max_attn", "mean_sink_mass", "mean_gain"), rows=20),
    ),
)


# --------------------------------------------------------------------------- documents


def _documents_of(source, tokenizer, cfg: LengthConfig):
    """(the corpus read, tokens, documents table) of `long_documents`; where `source` holds too
    few long documents and names a coarser corpus (kjv -> kjv-books), that one
    (`corpus.with_coarser`, with a warning)."""
    def attempt(corpus):
        texts = list(corpus)
        return long_documents(texts, tokenizer, seq_len=cfg.seq_len, n_documents=cfg.n_documents,
                              names=_document_names(corpus.description, len(texts)))

    read, (tokens, documents) = with_coarser(
        source, attempt, why=f"fewer than {cfg.n_documents} documents hold {cfg.seq_len} tokens")
    return read, tokens, documents


def _document_names(description: str, n: int) -> list[str]:
    if description.startswith("kjv-books:"):
        from spectra_lens.data.genres import kjv_book_names

        names = kjv_book_names()
        if len(names) == n:
            return names
    return [f"document {i}" for i in range(n)]


def long_documents(corpus, tokenizer, *, seq_len: int, n_documents: int,
                   names: Sequence[str] | None = None) -> tuple[torch.Tensor, pd.DataFrame]:
    """([n_documents, seq_len] tokens, table of the documents used): the first `seq_len` tokens
    (a BOS first where the tokenizer has one) of `n_documents` documents holding at least that
    many, chosen evenly spread over the eligible documents in corpus order."""
    bos = getattr(tokenizer, "bos_token_id", None)
    content = seq_len - (bos is not None)
    texts = list(corpus)
    eligible: list[tuple[int, list[int]]] = []
    for i, text in enumerate(texts):
        ids = tokenizer(text[: 8 * content], add_special_tokens=False)["input_ids"]
        if len(ids) < content and len(text) > 8 * content:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= content:
            eligible.append((i, ids[:content]))
    if len(eligible) < n_documents:
        raise CorpusTooShort(f"the corpus holds {len(eligible)} documents of at least {seq_len} tokens, "
                           f"expected n_documents={n_documents}: use a shorter seq_len or fewer documents")
    pick = np.linspace(0, len(eligible) - 1, n_documents).round().astype(int)
    rows = [eligible[j] for j in pick]
    body = torch.tensor([ids for _, ids in rows], dtype=torch.long)
    if bos is not None:
        body = torch.cat([torch.full((len(rows), 1), bos, dtype=torch.long), body], dim=1)
    names = list(names) if names is not None else [f"document {i}" for i in range(len(texts))]
    table = pd.DataFrame({"document": [i for i, _ in rows], "name": [names[i] for i, _ in rows],
                          "characters": [len(texts[i]) for i, _ in rows]})
    return body, table


# --------------------------------------------------------------------------- statistics


def position_bins(seq_len: int, min_position: int, bins_per_octave: int) -> tuple[np.ndarray, np.ndarray]:
    """(bin of each position 0..seq_len−1, −1 before `min_position`; bin edges): bin k holds
    positions t with 2^(k/B) <= t < 2^((k+1)/B), renumbered to the non-empty bins in order."""
    t = np.arange(seq_len)
    raw = np.full(seq_len, -1)
    ok = t >= min_position
    raw[ok] = np.floor(np.log2(t[ok]) * bins_per_octave + 1e-9).astype(int)
    used = np.unique(raw[ok])
    index = np.full(seq_len, -1)
    index[ok] = np.searchsorted(used, raw[ok])
    lows = [int(t[raw == k].min()) for k in used]
    edges = np.array(lows + [seq_len])
    return index, edges


def _per_token(tm, layer_pos: int, t: np.ndarray) -> dict[str, np.ndarray]:
    """[head, pos] float64 arrays of one sequence of one captured layer."""
    def g(name):
        return getattr(tm, name)[0, layer_pos].double().cpu().numpy()

    bound = np.log(t + 1.0)
    h = g("entropy")
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"ln_t": np.broadcast_to(np.log(np.maximum(t, 1)), h.shape), "ln_q_norm": np.log(g("q_norm")),
                "entropy": h, "entropy_bound": np.broadcast_to(bound, h.shape), "entropy_gap": h - bound,
                "entropy_ratio": np.where(bound > 0, h / np.where(bound > 0, bound, 1.0), np.nan),
                "max_attn": g("max_attn"), "sink_mass": g("sink_mass"), "gain": g("local_gain")}


class _Accumulator:
    """Per-(document, head) bin sums and regression moments, filled one document at a time."""

    def __init__(self, n_heads: int, n_bins: int):
        self.n_heads, self.n_bins = n_heads, n_bins
        self.bin_sums: list[dict[str, np.ndarray]] = []  # per document: {var: [head, bin]}
        self.bin_n: list[np.ndarray] = []  # per document: [bin]
        self.n: list[int] = []
        self.mean: list[np.ndarray] = []  # [head, p]
        self.m2: list[np.ndarray] = []  # [head, p, p]

    def add(self, values: dict[str, np.ndarray], bins: np.ndarray) -> None:
        keep = bins >= 0
        b = bins[keep]
        counts = np.bincount(b, minlength=self.n_bins)
        sums = {}
        for name, v in values.items():
            x = v[:, keep]
            sums[name] = np.stack([np.bincount(b, weights=row, minlength=self.n_bins) for row in x])
        self.bin_sums.append(sums)
        self.bin_n.append(counts)
        z = np.stack([values[name][:, keep] for name in _REGRESSION], axis=-1)  # [head, tok, p]
        mean = z.mean(axis=1)
        d = z - mean[:, None]
        self.n.append(int(keep.sum()))
        self.mean.append(mean)
        self.m2.append(np.einsum("htp,htq->hpq", d, d))

    def augmented(self) -> np.ndarray:
        """(doc, head, p+1, p+1) moments centred at the pooled mean, as
        `stats.moments.DocumentMoments.augmented` (index 0 the constant)."""
        n = np.asarray(self.n, float)[:, None] * np.ones(self.n_heads)[None]  # [doc, head]
        mean, m2 = np.stack(self.mean), np.stack(self.m2)
        mu = (n[..., None] * mean).sum(0) / n.sum(0)[:, None]
        d = mean - mu[None]
        g, h, p = mean.shape
        s = np.empty((g, h, p + 1, p + 1))
        s[..., 0, 0] = n
        b = n[..., None] * d
        s[..., 0, 1:] = b
        s[..., 1:, 0] = b
        s[..., 1:, 1:] = m2 + b[..., :, None] * d[..., None, :]
        return s


def _document_slopes(acc: _Accumulator, y: int) -> np.ndarray:
    """[doc, head] OLS slope of variable `y` on ln t within each document."""
    m2 = np.stack(acc.m2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return m2[..., 0, y] / m2[..., 0, 0]


def _profile(acc: _Accumulator, layers: Sequence[int], n_heads: int, edges: np.ndarray) -> pd.DataFrame:
    counts = np.stack(acc.bin_n).sum(0)  # [bin]
    docs = (np.stack(acc.bin_n) > 0).sum(0)
    n_bins = len(counts)
    n_units = len(layers) * n_heads
    frame = {
        "layer": np.repeat(np.asarray(layers), n_heads * n_bins),
        "head": np.tile(np.repeat(np.arange(n_heads), n_bins), len(layers)),
        "bin": np.tile(np.arange(n_bins), n_units),
        "pos_low": np.tile(edges[:-1], n_units),
        "pos_high": np.tile(edges[1:], n_units),
        "n_tokens": np.tile(counts, n_units),
        "n_documents": np.tile(docs, n_units),
    }
    var_of = {"mean_ln_t": "ln_t", **{c: c.removeprefix("mean_") for c in PROFILE_METRICS}}
    var_of["mean_gain"] = "gain"
    for col, var in var_of.items():
        total = sum(s[var] for s in acc.bin_sums)  # [unit, bin]
        with np.errstate(invalid="ignore", divide="ignore"):
            frame[col] = (total / counts[None]).ravel()
    return pd.DataFrame(frame)


def _summary(acc: _Accumulator, layers: Sequence[int], n_heads: int, ci: float) -> pd.DataFrame:
    s = acc.augmented()
    ys = [_REGRESSION.index(v) for v in _SLOPES]
    fit = inference.cluster_wald(s, 0, ys, kind="cr2", ci=ci)
    out = pd.DataFrame({"layer": np.repeat(np.asarray(layers), n_heads),
                        "head": np.tile(np.arange(n_heads), len(layers))})
    for j, (var, tag) in enumerate(_SLOPES.items()):
        col = f"slope_{tag}_logt"
        out[col] = fit["beta"][j]
        out[f"{col}_ci_low"] = fit["low"][j]
        out[f"{col}_ci_high"] = fit["high"][j]
        out[f"p_{tag}_logt"] = fit["p"][j]
        out[f"df_{tag}_logt"] = fit["df"][j]
        if var == "ln_q_norm":
            mean, low, high = inference.t_interval(_document_slopes(acc, ys[j]), ci=ci)
            out[f"{col}_doc_mean"], out[f"{col}_doc_ci_low"], out[f"{col}_doc_ci_high"] = mean, low, high
    low, high = out["slope_logq_logt_ci_low"], out["slope_logq_logt_ci_high"]
    out["logq_direction"] = np.where(low > 0, "rises", np.where(high < 0, "falls", "flat"))
    mean = np.stack(acc.mean)  # [doc, head, p]
    n = np.asarray(acc.n, float)[:, None]
    for var, col in (("ln_q_norm", "mean_ln_q_norm"), ("entropy", "mean_entropy")):
        out[col] = (mean[..., _REGRESSION.index(var)] * n).sum(0) / n.sum()
    out["n_documents"] = fit["n_documents"].astype(int)
    out["n_tokens"] = fit["n_tokens"].astype(int)
    return out


# --------------------------------------------------------------------------- compute


def compute(cfg: LengthConfig, model, tokens: torch.Tensor, *, interventions: Sequence = (),
            progress: bool = False, rd=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(length_profile, length_summary) of `tokens` [document, seq_len], one document per pass,
    with `interventions` applied (e.g. a planted position-dependent query scale)."""
    layout = attention_layout(model)
    n_docs, seq_len = tokens.shape
    if attention_path(cfg.attention, seq_len) == "blocked":
        cap = BlockedCapture(layout, top_mass=None)
    else:
        cap = MetricCapture(layout, top_mass=None)
    bins, edges = position_bins(seq_len, cfg.min_position, cfg.bins_per_octave)
    t = np.arange(seq_len, dtype=float)
    layers = tuple(range(layout.n_layers))
    accs = [_Accumulator(layout.n_heads, len(edges) - 1) for _ in layers]
    bar = display.progress_bar(total=n_docs, desc="capture", unit="doc", enabled=progress)
    for d in range(n_docs):
        with P.timed(rd, "capture_s"):
            tm = cap.run(model, tokens[d : d + 1], interventions=interventions)
        for i, l in enumerate(tm.layers):
            accs[layers.index(l)].add(_per_token(tm, i, t), bins)
        del tm
        bar.update(1)
    bar.close()
    profile = pd.concat([_profile(a, [l], layout.n_heads, edges) for l, a in zip(layers, accs)],
                        ignore_index=True)
    summary = pd.concat([_summary(a, [l], layout.n_heads, cfg.ci) for l, a in zip(layers, accs)],
                        ignore_index=True)
    return profile, _across_heads(summary, logn_reference_slope(seq_len, cfg.min_position))


def logn_reference_slope(seq_len: int, min_position: int = 1) -> float:
    """The OLS slope on ln t of ln ln(t + 1), over the positions t = max(min_position, 1) ...
    seq_len − 1 that every document contributes: the slope of ln‖q‖ of a head whose query norm
    follows "log-n" scaling, ‖q‖ ∝ log(t + 1) (the entropy bound), over the same tokens."""
    t = np.arange(max(min_position, 1), seq_len, dtype=float)
    if len(t) < 2:
        raise SpectraError(f"seq_len {seq_len} leaves fewer than 2 positions from min_position {min_position}")
    x, y = np.log(t), np.log(np.log1p(t))
    return float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())


def _across_heads(summary: pd.DataFrame, reference: float) -> pd.DataFrame:
    """The columns that compare heads or a fixed slope: Benjamini–Hochberg q of the ln‖q‖ slope
    over every head, and where its interval lies against the log-n slope `reference`."""
    out = summary.copy()
    out["q_logq_logt"] = inference.fdr(out["p_logq_logt"])
    out["slope_logn_reference"] = reference
    low, high = out["slope_logq_logt_ci_low"], out["slope_logq_logt_ci_high"]
    out["logq_vs_logn"] = np.where(high < reference, "below", np.where(low > reference, "above", "includes"))
    return out


# --------------------------------------------------------------------------- figures


def _layer_figure(profile: pd.DataFrame, layer: int) -> go.Figure:
    sub = profile[profile["layer"] == layer]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("mean ln‖q‖", "mean entropy H (nats)"))
    for h, g in sub.groupby("head", sort=True):
        g = g.sort_values("bin")
        for col, c in (("mean_ln_q_norm", 1), ("mean_entropy", 2)):
            fig.add_trace(go.Scatter(x=g["mean_ln_t"], y=g[col], mode="lines+markers", name=f"H{h}",
                                     legendgroup=f"H{h}", showlegend=c == 1), row=1, col=c)
    bound = sub[sub["head"] == sub["head"].min()].sort_values("bin")
    fig.add_trace(go.Scatter(x=bound["mean_ln_t"], y=bound["mean_entropy_bound"], mode="lines",
                             name="log(t+1)", line=dict(dash="dash", color="gray")), row=1, col=2)
    fig.update_xaxes(title_text="ln t (position)")
    fig.update_layout(title=f"layer {layer}: query norm and entropy against position",
                      template="plotly_white")
    return fig


def figures(tables: dict[str, pd.DataFrame]) -> dict[str, go.Figure]:
    """Every figure of a length run, from its tables alone."""
    out: dict[str, go.Figure] = {}
    summary = tables.get("length_summary")
    if summary is not None and len(summary):
        s = summary.assign(logq_nonzero=summary["logq_direction"] != "flat")
        out["slope_logq_logt"] = figs.head_heatmap(
            s, "slope_logq_logt", mark="logq_nonzero",
            title="slope of ln‖q‖ on ln t per head (dots: document-clustered interval excludes 0)")
    profile = tables.get("length_profile")
    if profile is not None and len(profile):
        for layer in sorted(profile["layer"].unique()):
            out[f"length_L{int(layer)}"] = _layer_figure(profile, int(layer))
    return out


# --------------------------------------------------------------------------- run


def run(cfg: LengthConfig = LengthConfig(), *, model=None, interventions: Sequence = (),
        progress: bool = True) -> LengthResult:
    """The length study into `cfg.out`: length_profile.csv, length_summary.csv, figures, manifest."""
    cfg.validate()
    source = corpus_from_spec(cfg.corpus)  # a missing file fails before the model loads
    if isinstance(source, ShardManifest):
        raise SpectraError(f"--corpus {cfg.corpus!r} is a prepared shard directory; the length study "
                           "reads whole documents: name a corpus (e.g. kjv-books) or text files")
    with P.run_directory(cfg, EXPERIMENT) as rd:
        with P.timed(rd, "load_model_s"):
            model, model_name = P.load_run_model(cfg, model, progress=progress)
            layout = attention_layout(model)
        check_context(model, cfg.seq_len)
        if model.tokenizer is None:
            raise SpectraError("the model has no tokenizer; the length study tokenizes whole documents")
        with P.timed(rd, "tokens_s"):
            source, tokens, documents = _documents_of(source, model.tokenizer, cfg)
        rd.start(cfg, overwrite=cfg.overwrite)
        profile, summary = compute(cfg, model, tokens, interventions=interventions, progress=progress, rd=rd)
        with P.timed(rd, "write_s"):
            tables = {"length_profile": profile, "length_summary": summary}
            files = O.write_outputs(rd, tables, figures(tables), images=cfg.images, progress=progress)
        rd.finish(model=P.model_info(model_name, layout, model), corpus=source.description,
                  documents=documents.to_dict(orient="records"), seq_len=cfg.seq_len,
                  attention=attention_path(cfg.attention, cfg.seq_len),
                  interventions=[repr(i) for i in interventions],
                  interval="document-clustered CR2, Bell-McCaffrey df (stats.inference.cluster_wald)",
                  logq_direction=summary["logq_direction"].value_counts().to_dict(),
                  logn_reference_slope=float(summary["slope_logn_reference"].iloc[0]),
                  logq_vs_logn=summary["logq_vs_logn"].value_counts().to_dict(), files=files)
    return LengthResult(profile, summary, documents, out=rd.path)


def command(cfg: LengthConfig, *, progress: bool = True) -> int:
    """`spectra-lens length`: run `cfg`, print the slopes; SpectraError for bad input."""
    t0 = time.time()
    r = run(cfg, progress=progress)
    s = r.summary
    d = s["logq_direction"].value_counts()
    print(f"{len(s)} heads over {len(r.documents)} documents ({', '.join(map(str, r.documents['name']))}), "
          f"{cfg.seq_len} tokens each")
    print(f"slope of ln|q| on ln t: {int(d.get('rises', 0))} heads rise, {int(d.get('falls', 0))} fall "
          f"(document-clustered {cfg.ci:.0%} interval excludes 0), {int(d.get('flat', 0))} flat; "
          f"median {s['slope_logq_logt'].median():+.4f}")
    fdr = s[s["q_logq_logt"] < 1 - cfg.ci]
    v = s["logq_vs_logn"].value_counts()
    print(f"at a false discovery rate of {1 - cfg.ci:.0%} over heads: {int((fdr['slope_logq_logt'] > 0).sum())} rise, "
          f"{int((fdr['slope_logq_logt'] < 0).sum())} fall; against log-n scaling (slope "
          f"{s['slope_logn_reference'].iloc[0]:.3f}): {int(v.get('below', 0))} below, "
          f"{int(v.get('includes', 0))} include it, {int(v.get('above', 0))} above")
    print(f"median slope of H - log(t+1) on ln t: {s['slope_gap_logt'].median():+.4f}; "
          f"of H: {s['slope_entropy_logt'].median():+.4f}")
    print(f"wrote {r.out} in {time.time() - t0:.0f} s")
    return 0

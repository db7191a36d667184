"""One HTML page for one attention head: what it attends to, how sharp it is, what scaling it does.

    spectra-lens head L15H8 [--out results/heads] [--model M] [--agreement agreement.csv]

`head_page(model, layer, head)` measures, and `HeadPage.write(directory)` writes
`directory/L{layer}H{head}.html` (`head_page_path`), self-contained (plotly.js inline, no network):

* attention patterns, token-labelled, on a text sequence, a repeated random sequence (where an
  induction head shows its stripe) and the generation prompt;
* per-token ‖q‖ (effective query) and attention entropy along the text;
* the α-curve: mean entropy under query scaling α with t-intervals over sequences;
* observational slope vs causal gain with intervals: the within-sequence slope of entropy on
  log ‖q‖ against dH/d ln α (fitted over the α grid, and analytic −Var_p(s) at α = 1) — from the
  agreement table when one is given, else computed here on the page's sequences;
* the head-type scores (`head_types`) with the label thresholds;
* a greedy generation diff at two α values (`generate`).

In a notebook, a `HeadPage` displays itself (an iframe holding the page). After plotting, the
page's script writes `{figure_id: {"traces", "with_data", "rendered", "error"}}` into
`#spectra-render-status`, as the report does, so a headless browser can check every figure.
"""

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from spectra_lens.capture import capture_metrics
from spectra_lens.errors import SpectraError
from spectra_lens.generate import compare_generations
from spectra_lens.head_types import LABEL_RULE, diagnostic_inputs, head_type_scores
from spectra_lens.interventions import QueryScale
from spectra_lens.io import atomic_write
from spectra_lens.layout import attention_layout
from spectra_lens.present.figures import head_page as F
from spectra_lens.present.page import Figures, document
from spectra_lens.present.page import escape as _e
from spectra_lens.stats.inference import t_interval
from spectra_lens.sweep import head_curves
from spectra_lens.validate import HeadRef, check_alphas, check_tokens

__all__ = ["HEAD_PAGES_DIR", "HeadPage", "head_page", "head_page_path"]

HEAD_PAGES_DIR = "heads"  # head pages of a results directory live in RESULTS/heads/
DEFAULT_ALPHA_GRID = (0.25, 0.35, 0.5, 0.71, 1.0, 1.41, 2.0, 2.83, 4.0)


def head_page_path(directory, layer: int, head: int) -> Path:
    """`directory/L{layer}H{head}.html`: where the page of (layer, head) is written."""
    return Path(directory) / f"{HeadRef(int(layer), int(head))}.html"


@dataclass(frozen=True, repr=False)
class HeadPage:
    """Everything the page of one head shows; `html()` renders it, `write(dir)` saves it."""

    layer: int
    head: int
    model_name: str
    label: str
    scores: dict  # head-type scores of this head
    estimates: pd.DataFrame  # estimate, value, ci_low, ci_high, source
    alpha_curve: pd.DataFrame  # scale, mean_entropy(+ci), mean_max_attn
    generations: dict  # {α: GenerationDiff}
    agreement: dict | None = None  # this head's row of the agreement table, when one was given
    figures: dict = field(default_factory=dict)  # {name: go.Figure}, in page order
    notes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return str(HeadRef(self.layer, self.head))

    def html(self) -> str:
        return _render(self)

    def write(self, directory) -> Path:
        path = head_page_path(directory, self.layer, self.head)
        path.parent.mkdir(parents=True, exist_ok=True)
        page = self.html()

        # created with the umask's permissions, like every other output
        return atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))

    def __repr__(self) -> str:
        return (f"HeadPage({self.name} of {self.model_name}: {self.label}, "
                f"{len(self.figures)} figures, generations at α={sorted(self.generations)})")

    def _repr_html_(self) -> str:
        doc = html.escape(self.html(), quote=True)
        return f'<iframe srcdoc="{doc}" style="width:100%;height:900px;border:1px solid #ddd"></iframe>'


# --------------------------------------------------------------------------- measuring


def _labels(model, ids) -> list[str]:
    tok = getattr(model, "tokenizer", None)
    ids = [int(t) for t in ids]
    if tok is None:
        return [f"[{t}]" for t in ids]
    return [tok.decode([t]).replace("\n", "⏎") or f"[{t}]" for t in ids]


def _interval(values: np.ndarray, ci: float) -> tuple[float, float, float]:
    mean, low, high = t_interval(np.asarray(values, float)[:, None], ci=ci, axis=0)
    return float(mean[0]), float(low[0]), float(high[0])


def _slopes_given(y: np.ndarray, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Per row: the coefficient of x in the least-squares fit y ~ 1 + x + z (NaN if singular)."""
    out = np.full(y.shape[0], np.nan)
    for i in range(y.shape[0]):
        design = np.column_stack([np.ones_like(x[i]), x[i], z[i]])
        if np.linalg.matrix_rank(design) == 3:
            out[i] = np.linalg.lstsq(design, y[i], rcond=None)[0][1]
    return out


def _fitted_gains(alphas: tuple[float, ...], entropy: np.ndarray) -> np.ndarray:
    """Per sequence: the least-squares slope of entropy on ln α over the grid (`[alpha, batch]`)."""
    x = np.log(np.asarray(alphas))
    xc = x - x.mean()
    return (xc[:, None] * (entropy - entropy.mean(0, keepdims=True))).sum(0) / (xc * xc).sum()


# agreement.csv (stats.agreement) columns: (estimate, value, low, high)
AGREEMENT_ESTIMATES: tuple[tuple[str, str, str, str], ...] = (
    ("observational slope dH/d ln‖q‖ | log position", "obs_slope", "obs_slope_ci_low", "obs_slope_ci_high"),
    ("causal gain dH/d ln α, analytic at α = 1", "gain_analytic", "gain_ci_low", "gain_ci_high"),
)


def _agreement_row(agreement: pd.DataFrame | None, layer: int, head: int) -> pd.Series | None:
    if agreement is None:
        return None
    for c in ("layer", "head"):
        if c not in agreement.columns:
            raise SpectraError(f"the agreement table has no {c!r} column; columns: {list(agreement.columns)}")
    rows = agreement[(agreement["layer"] == layer) & (agreement["head"] == head)]
    return rows.iloc[0] if len(rows) else None


def head_page(
    model,
    layer: int,
    head: int,
    *,
    text,
    prompt=None,
    alphas: Sequence[float] = (0.5, 2.0),
    alpha_grid=DEFAULT_ALPHA_GRID,
    types: pd.DataFrame | None = None,
    agreement: pd.DataFrame | None = None,
    max_new_tokens: int = 16,
    n_shown: int = 32,
    ci: float = 0.95,
    model_name: str | None = None,
    progress: bool = False,
) -> HeadPage:
    """Measure one head for its page.

    `text`: token ids `[batch, pos]` (≥ 2 sequences, the independent units of every interval;
    the first is drawn); `prompt`: text or token ids continued by the generation diff (default:
    the first 16 tokens of `text[0]`); `alphas`: the two query scales of the generation diff;
    `alpha_grid`: the α-curve (1 is added); `types`: a head_types table (else this head's scores
    are measured on `text`); `agreement`: agreement.csv (its `obs_slope` and `gain_analytic`
    with intervals are shown when it has a row for the head; else both are computed on `text`).
    `progress`: a bar over the page's stages.
    """
    from spectra_lens.present.display import stages

    names = ["metrics", "head types", "alpha curve", "generation", "patterns"]
    with stages(f"head {HeadRef(layer, head)}", names, enabled=progress) as stage:
        return _head_page(model, layer, head, text=text, prompt=prompt, alphas=alphas,
                          alpha_grid=alpha_grid, types=types, agreement=agreement,
                          max_new_tokens=max_new_tokens, n_shown=n_shown, ci=ci,
                          model_name=model_name, stage=stage)


def _head_page(model, layer, head, *, text, prompt, alphas, alpha_grid, types, agreement,
               max_new_tokens, n_shown, ci, model_name, stage) -> HeadPage:
    layout = attention_layout(model)
    layout.check_head(layer, head)
    text = check_tokens(text)
    if text.shape[0] < 2 or text.shape[1] < 8:
        raise SpectraError(f"text must hold >= 2 sequences of >= 8 tokens, got {tuple(text.shape)}")
    alphas = tuple(alphas)
    if len(alphas) != 2:
        raise SpectraError(f"alphas must be two query scales for the generation diff, got {alphas}")
    alphas = check_alphas(alphas)
    grid = check_alphas(set(alpha_grid) | {1.0})
    notes: list[str] = []

    # Per-token ‖q‖ and entropy on every text sequence.
    stage("metrics")
    m = capture_metrics(model, text, layers=[layer])
    q_norm = m.q_norm[:, 0, head].double().numpy()  # [batch, pos]
    entropy = m.entropy[:, 0, head].double().numpy()

    stage("head types")
    if types is None:
        types = head_type_scores(model, diagnostic_inputs(model, text, n_repeated=8, half_len=32))
    row = types[(types["layer"] == layer) & (types["head"] == head)]
    if row.empty:
        raise SpectraError(f"the head-types table has no row for {HeadRef(layer, head)}")
    scores = row.iloc[0].to_dict()

    stage("alpha curve")
    sweep = head_curves(model, text, grid, layers=[layer])
    curve = sweep.summary(ci=ci)
    curve = curve[curve["head"] == head].reset_index(drop=True)

    # Observational slope vs causal gain; t-intervals over sequences unless the table has them.
    agree = _agreement_row(agreement, layer, head)
    needed = [c for _, *cols in AGREEMENT_ESTIMATES for c in cols]
    rows = []
    if agree is not None and all(c in agree.index for c in needed):
        rows += [(name, float(agree[v]), float(agree[lo]), float(agree[hi]), "agreement table")
                 for name, v, lo, hi in AGREEMENT_ESTIMATES]
    else:
        if agreement is not None:
            notes.append(f"The agreement table has no row with {needed} for {HeadRef(layer, head)}; "
                         f"the estimates below were computed on this page's sequences.")
        pos = np.broadcast_to(np.log(np.arange(1, q_norm.shape[1])), q_norm[:, 1:].shape)
        obs = _slopes_given(entropy[:, 1:], np.log(np.maximum(q_norm[:, 1:], 1e-30)), pos)
        rows.append((AGREEMENT_ESTIMATES[0][0], *_interval(obs, ci), "computed"))
        rows.append((AGREEMENT_ESTIMATES[1][0],
                     *_interval(sweep.local_gain[:, 0, head].double().numpy(), ci), "computed"))
    fitted = _fitted_gains(grid, sweep.metrics.entropy[:, :, 0, head].double().numpy())
    rows.append((f"causal gain dH/d ln α, fitted over α {grid[0]:g}…{grid[-1]:g}",
                 *_interval(fitted, ci), "computed"))
    estimates = pd.DataFrame(rows, columns=["estimate", "value", "ci_low", "ci_high", "source"])

    stage("generation")
    if prompt is None:
        prompt = text[0, : min(16, text.shape[1])]
    gens = {a: compare_generations(model, prompt, [QueryScale(layer, head, a)], modes=("greedy",),
                                   max_new_tokens=max_new_tokens)["greedy"] for a in alphas}

    # Patterns of a text sequence, a repeated random sequence and the prompt, token-labelled.
    stage("patterns")
    n = min(n_shown, text.shape[1])
    rep = diagnostic_inputs(model, text, n_repeated=2, half_len=min(12, max(4, n // 2))).repeated[:1]
    shown = {"text": text[:1, :n], "repeated random tokens": rep,
             "prompt": torch.tensor(gens[alphas[0]].prompt_tokens)[None]}
    name = str(HeadRef(layer, head))
    figures = {}
    for key, ids in shown.items():
        got = capture_metrics(model, ids, layers=[layer], patterns_for=[(layer, head)])
        figures[f"pattern-{key.split()[0]}"] = F.pattern(
            got.patterns[(layer, head)][0].numpy(), _labels(model, ids[0].tolist()), title=f"{name} attention: {key}")
    label = str(scores.get("label", "?"))
    figures["qnorm-entropy"] = F.qnorm_entropy(q_norm[0], entropy[0], _labels(model, text[0].tolist()),
                                               title=f"{name}: ‖q‖ and entropy along the text")
    figures["alpha-curve"] = F.alpha_curve(curve, marks=alphas, title=f"{name}: entropy under query scale α")
    figures["slope-vs-gain"] = F.estimates(estimates, title=f"{name}: observational slope vs causal gain "
                                                            f"({ci:.0%} intervals)")
    figures["type-scores"] = F.type_scores(scores, title=f"{name} head-type scores (label: {label})")
    figures["generation-delta"] = F.generation_delta(gens, title=f"{name}: Δ log p of the scaled continuation")
    return HeadPage(
        layer=layer, head=head, model_name=model_name or str(getattr(model.cfg, "model_name", "model")),
        label=label, scores=scores, estimates=estimates, alpha_curve=curve, generations=gens,
        agreement=None if agree is None else agree.to_dict(), figures=figures, notes=tuple(notes),
    )


# --------------------------------------------------------------------------- the page


def _generation_html(page: HeadPage) -> str:
    parts = []
    for a, g in page.generations.items():
        d = g.diverge_at

        def cells(c, d=d):
            return "".join(
                f'<span class="tok{" div" if d is not None and i >= d else ""}" '
                f'title="Δ log p = {dl:+.3f}">{_e(piece)}</span>'
                for i, (piece, dl) in enumerate(zip(c.pieces, c.delta_logprob)))

        where = "identical continuations" if d is None else f"first differs at generated token {d}"
        parts.append(
            f"<h4>α = {a:g} ({where})</h4><table class='gen'><tr><th>prompt</th><td>{_e(g.prompt)}</td></tr>"
            f"<tr><th>plain</th><td>{cells(g.base)}</td></tr><tr><th>α = {a:g}</th><td>{cells(g.scaled)}</td></tr></table>")
    return "".join(parts)


def _render(page: HeadPage) -> str:
    # The page machinery of the report (style, figure embedding, the render-status script that a
    # headless browser reads), so a head page renders and is checked like the report.
    figs = Figures()
    divs = {k: figs.div(f, f"fig-{k}", f.layout.title.text or k) for k, f in page.figures.items()}
    s = page.scores
    score_rows = "".join(f"<tr><th>{_e(k)}</th><td>{v:.4g}</td></tr>" if isinstance(v, float) else
                         f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in s.items())
    est = page.estimates.to_html(index=False, classes="data", border=0, float_format=lambda v: f"{v:.4g}")
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in page.notes)
    agreement = ""
    if page.agreement:
        agreement = ("<h4>This head's row of the agreement table</h4><table class=\"kv\">" + "".join(
            f"<tr><th>{_e(k)}</th><td>{_e(f'{v:.4g}' if isinstance(v, float) else v)}</td></tr>"
            for k, v in page.agreement.items()) + "</table>")

    def group(*names):
        return '<div class="figures">' + "".join(divs[n] for n in names if n in divs) + "</div>"

    body = (
        f"<h1>Head {_e(page.name)} <span class=\"badge complete\">{_e(page.label)}</span></h1>"
        f"<p>model <code>{_e(page.model_name)}</code> · layer {page.layer}, head {page.head}</p>{notes}"
        "<h2>What it attends to</h2>" + group("pattern-text", "pattern-repeated", "pattern-prompt") +
        "<h2>Query norm and entropy along the text</h2>" + group("qnorm-entropy") +
        "<h2>Query scaling</h2>" + group("alpha-curve", "slope-vs-gain") +
        f"<div class=\"scroll\">{est}</div>{agreement}"
        "<h2>Head type</h2>" + group("type-scores") +
        f"<p class=\"caption\">Label rule: {_e(LABEL_RULE)}.</p><table class=\"kv\">{score_rows}</table>"
        "<h2>Generation under query scaling</h2>" + group("generation-delta") + _generation_html(page)
    )
    return document(f"{page.name} · {page.model_name}", body, figs, css=_CSS)


_CSS = (".tok{border-right:1px dotted #ccc;white-space:pre}.tok.div{background:#fde2e1}"
        "table.gen td{text-align:left;font-family:ui-monospace,monospace}")

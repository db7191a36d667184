"""Head types, measured: how much each head attends to the first token, the previous token, the
token after an earlier occurrence of the current token, and nearby tokens, on standard inputs.

Scores (each a mean attention mass in [0, 1], `p` = the head's real `hook_pattern`):

* `sink_score`: mass on the first token (position 0), mean over query positions i ≥ 1, on text.
* `prev_token_score`: mass on key i − 1, mean over i ≥ 2, on text.
* `local_score`: mass on keys i − W + 1 … i (W = `window`, default 4; self included), mean over
  i ≥ W, on text.
* `induction_score`: on repeated random tokens `[first, r_1 … r_T, r_1 … r_T]`, the mass a query
  in the second copy puts on the token after the earlier occurrence of its own token (key
  i − T + 1), mean over the T queries of the second copy.
* `duplicate_token_score`: on the same sequences, the mass a query in the second copy puts on the
  earlier occurrence of its own token (key i − T), mean over the T queries of the second copy.

Relation to TransformerLens's `head_detector.detect_head` (error_measure "mul", no exclusions):
its "induction_head" and "duplicate_token_head" scores use the same targets (every earlier
position holding the current token, shifted by one for induction) but divide the mass on them by
the sum of the whole pattern, i.e. by all n = first + 2T rows, while ours divides by the T rows
of the second copy, the only ones that have a target. When the T random tokens are all distinct
(so only the second copy has targets), per sequence and hence averaged over sequences:

    TransformerLens score = T / (first + 2T) · our score     (= our score / 2 when first = 0;
                                                               ≈ / 2.03 for T = 32, first = 1)

A random block with a repeated token adds targets in the first copy that TransformerLens counts
and we do not. `prev_token_score` is TransformerLens's "previous_token_head" target (key i − 1)
averaged over rows i ≥ 2, while theirs sums rows i ≥ 1 and divides by all n rows: on the same
sequence, theirs = ((n − 2) · ours + p[1, 0]) / n. Their "mul" scores of a list of strings are
the mean of the per-string scores, as ours are the mean of per-sequence scores.

The label (`LABEL_RULE`, first match wins): induction if `induction_score` ≥ 0.3; else
previous-token if `prev_token_score` ≥ 0.5; else sink if `sink_score` ≥ 0.5; else local if
`local_score` ≥ 0.5; else diffuse if `entropy_norm` ≥ 0.9; else positional if
`positional_score` ≥ 0.8; else mixed. Specific content-driven behaviour goes first (an induction
head still parks its spare mass on the sink); a uniform head is content-independent too, so
"diffuse" is decided before "positional". `duplicate_token_score` is measured, not used by the
rule.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from spectra_lens.capture import attached
from spectra_lens.errors import SpectraError
from spectra_lens.layout import attention_layout, hook_name
from spectra_lens.sweep import analytic_gain

__all__ = [
    "LABELS",
    "LABEL_RULE",
    "SCORE_COLUMNS",
    "THRESHOLDS",
    "DiagnosticInputs",
    "by_label",
    "diagnostic_inputs",
    "head_type_scores",
    "join_heads",
    "label_heads",
]

SCORE_COLUMNS = ("sink_score", "prev_token_score", "induction_score", "local_score",
                 "positional_score", "entropy_norm", "duplicate_token_score")
# (label, score column, threshold), checked in this order; the first that passes names the head.
THRESHOLDS: tuple[tuple[str, str, float], ...] = (
    ("induction", "induction_score", 0.3),
    ("previous-token", "prev_token_score", 0.5),
    ("sink", "sink_score", 0.5),
    ("local", "local_score", 0.5),
    ("diffuse", "entropy_norm", 0.9),
    ("positional", "positional_score", 0.8),
)
LABELS = tuple(t[0] for t in THRESHOLDS) + ("mixed",)
LABEL_RULE = "; ".join(f"{label} if {col} >= {thr}" for label, col, thr in THRESHOLDS) + \
    "; else mixed (first match wins)"


@dataclass(frozen=True, repr=False)
class DiagnosticInputs:
    """The token batches the scores are measured on.

    `text` `[batch, pos]`: natural text (sink, previous-token, local, entropy, gain);
    `repeated` `[batch, first + 2·half_len]`: `first` leading token(s) (the model's BOS when it
    prepends one, else none) then the same `half_len` random tokens twice.
    """

    text: Int[Tensor, "text_batch pos"]
    repeated: Int[Tensor, "rep_batch rep_pos"]
    half_len: int
    first: int  # leading tokens before the random block (0 or 1)

    def __repr__(self) -> str:
        return (f"DiagnosticInputs(text={tuple(self.text.shape)}, repeated={tuple(self.repeated.shape)}, "
                f"half_len={self.half_len}, first={self.first})")


def _bos(model) -> int | None:
    tok = getattr(model, "tokenizer", None)
    if tok is None or tok.bos_token_id is None or not getattr(model.cfg, "default_prepend_bos", True):
        return None
    return int(tok.bos_token_id)


def diagnostic_inputs(
    model, text: Int[Tensor, "batch pos"], *, n_repeated: int = 8, half_len: int = 32, seed: int = 0
) -> DiagnosticInputs:
    """`text` plus `n_repeated` sequences of `half_len` random tokens shown twice.

    Random tokens are drawn uniformly from the vocabulary without the tokenizer's special tokens;
    the model's BOS leads each sequence when it prepends one (so position 0 is what it is in text).
    """
    if not isinstance(text, Tensor) or text.ndim != 2 or text.shape[1] < 8 or text.dtype.is_floating_point:
        raise SpectraError(f"text must be an integer tensor [batch, pos] with pos >= 8, got "
                           f"{tuple(text.shape) if isinstance(text, Tensor) else type(text).__name__}")
    if n_repeated < 2 or half_len < 4:
        raise SpectraError(f"need n_repeated >= 2 and half_len >= 4, got {n_repeated}, {half_len}")
    vocab = int(model.cfg.d_vocab)
    tok = getattr(model, "tokenizer", None)
    special = set(getattr(tok, "all_special_ids", []) or []) if tok is not None else set()
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    g = torch.Generator().manual_seed(seed)
    r = allowed[torch.randint(len(allowed), (n_repeated, half_len), generator=g)]
    bos = _bos(model)
    lead = torch.full((n_repeated, 1), bos, dtype=torch.long) if bos is not None else r[:, :0]
    return DiagnosticInputs(text.long(), torch.cat([lead, r, r], dim=1), half_len, lead.shape[1])


class _ScoreCapture:
    """Hooks on every layer's hook_pattern that reduce each pattern to per-head score sums."""

    def __init__(self, n_layers: int, what: str, *, window: int, half_len: int, first: int):
        self.n_layers, self.what = n_layers, what
        self.window, self.half_len, self.first = window, half_len, first
        self.scores: dict[int, dict[str, Tensor]] = {}

    def hooks(self, layout=None) -> list:
        return [(hook_name(l, "pattern"), self._hook(l)) for l in range(self.n_layers)]

    def _hook(self, l: int):
        def fn(p, hook):
            p = p.detach().float()
            self.scores[l] = (_text_scores(p, self.window) if self.what == "text"
                              else _repeated_scores(p, self.half_len, self.first))

        return fn


def _text_scores(p: Float[Tensor, "batch head query_pos key_pos"], window: int) -> dict[str, Tensor]:
    n = p.shape[-1]
    i = torch.arange(n, device=p.device)
    sink = p[..., 1:, 0].mean(-1)
    prev = p.diagonal(offset=-1, dim1=-2, dim2=-1)[..., 1:].mean(-1)  # rows i >= 2
    band = ((i[:, None] - i[None, :]) >= 0) & ((i[:, None] - i[None, :]) < window)
    local = (p * band).sum(-1)[..., window:].mean(-1)
    H = -torch.special.xlogy(p, p).sum(-1)  # [batch, head, query]
    n_vis = (p > 0).sum(-1).clamp_min(1).float()
    norm = torch.where(n_vis > 1, H / torch.log(n_vis).clamp_min(1e-12), torch.zeros_like(H))
    return {"sink_score": sink, "prev_token_score": prev, "local_score": local,
            "entropy_norm": norm[..., 1:].mean(-1), "mean_entropy": H[..., 1:].mean(-1)}


def _repeated_scores(p: Float[Tensor, "batch head query_pos key_pos"], half_len: int, first: int) -> dict[str, Tensor]:
    T = half_len
    q = torch.arange(first + T, first + 2 * T, device=p.device)
    induction = p[..., q, q - T + 1].mean(-1)
    duplicate = p[..., q, q - T].mean(-1)
    rows = p[..., 1 : first + T, : first + T]  # first copy: nothing has repeated yet
    tv = 0.5 * (rows - rows.mean(0, keepdim=True)).abs().sum(-1)  # [batch, head, query]
    return {"induction_score": induction, "positional_score": 1.0 - tv.mean(-1),
            "duplicate_token_score": duplicate}


def _run(model, tokens: Tensor, cap: _ScoreCapture, batch_size: int) -> dict[str, Tensor]:
    device = next(model.parameters()).device
    parts: list[dict[int, dict[str, Tensor]]] = []
    for block in tokens.split(batch_size):
        cap.scores = {}
        with torch.no_grad(), attached(model, cap):
            model(block.to(device), return_type=None)
        parts.append(cap.scores)
    names = parts[0][0].keys()
    # {name: [batch, layer, head]}
    return {n: torch.cat([torch.stack([d[l][n] for l in range(cap.n_layers)], 1) for d in parts], 0).cpu()
            for n in names}


def head_type_scores(
    model, inputs: DiagnosticInputs, *, window: int = 4, batch_size: int = 8, gain: bool = True
) -> pd.DataFrame:
    """One row per head: the scores of the module docstring, their label and `analytic_gain`.

    Columns: `layer`, `head`, `label`, `sink_score`, `prev_token_score`, `local_score`,
    `entropy_norm`, `mean_entropy`, `induction_score`, `positional_score`,
    `duplicate_token_score`, `analytic_gain`, and
    `{score}_sd`: the standard deviation of the per-sequence score over the sequences.
    """
    layout = attention_layout(model)
    if not isinstance(window, int) or window < 1 or window >= inputs.text.shape[1]:
        raise SpectraError(f"window must be an int in [1, {inputs.text.shape[1]}), got {window!r}")
    n_layers = layout.n_layers
    text = _run(model, inputs.text, _ScoreCapture(n_layers, "text", window=window, half_len=0, first=0),
                batch_size)
    rep = _run(model, inputs.repeated, _ScoreCapture(n_layers, "repeated", window=window,
                                                      half_len=inputs.half_len, first=inputs.first), batch_size)
    per_seq = {**text, **rep}
    if gain:
        per_seq["analytic_gain"] = analytic_gain(model, inputs.text, min_position=1, batch_size=batch_size)
    n_heads = layout.n_heads
    cols: dict[str, object] = {
        "layer": np.repeat(np.arange(n_layers), n_heads),
        "head": np.tile(np.arange(n_heads), n_layers),
    }
    for name, v in per_seq.items():
        cols[name] = v.double().mean(0).reshape(-1).numpy()
        if name in SCORE_COLUMNS:
            cols[f"{name}_sd"] = v.double().std(0).reshape(-1).numpy() if v.shape[0] > 1 else np.nan
    frame = pd.DataFrame(cols)
    frame.insert(2, "label", label_heads(frame))
    return frame


def label_heads(scores: pd.DataFrame) -> pd.Series:
    """The label of each row by `THRESHOLDS` (first match wins; "mixed" when none passes)."""
    missing = [c for _, c, _ in THRESHOLDS if c not in scores.columns]
    if missing:
        raise SpectraError(f"a head-type table needs columns {[c for _, c, _ in THRESHOLDS]}; missing {missing}")
    label = pd.Series("mixed", index=scores.index, dtype=object)
    decided = pd.Series(False, index=scores.index)
    for name, col, thr in THRESHOLDS:
        hit = ~decided & (scores[col] >= thr)
        label[hit] = name
        decided |= hit
    return label


def join_heads(types: pd.DataFrame, *tables: pd.DataFrame, suffixes: tuple[str, ...] = ()) -> pd.DataFrame:
    """`types` left-joined on (layer, head) with each per-head table (e.g. agreement.csv,
    gain_summary.csv). A column already present gets the table's suffix (`suffixes[i]`, default
    `_t{i}`), so nothing is overwritten."""
    out = types.copy()
    for i, t in enumerate(tables):
        for c in ("layer", "head"):
            if c not in t.columns:
                raise SpectraError(f"table {i} has no {c!r} column to join on; columns: {list(t.columns)}")
        if t.duplicated(["layer", "head"]).any():
            raise SpectraError(f"table {i} has more than one row per (layer, head): not a per-head table")
        sfx = suffixes[i] if i < len(suffixes) else f"_t{i}"
        out = out.merge(t, on=["layer", "head"], how="left", suffixes=("", sfx), validate="one_to_one")
    return out


def by_label(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per label: `n`, mean / median / min of `column`, and `mean_rank` (1 = the most negative
    value among all heads) — "do induction heads have the most negative gain?" in one table,
    sorted by mean."""
    if "label" not in frame.columns or column not in frame.columns:
        raise SpectraError(f"need columns 'label' and {column!r}; got {list(frame.columns)}")
    x = frame[["label", column]].dropna()
    rank = x[column].rank(method="average")
    g = x.assign(rank=rank).groupby("label")
    out = pd.DataFrame({
        "n": g.size(),
        f"mean_{column}": g[column].mean(),
        f"median_{column}": g[column].median(),
        f"min_{column}": g[column].min(),
        "mean_rank": g["rank"].mean(),
    })
    return out.sort_values(f"mean_{column}").reset_index()

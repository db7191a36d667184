"""Causal outcomes that can come out either way, and controls that mean something.

A head's own entropy under its own query scaling is softmax(α·s) of the unscaled scores: it
falls with α for every head, always (dH/d ln α = −α² Var_p(s) ≤ 0), so it checks the hooks and
is no evidence. What the model does with the change is not fixed by the mathematics:

* the **downstream effects** of the intervention: the next-token loss change, KL(p_1 ‖ p_α) of
  the next-token distribution (unscaled ‖ scaled) and the entropy change of every later head
  (`sweep.intervention_effects` measures them in real forward passes);
* **controls**: a *sham* (`sham_check`: the scaling hook attached at α = 1, which must change
  nothing, bit for bit), a *norm-preserving rotation* of the same head's query (`QueryRotate`)
  by an angle matched to the head's natural variation in direction (`query_direction_spread`), and a
  *control head* chosen because its observational r(log ‖q‖, H) is near 0 with a tight
  document-level jackknife interval on held-out documents (`choose_control_head`, rule
  `CONTROL_RULE`; `control_ranking` gives the runners-up).

Intervals resample **documents** (`document_bootstrap`): a percentile bootstrap of the mean over
sequences, in which every resampled document brings all its sequences. The bootstrap mean of
values that lie in [a, b] lies in [a, b], so the interval of a bounded metric (entropy ≥ 0,
max attention in [0, 1], KL ≥ 0) stays inside its bounds, which a t-interval does not.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from scipy import stats
from torch import Tensor

from spectra_lens.capture import MetricCapture, attached
from spectra_lens.errors import SpectraError
from spectra_lens.interventions import QueryScale
from spectra_lens.layout import attention_layout
from spectra_lens.stats.inference import pearson
from spectra_lens.validate import check_min_position, check_tokens

__all__ = [
    "CONTROL_RULE",
    "CONTROL_TOP",
    "MIN_MEASURE_DOCUMENTS",
    "MIN_SELECT_DOCUMENTS",
    "DirectionSpread",
    "SmallClusterWarning",
    "choose_control_head",
    "control_ranking",
    "document_bootstrap",
    "query_direction_spread",
    "head_r_table",
    "r_scores_from_sums",
    "sham_check",
]

log = logging.getLogger(__name__)

MIN_MEASURE_DOCUMENTS = 4
MIN_SELECT_DOCUMENTS = 2
CONTROL_TOP = 5

CONTROL_RULE = (
    "control head: among all heads other than the target (or those of --control-layer when "
    "given), scored on the selection documents, which are disjoint from the measured ones: the "
    "token-level Pearson r(log ||q||, entropy) with a document-level jackknife interval (the "
    "slope of entropy on log ||q|| refitted leaving out one document at a time, t with G - 1 df; "
    "the slope's interval times sd(log ||q||)/sd(entropy)) and its p for r = 0. Eligible: p >= 1 - ci (the calibrated test finds no dependence). Score: "
    "max(|low|, |high|) of the interval, the smallest margin within which r is shown to be near "
    "0; the eligible head with the smallest score is the control, ties broken by |r|. Refused "
    f"with fewer than {MIN_SELECT_DOCUMENTS} selection documents, or fewer than "
    f"{MIN_MEASURE_DOCUMENTS} measured documents left after holding them out"
)

ROTATION_RULE = (
    "rotation angle theta: the median over held-out selection tokens (positions >= "
    "min_position) of the angle between the head's effective query and the head's mean query "
    "direction (the normalized mean of the unit queries); each query is rotated by theta (times "
    "the multiples of the grid) towards a random direction orthogonal to it, so ||q|| is kept"
)


class SmallClusterWarning(UserWarning):
    """Fewer documents than a cluster bootstrap can resample meaningfully."""


# --------------------------------------------------------------------------- document bootstrap


def _document_index(documents, n: int) -> tuple[np.ndarray, int]:
    docs = np.arange(n) if documents is None else np.asarray(documents)
    if docs.shape != (n,):
        raise SpectraError(f"documents must hold one id per sequence ({n}), got shape {docs.shape}")
    _, index = np.unique(docs, return_inverse=True)
    return index.reshape(-1), int(index.max()) + 1 if n else 0


def document_bootstrap(
    values: Tensor | np.ndarray,
    documents=None,
    *,
    ci: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
    min_documents: int = 5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, low, high) of the mean over sequences (axis 0) of `values` `[sequence, ...]`.

    The interval is the percentile bootstrap that resamples documents (`documents`: one id per
    sequence; None: every sequence is its own document) with replacement, each bringing all its
    sequences; the statistic is the pooled mean of the resampled sequences. Being a mean of
    observed values, every bootstrap replicate lies within [min, max] of the values, so the
    interval of a bounded quantity stays inside its bounds. NaN interval with fewer than 2
    documents; a SmallClusterWarning below `min_documents`.
    """
    if not 0 < ci < 1:
        raise SpectraError(f"ci must lie strictly between 0 and 1, got {ci!r}")
    x = values.detach().cpu().double().numpy() if isinstance(values, Tensor) else np.asarray(values, float)
    n = x.shape[0]
    if n == 0:
        raise SpectraError("document_bootstrap needs at least one sequence")
    index, g = _document_index(documents, n)
    flat = x.reshape(n, -1)
    mean = flat.mean(0)
    if g < 2:
        nan = np.full_like(mean, np.nan)
        return mean.reshape(x.shape[1:]), nan.reshape(x.shape[1:]), nan.copy().reshape(x.shape[1:])
    if g < min_documents:
        import warnings

        warnings.warn(f"document bootstrap over only {g} documents: the interval is unreliable",
                      SmallClusterWarning, stacklevel=2)
    sums = np.zeros((g, flat.shape[1]))
    np.add.at(sums, index, flat)
    counts = np.bincount(index, minlength=g).astype(float)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(g, np.full(g, 1.0 / g), size=n_boot).astype(float)  # [boot, doc]
    boot = (weights @ sums) / (weights @ counts)[:, None]
    tail = (1 - ci) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail], axis=0)
    # Percentiles interpolate between replicates, all within [min, max]; clip float residue.
    lo_b, hi_b = flat.min(0), flat.max(0)
    low, high = np.clip(low, lo_b, hi_b), np.clip(high, lo_b, hi_b)
    shape = x.shape[1:]
    return mean.reshape(shape), low.reshape(shape), high.reshape(shape)


# --------------------------------------------------------------------------- rotation control


@dataclass(frozen=True)
class DirectionSpread:
    """How much a head's effective query varies, from held-out tokens.

    `median_angle`: median angle (radians) between each query and the head's mean direction;
    `sd_log_norm`: SD of ln ‖q‖ over the same tokens; `n_tokens`.
    """

    layer: int
    head: int
    median_angle: float
    sd_log_norm: float
    n_tokens: int

    @classmethod
    def of(cls, layer: int, head: int, q: Tensor) -> DirectionSpread:
        """The spread of the queries `q` [tokens, d] (float64 for the angles near 0)."""
        norm = q.norm(dim=-1)
        unit = q / norm[:, None].clamp_min(1e-300)
        mean_dir = unit.mean(0)
        mean_dir = mean_dir / mean_dir.norm().clamp_min(1e-300)
        angles = torch.arccos((unit @ mean_dir).clamp(-1, 1))
        return cls(layer, head, float(angles.median()), float(norm.log().std()), int(q.shape[0]))

    def as_dict(self) -> dict:
        return {"layer": self.layer, "head": self.head, "median_angle_rad": self.median_angle,
                "median_angle_deg": math.degrees(self.median_angle), "sd_log_q_norm": self.sd_log_norm,
                "n_tokens": self.n_tokens, "rule": ROTATION_RULE}


def query_direction_spread(
    model, tokens: Int[Tensor, "batch pos"], layer: int, head: int, *, min_position: int = 1,
    batch_size: int = 16,
) -> DirectionSpread:
    """The natural variation of (layer, head)'s effective query on `tokens` (see ROTATION_RULE)."""
    tokens = check_tokens(tokens)
    layout = attention_layout(model)
    layout.check_head(layer, head)
    check_min_position(min_position, tokens.shape[1])
    name = layout.q_hook(layer)
    got: list[Tensor] = []

    def grab(x, hook):
        got.append(x[:, min_position:, head].detach().double().reshape(-1, x.shape[-1]).cpu())

    device = next(model.parameters()).device
    stop = layer + 1 if layer + 1 < layout.n_layers else None
    with torch.no_grad():
        for block in tokens.split(batch_size):
            with attached(model, (name, grab), layout=layout):
                model(block.to(device), return_type=None, stop_at_layer=stop)
    return DirectionSpread.of(layer, head, torch.cat(got))


# --------------------------------------------------------------------------- sham control


def sham_check(model, tokens: Int[Tensor, "batch pos"], layer: int, head: int, *,
               min_position: int = 1, batch_size: int = 16) -> tuple[dict, Effects]:
    """The query-scaling hook attached at α = 1 against no hook, pass for pass on the same
    batches: logits and every captured metric of every layer ≥ `layer` must be bit-identical.

    Returns ({"bitwise_equal", "max_abs_logit_diff", "max_abs_metric_diff", "n_sequences"},
    the sham's per-sequence `Effects`), all measured, not assumed.
    """
    tokens = check_tokens(tokens)
    layout = attention_layout(model)
    layout.check_head(layer, head)
    check_min_position(min_position, tokens.shape[1])
    layers = range(layer, layout.n_layers)
    device = next(model.parameters()).device
    equal, d_logit, d_metric = True, 0.0, 0.0
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    with torch.no_grad():
        for block in tokens.split(batch_size):
            block = block.to(device)
            runs = []
            for items in ((), (QueryScale(layer, head, 1.0),)):
                cap = MetricCapture(layout, layers=layers, top_mass=None)
                with attached(model, *items, cap, layout=layout):
                    logits = model(block, return_type="logits")
                runs.append((logits, cap.result()))
            (l0, m0), (l1, m1) = runs
            equal &= torch.equal(l0, l1)
            d_logit = max(d_logit, float((l0 - l1).abs().max()))
            for n in ("q_norm", "k_norm", "entropy", "max_attn", "k_eff_pr", "sink_mass", "local_gain"):
                a, b = getattr(m0, n), getattr(m1, n)
                equal &= torch.equal(a, b)
                d_metric = max(d_metric, float((a - b).abs().max()))
            lp0, lp1 = torch.log_softmax(l0.double(), -1), torch.log_softmax(l1.double(), -1)
            tgt = block[:, 1:, None]
            d_loss = (-lp1[:, :-1].gather(-1, tgt) + lp0[:, :-1].gather(-1, tgt)).squeeze(-1).mean(-1)
            kl = (lp0.exp() * (lp0 - lp1)).sum(-1).mean(-1)
            d_ent = (m1.entropy[..., min_position:].double() - m0.entropy[..., min_position:].double()).mean(-1)
            parts.append((d_loss.cpu(), kl.cpu(), d_ent.cpu()))
    d_loss, kl, d_ent = (torch.cat([p[i] for p in parts]) for i in range(3))
    summary = {"bitwise_equal": bool(equal), "max_abs_logit_diff": d_logit,
               "max_abs_metric_diff": d_metric, "n_sequences": int(tokens.shape[0])}
    return summary, Effects(d_loss, kl, d_ent[:, 0, head], d_ent[:, 1:])


# --------------------------------------------------------------------------- control head


def _pearson_from_sums(n, sx, sy, sxx, syy, sxy):
    """`stats.inference.pearson` of the centred cross-products of sums of 1, x, y, x², y², xy."""
    return pearson(sxx - sx * sx / n, syy - sy * sy / n, sxy - sx * sy / n)


def r_scores_from_sums(sums: np.ndarray, *, ci: float = 0.95) -> dict[str, np.ndarray]:
    """r(x, y) with a document-level jackknife t interval and p, from per-document sums.

    `sums` is `[document, 6, ...]`: per document the sums of 1, x, y, x², y² and xy (any trailing
    shape, e.g. layer × head). The slope β of y on x is refitted leaving out one document at a
    time (β₍g₎); se = √((G − 1)/G · Σ_g (β₍g₎ − mean β₍·₎)²) (the CR3 / leave-one-cluster-out
    variance) and the reference is t with G − 1 degrees of freedom. r = β · sd(x)/sd(y), so the
    slope's interval times sd(x)/sd(y) is the interval of r with the sample SDs held fixed; it
    excludes 0 exactly when p < 1 − ci. Under a null with document-clustered tokens the test
    rejects at its nominal rate at 16 documents (tests/sweep/test_causal.py), where the
    percentile bootstrap of r and CR2 with Bell–McCaffrey df reject too often.

    Returns {"r", "low", "high", "p", "df", "score", "n_tokens", "n_documents"} with the
    trailing shape; score = max(|low|, |high|); NaN where r or the interval is undefined (fewer
    than 2 documents, a constant variable).
    """
    sums = np.asarray(sums, dtype=float)
    g, six, *shape = sums.shape
    if six != 6:
        raise SpectraError(f"sums must be [document, 6, ...] (1, x, y, x², y², xy); got {sums.shape}")
    flat = sums.reshape(g, 6, -1)
    held = flat[:, 0] > 0  # [doc, head]: documents holding the head's tokens
    total = flat.sum(0)
    r = _pearson_from_sums(*total)

    def centred(m):
        return m[3] - m[1] ** 2 / m[0], m[4] - m[2] ** 2 / m[0], m[5] - m[1] * m[2] / m[0]

    with np.errstate(invalid="ignore", divide="ignore"):
        cxx, cyy, cxy = centred(total)
        beta = cxy / cxx
        loo = total[None] - flat  # [doc, 6, head]
        lxx, _, lxy = centred(np.moveaxis(loo, 1, 0))
        b_loo = np.where(held, lxy / lxx, np.nan)
        n_docs = held.sum(0).astype(float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # heads with no documents
            mean_loo = np.nanmean(b_loo, axis=0)
        se = np.sqrt((n_docs - 1) / n_docs * np.nansum((b_loo - mean_loo) ** 2, axis=0))
        df = np.where(n_docs >= 2, n_docs - 1, np.nan)
        t = beta / se
        p = 2 * stats.t.sf(np.abs(t), df)
        half = stats.t.ppf(0.5 + ci / 2, df) * se
        ratio = np.sqrt(cxx / cyy)
        low, high = (beta - half) * ratio, (beta + half) * ratio
    bad = ~np.isfinite(r) | ~np.isfinite(low) | ~np.isfinite(high) | ~np.isfinite(p) | ~(n_docs >= 2)
    nan = lambda v: np.where(bad, np.nan, v)  # noqa: E731
    low, high = nan(low), nan(high)
    out = {"r": r, "low": low, "high": high, "p": nan(p), "df": nan(df),
           "score": np.maximum(np.abs(low), np.abs(high)), "n_tokens": total[0], "n_documents": n_docs}
    return {k: v.reshape(shape) for k, v in out.items()}


def head_r_table(
    model, tokens: Int[Tensor, "batch pos"], documents=None, *, min_position: int = 1,
    ci: float = 0.95, batch_size: int = 16,
) -> pd.DataFrame:
    """Per head: token-level Pearson r(ln ‖q‖, entropy) on `tokens` (positions ≥ min_position)
    with its document-level jackknife t interval and p (`r_scores_from_sums`; `documents`: one id
    per sequence, None: each sequence its own document).

    Columns: layer, head, r_log_q_entropy, r_ci_low, r_ci_high, p_doc, df_doc,
    control_score (max(|low|, |high|)), n_tokens, n_documents.
    """
    tokens = check_tokens(tokens)
    layout = attention_layout(model)
    index, g = _document_index(documents, tokens.shape[0])
    device = next(model.parameters()).device
    sums = None  # [doc, 6, layer, head]
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            block = tokens[start : start + batch_size]
            cap = MetricCapture(layout, top_mass=None)
            with attached(model, cap, layout=layout):
                model(block.to(device), return_type=None)
            m = cap.result()
            x = m.q_norm[..., min_position:].double().log()  # [batch, layer, head, pos]
            y = m.entropy[..., min_position:].double()
            per_seq = torch.stack([torch.ones_like(x).sum(-1), x.sum(-1), y.sum(-1), (x * x).sum(-1),
                                   (y * y).sum(-1), (x * y).sum(-1)], dim=1).numpy()  # [b, 6, L, H]
            if sums is None:
                sums = np.zeros((g, *per_seq.shape[1:]))
            np.add.at(sums, index[start : start + block.shape[0]], per_seq)
    sc = r_scores_from_sums(sums, ci=ci)
    L, H = sc["r"].shape
    return pd.DataFrame({
        "layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L),
        "r_log_q_entropy": sc["r"].reshape(-1), "r_ci_low": sc["low"].reshape(-1),
        "r_ci_high": sc["high"].reshape(-1), "p_doc": sc["p"].reshape(-1),
        "df_doc": sc["df"].reshape(-1), "control_score": sc["score"].reshape(-1),
        "n_tokens": int(sc["n_tokens"][0, 0]), "n_documents": g,
    })


def control_ranking(r_table: pd.DataFrame, target: tuple[int, int], *, layer: int | None = None,
                    ci: float = 0.95) -> pd.DataFrame:
    """Every candidate of `CONTROL_RULE` (all heads but the target; those of `layer` when
    given) ranked by the rule: eligible heads (p ≥ 1 − ci) first by score then |r|, then the
    ineligible ones the same way. Adds `eligible`, `control_score` (when absent) and `rank`
    (1 = the rule's choice when it is eligible)."""
    t = r_table[~((r_table["layer"] == target[0]) & (r_table["head"] == target[1]))].copy()
    if layer is not None:
        t = t[t["layer"] == layer]
    if "control_score" not in t.columns:
        t["control_score"] = np.maximum(t["r_ci_low"].abs(), t["r_ci_high"].abs())
    finite = np.isfinite(t["control_score"]) & np.isfinite(t["p_doc"])
    t["eligible"] = finite & (t["p_doc"] >= 1 - ci)
    order = np.lexsort((t["r_log_q_entropy"].abs().fillna(np.inf).to_numpy(),
                        t["control_score"].fillna(np.inf).to_numpy(), ~t["eligible"].to_numpy()))
    t = t.iloc[order].reset_index(drop=True)
    t["rank"] = np.arange(1, len(t) + 1)
    return t


def choose_control_head(r_table: pd.DataFrame, target: tuple[int, int], *,
                        layer: int | None = None, ci: float = 0.95) -> tuple[int, int]:
    """The head `CONTROL_RULE` picks from `head_r_table` output; SpectraError (one line) when
    no head is eligible or the intervals are undefined (fewer than MIN_SELECT_DOCUMENTS)."""
    ranked = control_ranking(r_table, target, layer=layer, ci=ci)
    where = "" if layer is None else f" of layer {layer}"
    if ranked.empty or not np.isfinite(ranked["control_score"]).any():
        n_docs = int(r_table["n_documents"].iloc[0]) if "n_documents" in r_table and len(r_table) else 0
        raise SpectraError(
            f"no head{where} other than the target has a finite r interval to choose a control from: "
            f"the rule needs at least {MIN_SELECT_DOCUMENTS} selection documents, got {n_docs} "
            "(raise --n-select or pass --control-head)")
    if not ranked["eligible"].iloc[0]:
        raise SpectraError(
            f"no head{where} other than the target has r(log ||q||, entropy) indistinguishable from 0 "
            f"(document jackknife p >= {1 - ci:g}) on the selection documents; pass --control-head")
    row = ranked.iloc[0]
    return int(row["layer"]), int(row["head"])


# --------------------------------------------------------------------------- effects table

EFFECT_DEFINITIONS = {
    "delta_loss": "mean next-token NLL (nats) with the intervention minus without, per sequence",
    "kl_unscaled_scaled": "mean over positions of KL(p_1 || p_x) of the next-token distribution, "
                          "p_1 unintervened, p_x intervened (nats, >= 0)",
    "own_delta_entropy": "the intervened head's own mean entropy change; under query scaling it "
                         "is softmax(alpha*s) of the unscaled scores (an identity check, not a "
                         "finding); under rotation or sham it is an outcome",
    "later_mean_abs_delta_entropy": "per sequence, mean over every head of the later layers of "
                                    "|mean entropy change|",
    "later_mean_delta_entropy": "per sequence, mean over every head of the later layers of the "
                                "signed mean entropy change",
    "later_heads_changed": "later heads whose document-bootstrap interval of the entropy change "
                           "excludes 0",
    "intervals": "percentile bootstrap over documents (each resampled document brings all its "
                 "sequences) of the mean over sequences; bounded quantities stay in their bounds",
}


@dataclass(frozen=True)
class Effects:
    """Per-sequence outcomes of one intervention at one grid value (inputs of `effect_row`)."""

    delta_loss: Tensor  # [batch]
    kl: Tensor  # [batch]
    own_delta_entropy: Tensor  # [batch]
    later_delta_entropy: Tensor  # [batch, later layer, head] (may have 0 layers)


def sweep_effects(sweep, layer: int, head: int) -> list[Effects]:
    """`Effects` of every grid value of a `sweep.ExactSweep` whose layers start at `layer`."""
    i = sweep.scaled.index(layer)
    d = sweep.scaled.entropy.double() - sweep.unscaled.entropy.double()[None]  # [grid, b, L, H]
    return [Effects(sweep.delta_loss[k].double(), sweep.kl[k].double(), d[k, :, i, head],
                    d[k, :, i + 1 :]) for k in range(len(sweep.alphas))]


def effect_row(effects: Effects, documents=None, *, ci: float = 0.95, n_boot: int = 2000,
               seed: int = 0) -> dict:
    """One row of the effects table: every outcome with its document-bootstrap interval."""
    row: dict = {}

    def put(name, values):
        mean, low, high = document_bootstrap(values, documents, ci=ci, n_boot=n_boot, seed=seed)
        row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"] = float(mean), float(low), float(high)

    put("delta_loss", effects.delta_loss)
    put("kl_unscaled_scaled", effects.kl)
    put("own_delta_entropy", effects.own_delta_entropy)
    later = effects.later_delta_entropy
    n_later = int(later[0].numel()) if later.ndim == 3 else 0
    if n_later:
        flat = later.reshape(later.shape[0], -1)
        put("later_mean_abs_delta_entropy", flat.abs().mean(1))
        put("later_mean_delta_entropy", flat.mean(1))
        _, lo, hi = document_bootstrap(flat, documents, ci=ci, n_boot=n_boot, seed=seed)
        row["later_heads_changed"] = int(((lo > 0) | (hi < 0)).sum())
    else:
        for name in ("later_mean_abs_delta_entropy", "later_mean_delta_entropy"):
            row[name] = row[f"{name}_ci_low"] = row[f"{name}_ci_high"] = float("nan")
        row["later_heads_changed"] = 0
    row["n_later_heads"] = n_later
    n = int(effects.delta_loss.shape[0])
    row["n_sequences"] = n
    row["n_documents"] = n if documents is None else int(len(np.unique(np.asarray(documents))))
    return row

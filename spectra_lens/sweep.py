"""Query-scale sweeps: every head's attention metrics as a function of α, fast or exact.

Scaling the effective query of one head by α turns its logits s into α·s wherever the logits are
bilinear in q and k (`AttentionLayout.q_bilinear`), so its pattern becomes

    p(α) = softmax(α·s)  (= p^α / Σ p^α, `metrics.rescale_pattern`).

That is the **fast path** (`fast_sweep`): one unscaled forward pass, capture hooks on
`hook_attn_scores` (where `layout.scores_faithful`; else log `hook_pattern`, which is s up to a
per-row constant) and `hook_pattern`, and, inside each hook, the metrics of softmax(α·s) for
every head and every α of the grid, reduced to per-sequence means at once. Memory stays
O(α · batch · layer · head) for the results plus one α-chunk of patterns while a hook runs.
softmax(α·s) keeps the order of s, so each row's keys are sorted once (for the top-90% count)
and shared by every α; query rows are processed in blocks that hold only their visible keys.

Where the logits are not bilinear (soft-capping, ALiBi, scaling undone by a norm) the fast path
is refused and the **exact mode** runs: the real forward pass with `hooks.QueryScale` and the α
grid batched (`hooks.repeat_for_alphas`: copy i of the batch runs with α_i). `sweep_heads` picks
per layer and records the choice (`method` = "fast" | "exact", `reason` from `layout.q_reason`).

`exact_sweep` applies one intervention (`QueryScale`, `KeyScale`, `LogitScale`: any frozen
dataclass with an `alpha` field) at every α of the grid in real forward passes and measures what
follows from it: the metrics of every head (so the scaled head's own metrics and the change of
every later head), the next-token loss and KL(p_α ‖ p_1) of the output distribution;
`query_sweeps` does that with `QueryScale` for a list of (layer, head). In real passes the
metrics of the pattern itself are computed by the same hook code (`pattern_metrics`); they equal
`hooks.MetricCapture`'s per-token metrics averaged over positions (tested), at a fraction of
the cost (no norms, one sort per visible block).

All head metrics are per-sequence means over query positions ≥ `min_position` (position 0 sees
only itself). Sequences, not tokens, are the independent units for intervals (`t_interval`).
k_eff definitions: `metrics.K_EFF_DEFINITIONS`.
"""

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from scipy import stats as sps
from torch import Tensor

from spectra_lens import metrics as M
from spectra_lens.errors import SpectraError
from spectra_lens.hooks import QueryScale, attached, check_tokens, repeat_for_alphas
from spectra_lens.models import AttentionLayout, attention_layout, hook_name

__all__ = [
    "SWEEP_METRICS",
    "ExactSweep",
    "HeadMetrics",
    "HeadSweep",
    "alpha_metrics",
    "analytic_gain",
    "check_alphas",
    "exact_head_sweep",
    "exact_sweep",
    "fast_sweep",
    "pattern_metrics",
    "query_sweeps",
    "sweep_heads",
    "t_interval",
]

log = logging.getLogger(__name__)

SWEEP_METRICS: tuple[str, ...] = ("entropy", "max_attn", "k_eff_exp", "k_eff_pr", "k_eff_top90")

# Floats held by one α-chunk of patterns while a fast-path hook runs (a few temporaries of this
# size exist at once): 2**24 floats = 64 MiB each.
_CHUNK_ELEMENTS = 2**24


# --------------------------------------------------------------------------- validation


def check_alphas(alphas: object) -> tuple[float, ...]:
    """The α grid (any iterable of numbers or a 1-D tensor), sorted ascending: finite, > 0,
    distinct, at least one value; SpectraError otherwise."""
    if isinstance(alphas, (int, float)):
        raise SpectraError(f"alphas must be a sequence of numbers, got the single number {alphas!r}")
    try:
        values = [float(a) for a in (alphas.tolist() if isinstance(alphas, Tensor) else alphas)]
    except (TypeError, ValueError) as e:
        raise SpectraError(f"alphas must be a sequence of numbers, got {alphas!r}") from e
    if not values:
        raise SpectraError("alphas must hold at least one value, got an empty grid")
    bad = [a for a in values if not (math.isfinite(a) and a > 0)]
    if bad:
        raise SpectraError(f"every alpha must be finite and > 0 (we scale by α and fit on ln α), got {bad}")
    if len(set(values)) != len(values):
        dup = sorted({a for a in values if values.count(a) > 1})
        raise SpectraError(f"alphas must be distinct, got duplicates {dup}")
    return tuple(sorted(values))


def _check_layers(layout: AttentionLayout, layers: Iterable[int] | None) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(layout.n_layers))
    out = tuple(layers)
    if not out:
        raise SpectraError("layers must name at least one layer, got none")
    for l in out:
        layout.check_head(l, 0)
    if len(set(out)) != len(out):
        raise SpectraError(f"layers must be distinct, got {list(out)}")
    return tuple(sorted(out))


def _check_min_position(min_position: int, n_pos: int) -> None:
    if not isinstance(min_position, int) or isinstance(min_position, bool) or min_position < 0:
        raise SpectraError(f"min_position must be an int >= 0, got {min_position!r}")
    if min_position >= n_pos:
        raise SpectraError(
            f"min_position ({min_position}) must be < the sequence length ({n_pos}): no query "
            f"positions would be left to average"
        )


def _check_positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpectraError(f"{name} must be a positive int, got {value!r}")
    return value


def _device(model) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, repr=False)
class HeadMetrics:
    """Per-sequence means of head metrics over query positions ≥ min_position.

    Every metric field has shape `[*lead, batch, layer, head]` (lead = `[alpha]` for a sweep, none
    for an unscaled pass); `layers[i]` is the model layer at index i of the layer axis.
    """

    layers: tuple[int, ...]
    entropy: Float[Tensor, "*lead batch layer head"]
    max_attn: Float[Tensor, "*lead batch layer head"]
    k_eff_exp: Float[Tensor, "*lead batch layer head"]
    k_eff_pr: Float[Tensor, "*lead batch layer head"]
    k_eff_top90: Float[Tensor, "*lead batch layer head"]

    def metric(self, name: str) -> Tensor:
        if name not in SWEEP_METRICS:
            raise SpectraError(f"unknown metric {name!r}; expected one of {SWEEP_METRICS}")
        return getattr(self, name)

    def index(self, layer: int) -> int:
        """Position of model layer `layer` on the layer axis."""
        if layer not in self.layers:
            raise SpectraError(f"layer {layer} was not measured; measured layers: {list(self.layers)}")
        return self.layers.index(layer)

    def head(self, layer: int, head: int) -> dict[str, Tensor]:
        """{metric: [*lead, batch]} of one model (layer, head)."""
        i = self.index(layer)
        n_heads = self.entropy.shape[-1]
        if not 0 <= head < n_heads:
            raise SpectraError(f"head must be in [0, {n_heads}), got {head}")
        return {n: getattr(self, n)[..., i, head] for n in SWEEP_METRICS}

    def __repr__(self) -> str:
        return f"HeadMetrics(shape={tuple(self.entropy.shape)}, layers={list(self.layers)}, metrics={list(SWEEP_METRICS)})"


def _stack_metrics(layers: tuple[int, ...], per_layer: dict[int, dict[str, Tensor]], dim: int) -> HeadMetrics:
    return HeadMetrics(
        layers=layers,
        **{n: torch.stack([per_layer[l][n] for l in layers], dim=dim) for n in SWEEP_METRICS},
    )


def t_interval(
    values: Tensor | np.ndarray, *, ci: float = 0.95, axis: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mean ± t_{n−1, (1+ci)/2} · sd / √n over `axis` (the sequences): (mean, low, high).

    With n < 2 the interval is NaN. Sequences are the independent units; tokens of one sequence
    are not, so per-token values must be averaged per sequence first.
    """
    if not 0 < ci < 1:
        raise SpectraError(f"ci must lie strictly between 0 and 1, got {ci!r}")
    x = values.detach().cpu().double().numpy() if isinstance(values, Tensor) else np.asarray(values, float)
    n = x.shape[axis]
    mean = x.mean(axis=axis)
    if n < 2:
        nan = np.full_like(mean, np.nan)
        return mean, nan, nan.copy()
    half = sps.t.ppf((1 + ci) / 2, n - 1) * x.std(axis=axis, ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


@dataclass(frozen=True, repr=False)
class HeadSweep:
    """Each head's own metrics at every α of the grid, when only that head's query is scaled.

    `metrics` fields are `[alpha, batch, layer, head]`; `local_gain` is the analytic
    dH/d ln α at α = 1, −Var_p(s), per-sequence mean `[batch, layer, head]`. `method[i]` says how
    layer `metrics.layers[i]` was measured ("fast": softmax(α·s) from one unscaled pass; "exact":
    real forward passes with QueryScale) and `reason[i]` why the fast path was not used.
    """

    alphas: tuple[float, ...]
    metrics: HeadMetrics
    local_gain: Float[Tensor, "batch layer head"]
    method: tuple[str, ...]
    reason: tuple[str | None, ...]
    min_position: int

    @property
    def layers(self) -> tuple[int, ...]:
        return self.metrics.layers

    def summary(self, *, ci: float = 0.95) -> pd.DataFrame:
        """One row per (layer, head, scale): `mean_{metric}` with `mean_{metric}_ci_low/high`
        over sequences (t-interval), `n_sequences`, `method`, `reason`."""
        n_alpha, n_batch, n_layer, n_head = self.metrics.entropy.shape
        grid = np.meshgrid(np.arange(n_alpha), np.arange(n_layer), np.arange(n_head), indexing="ij")
        a_i, l_i, h_i = (g.reshape(-1) for g in grid)
        cols: dict[str, object] = {
            "layer": np.asarray(self.layers)[l_i],
            "head": h_i,
            "scale": np.asarray(self.alphas)[a_i],
        }
        for name in SWEEP_METRICS:
            mean, low, high = t_interval(self.metrics.metric(name), ci=ci, axis=1)
            cols[f"mean_{name}"] = mean[a_i, l_i, h_i]
            cols[f"mean_{name}_ci_low"] = low[a_i, l_i, h_i]
            cols[f"mean_{name}_ci_high"] = high[a_i, l_i, h_i]
        cols["n_sequences"] = n_batch
        cols["method"] = np.asarray(self.method, dtype=object)[l_i]
        cols["reason"] = np.asarray([r or "" for r in self.reason], dtype=object)[l_i]
        return pd.DataFrame(cols).sort_values(["layer", "head", "scale"], ignore_index=True)

    def __repr__(self) -> str:
        n_fast = sum(m == "fast" for m in self.method)
        return (f"HeadSweep(alpha×batch×layer×head={tuple(self.metrics.entropy.shape)}, "
                f"alphas={self.alphas[0]:g}..{self.alphas[-1]:g}, layers fast/exact="
                f"{n_fast}/{len(self.method) - n_fast})")


@dataclass(frozen=True, repr=False)
class ExactSweep:
    """One intervention at every α, in real forward passes, and everything that follows from it.

    `scaled` fields are `[alpha, batch, layer, head]`, `unscaled` the same heads without the
    intervention `[batch, layer, head]`. `loss` / `base_loss`: mean next-token NLL per sequence
    (nats); `kl`: mean over positions of KL(p_α ‖ p_1) of the next-token distribution.
    `patterns[(l, h)]` `[alpha, batch, query_pos, key_pos]` and `base_patterns[(l, h)]` for the
    heads asked for. `local_gain`: −Var_p(s) of the unscaled pass, per-sequence means.
    """

    alphas: tuple[float, ...]
    intervention: str
    scaled: HeadMetrics
    unscaled: HeadMetrics
    loss: Float[Tensor, "alpha batch"]
    base_loss: Float[Tensor, " batch"]
    kl: Float[Tensor, "alpha batch"]
    local_gain: Float[Tensor, "batch layer head"]
    min_position: int
    patterns: dict = field(default_factory=dict)
    base_patterns: dict = field(default_factory=dict)

    @property
    def delta_loss(self) -> Float[Tensor, "alpha batch"]:
        return self.loss - self.base_loss[None]

    def head_frame(self, layer: int, head: int, *, ci: float = 0.95) -> pd.DataFrame:
        """One row per α for head (layer, head): its metrics and the output effects, with
        t-intervals over sequences.

        Columns: `scale`, `layer`, `head`, `mean_{entropy,max_attn,k_eff}` (k_eff = exp(H)) with
        `_ci_low/_ci_high`, `k_eff_pr`, `k_eff_top90`, `delta_entropy` (paired, vs unscaled)
        with interval, `delta_loss`, `kl_from_unscaled` with intervals, `n_sequences`.
        """
        m = self.scaled.head(layer, head)
        base = self.unscaled.head(layer, head)
        cols: dict[str, object] = {"scale": list(self.alphas), "layer": layer, "head": head}

        def put(name, values):
            mean, low, high = t_interval(values, ci=ci, axis=1)
            cols[name], cols[f"{name}_ci_low"], cols[f"{name}_ci_high"] = mean, low, high

        put("mean_entropy", m["entropy"])
        put("mean_max_attn", m["max_attn"])
        put("mean_k_eff", m["k_eff_exp"])
        cols["k_eff_pr"] = m["k_eff_pr"].double().mean(1).numpy()
        cols["k_eff_top90"] = m["k_eff_top90"].double().mean(1).numpy()
        put("delta_entropy", m["entropy"] - base["entropy"][None])
        put("delta_loss", self.delta_loss)
        put("kl_from_unscaled", self.kl)
        cols["n_sequences"] = self.loss.shape[1]
        return pd.DataFrame(cols)

    def downstream_frame(self, *, ci: float = 0.95, min_layer: int | None = None) -> pd.DataFrame:
        """Long table: one row per (α, layer, head) of every measured head in layers ≥
        `min_layer`: `entropy`, `delta_entropy` (paired, with interval), `delta_max_attn`."""
        layers = [l for l in self.scaled.layers if min_layer is None or l >= min_layer]
        if not layers:
            raise SpectraError(f"no measured layer is >= {min_layer}; measured: {list(self.scaled.layers)}")
        idx = [self.scaled.index(l) for l in layers]
        ent = self.scaled.entropy[:, :, idx]
        d_ent = ent - self.unscaled.entropy[None][:, :, idx]
        d_max = self.scaled.max_attn[:, :, idx] - self.unscaled.max_attn[None][:, :, idx]
        n_alpha, n_batch, n_layer, n_head = ent.shape
        grid = np.meshgrid(np.arange(n_alpha), np.arange(n_layer), np.arange(n_head), indexing="ij")
        a_i, l_i, h_i = (g.reshape(-1) for g in grid)
        mean_d, low_d, high_d = t_interval(d_ent, ci=ci, axis=1)
        return pd.DataFrame({
            "scale": np.asarray(self.alphas)[a_i],
            "layer": np.asarray(layers)[l_i],
            "head": h_i,
            "entropy": ent.double().mean(1).numpy()[a_i, l_i, h_i],
            "delta_entropy": mean_d[a_i, l_i, h_i],
            "delta_entropy_ci_low": low_d[a_i, l_i, h_i],
            "delta_entropy_ci_high": high_d[a_i, l_i, h_i],
            "delta_max_attn": d_max.double().mean(1).numpy()[a_i, l_i, h_i],
            "n_sequences": n_batch,
        })

    def __repr__(self) -> str:
        return (f"ExactSweep({self.intervention}, alpha×batch={tuple(self.loss.shape)}, "
                f"layers={self.scaled.layers[0]}..{self.scaled.layers[-1]}, "
                f"patterns=[{', '.join(f'L{l}H{h}' for l, h in self.patterns)}])")


# --------------------------------------------------------------------------- metrics in hooks

# Query rows per block: a block only needs the keys up to its last visible one, which under a
# causal mask roughly halves the work on patterns (and on the sort for k_eff_top90).
_QUERY_BLOCK = 16


def _sorted_row_metrics(p: Tensor, logp: Tensor | None) -> dict[str, Tensor]:
    """Per-row metrics of rows sorted in descending order (masked keys last, p = 0).

    With `logp` None, H = −Σ xlogy(p, p); else H = −Σ p·logp over entries with p > 0.
    k_eff_top90 follows `metrics.k_eff_top_mass` (mass 0.9, the same 1e-6 tolerance); the sort
    it needs is shared by every α because softmax(α·s) preserves the order of s for α > 0.
    """
    if logp is None:
        H = -torch.special.xlogy(p, p).sum(-1)
    else:
        H = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
    cum = p.cumsum(-1)
    top = ((cum < (0.9 - 1e-6)).sum(-1) + 1).clamp_max(p.shape[-1]).to(torch.float32)
    return {
        "entropy": H,
        "max_attn": p[..., 0],
        "k_eff_exp": torch.exp(H),
        "k_eff_pr": 1.0 / (p * p).sum(-1),
        "k_eff_top90": top,
    }


def _query_blocks(visible: Tensor) -> list[tuple[slice, int]]:
    """(query slice, number of leading keys that hold every visible key of those rows)."""
    n_q, n_k = visible.shape[-2:]
    flat = visible.reshape(-1, n_q, n_k).any(0)  # [query, key]
    out = []
    for q0 in range(0, n_q, _QUERY_BLOCK):
        rows = slice(q0, min(q0 + _QUERY_BLOCK, n_q))
        keys = flat[rows].any(0).nonzero()
        out.append((rows, int(keys.max()) + 1 if keys.numel() else 1))
    return out


def alpha_metrics(
    scores: Float[Tensor, "*batch query_pos key_pos"],
    visible: Bool[Tensor, "*batch query_pos key_pos"],
    alphas: Sequence[float],
    *,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> dict[str, Float[Tensor, " alpha *batch"]]:
    """Mean over query rows of each metric of p(α) = softmax(α·s) over the visible keys.

    `scores` may be shifted by any per-row constant (log p works). Keys are sorted once per row
    (softmax(α·s) keeps the order of s); the α grid runs in chunks of at most `chunk_elements`
    pattern entries. Every query row must see at least one key.
    """
    alphas = check_alphas(alphas)
    a_all = torch.tensor(alphas, dtype=torch.float32, device=scores.device)
    n_q = scores.shape[-2]
    sums = {n: scores.new_zeros((len(alphas), *scores.shape[:-2]), dtype=torch.float32)
            for n in SWEEP_METRICS}
    for rows, n_keys in _query_blocks(visible):
        z = scores[..., rows, :n_keys].float().masked_fill(~visible[..., rows, :n_keys], float("-inf"))
        z = z.sort(dim=-1, descending=True).values
        step = max(1, chunk_elements // max(1, z.numel()))
        for i in range(0, len(alphas), step):
            a = a_all[i : i + step].view(-1, *([1] * z.ndim))
            logp = torch.log_softmax(a * z, dim=-1)
            for n, v in _sorted_row_metrics(logp.exp(), logp).items():
                sums[n][i : i + step] += v.sum(-1)
            del logp
    return {n: v / n_q for n, v in sums.items()}


def pattern_metrics(
    pattern: Float[Tensor, "*batch query_pos key_pos"],
    visible: Bool[Tensor, "*batch query_pos key_pos"] | None = None,
) -> dict[str, Float[Tensor, "*batch"]]:
    """Mean over query rows of each metric of the pattern itself (`metrics` definitions)."""
    p = pattern.float()
    visible = p > 0 if visible is None else visible
    n_q = p.shape[-2]
    sums = {n: p.new_zeros(p.shape[:-2]) for n in SWEEP_METRICS}
    for rows, n_keys in _query_blocks(visible):
        ps = p[..., rows, :n_keys].sort(dim=-1, descending=True).values
        for n, v in _sorted_row_metrics(ps, None).items():
            sums[n] += v.sum(-1)
    return {n: v / n_q for n, v in sums.items()}


class _SweepCapture:
    """Hooks on hook_attn_scores / hook_pattern computing per-sequence means inside the pass.

    For layers in `layers`: with `alphas` the metrics of softmax(α·s) at every α (the fast path,
    `[alpha, batch, head]`), without them the metrics of the pattern itself (`[batch, head]`:
    a real, possibly scaled pass). For `gain_layers`: −Var_p(s) `[batch, head]`. Full patterns
    `[batch, query_pos, key_pos]` for the (layer, head) pairs in `patterns_for`.
    """

    def __init__(self, layout, *, layers=(), alphas=None, gain_layers=(), patterns_for=(),
                 min_position=1, chunk_elements=_CHUNK_ELEMENTS):
        self.layout = layout
        self.alphas = alphas
        self.layers = tuple(layers)
        self.gain_layers = tuple(gain_layers)
        self.patterns_for = tuple(patterns_for)
        self.min_position = min_position
        self.chunk_elements = chunk_elements
        self.metrics: dict[int, dict[str, Tensor]] = {}
        self.gain: dict[int, Tensor] = {}
        self.patterns: dict[tuple[int, int], Tensor] = {}
        self._scores: dict[int, Tensor] = {}

    def all_layers(self) -> list[int]:
        return sorted(set(self.layers) | set(self.gain_layers) | {l for l, _ in self.patterns_for})

    def hooks(self, layout=None):
        out = []
        for l in self.all_layers():
            if self.layout.scores_faithful:
                out.append((hook_name(l, "attn_scores"), self._scores_hook(l)))
            out.append((hook_name(l, "pattern"), self._pattern_hook(l)))
        return out

    def _scores_hook(self, l):
        def fn(s, hook):
            self._scores[l] = s.detach()

        return fn

    def _pattern_hook(self, l):
        name, n_heads = hook_name(l, "pattern"), self.layout.n_heads

        def fn(p, hook):
            if p.ndim != 4 or p.shape[1] != n_heads:
                raise SpectraError(
                    f"{name}: expected [batch, head={n_heads}, query_pos, key_pos], got {tuple(p.shape)}"
                )
            _check_min_position(self.min_position, p.shape[-2])
            p = p.detach()
            for ll, h in self.patterns_for:
                if ll == l:
                    self.patterns[(l, h)] = p[:, h].float().cpu()
            q0 = self.min_position
            p = p.float()[..., q0:, :]
            s = self._scores.pop(l, None)
            if s is not None:
                s = s.float()[..., q0:, :]
                visible = M.visible_from_scores(s)
            else:  # scores not faithful: log p is s up to a per-row constant
                visible = p > 0
                s = M.logits_from_pattern(p)
            if l in self.gain_layers:
                self.gain[l] = M.local_gain_under(p, s, visible).mean(-1).cpu()
            if l in self.layers:
                if self.alphas is None:
                    got = pattern_metrics(p, visible)
                else:
                    got = alpha_metrics(s, visible, self.alphas, chunk_elements=self.chunk_elements)
                self.metrics[l] = {n: v.cpu() for n, v in got.items()}

        return fn

    def run(self, model, tokens: Tensor, *, interventions=(), layout=None, logits: bool = False):
        """One forward pass (no grad) with `interventions` before the capture; logits if asked,
        else the pass stops after the last captured layer."""
        layout = layout or self.layout
        last = max(self.all_layers())
        stop = None if logits or last + 1 >= layout.n_layers else last + 1
        with torch.no_grad(), attached(model, *interventions, self, layout=layout):
            return model(tokens, return_type="logits" if logits else None, stop_at_layer=stop)


# --------------------------------------------------------------------------- progress


class _Bar:
    """A tqdm bar when enabled, else nothing."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False)

    def step(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _batches(tokens: Tensor, batch_size: int | None) -> list[Tensor]:
    size = tokens.shape[0] if batch_size is None else _check_positive_int("batch_size", batch_size)
    return list(tokens.split(size))


# --------------------------------------------------------------------------- the fast path


def _fast_and_gain(model, layout, tokens, alphas, *, sweep_layers, gain_layers, min_position,
                   batch_size, chunk_elements, progress):
    """({layer: {metric: [alpha, batch, head]}}, {layer: gain [batch, head]}) from unscaled passes."""
    device = _device(model)
    metrics: dict[int, dict[str, list[Tensor]]] = {l: {n: [] for n in SWEEP_METRICS} for l in sweep_layers}
    gain: dict[int, list[Tensor]] = {l: [] for l in gain_layers}
    batches = _batches(tokens, batch_size)
    bar = _Bar(len(batches), progress, "fast sweep")
    for batch in batches:
        cap = _SweepCapture(layout, layers=sweep_layers, alphas=alphas, gain_layers=gain_layers,
                            min_position=min_position, chunk_elements=chunk_elements)
        cap.run(model, batch.to(device))
        for l in sweep_layers:
            for n in SWEEP_METRICS:
                metrics[l][n].append(cap.metrics[l][n])
        for l in gain_layers:
            gain[l].append(cap.gain[l])
        bar.step()
    bar.close()
    return (
        {l: {n: torch.cat(v, dim=1) for n, v in d.items()} for l, d in metrics.items()},
        {l: torch.cat(v, dim=0) for l, v in gain.items()},
    )


def fast_sweep(
    model,
    tokens: Int[Tensor, "batch pos"],
    alphas: Sequence[float],
    *,
    layers: Iterable[int] | None = None,
    min_position: int = 1,
    batch_size: int | None = None,
    chunk_elements: int = _CHUNK_ELEMENTS,
    progress: bool = False,
) -> HeadSweep:
    """Every head of `layers` at every α via p(α) = softmax(α·s), from unscaled forward passes.

    Refuses (SpectraError) a layer whose logits are not bilinear in the query
    (`layout.q_bilinear`), where softmax(α·s) is not what query scaling does; `sweep_heads`
    falls back to the exact mode there.
    """
    tokens = check_tokens(tokens)
    alphas = check_alphas(alphas)
    layout = attention_layout(model)
    layers = _check_layers(layout, layers)
    _check_min_position(min_position, tokens.shape[1])
    refused = [l for l in layers if not layout.fast_path_ok(l)]
    if refused:
        raise SpectraError(
            f"the fast path softmax(α·s) does not hold in layers {refused}: "
            f"{layout.q_reason[refused[0]]}; use sweep_heads() or exact_head_sweep() there"
        )
    metrics, gain = _fast_and_gain(
        model, layout, tokens, alphas, sweep_layers=layers, gain_layers=layers,
        min_position=min_position, batch_size=batch_size, chunk_elements=chunk_elements,
        progress=progress,
    )
    return HeadSweep(
        alphas=alphas,
        metrics=_stack_metrics(layers, metrics, dim=2),
        local_gain=torch.stack([gain[l] for l in layers], dim=1),
        method=("fast",) * len(layers),
        reason=(None,) * len(layers),
        min_position=min_position,
    )


# --------------------------------------------------------------------------- exact mode


def _plan(n_batch: int, n_alpha: int, max_rows: int) -> tuple[int, int]:
    """(sequences per block, alphas per chunk) so that one forward holds <= max_rows rows."""
    _check_positive_int("max_rows", max_rows)
    seq_block = min(n_batch, max_rows)
    return seq_block, max(1, min(n_alpha, max_rows // seq_block))


def _exact_layers(model, layout, tokens, alphas, *, layers, min_position, max_rows, progress):
    """{layer: {metric: [alpha, batch, head]}}: all heads of a layer scaled at once, per layer.

    Scaling head h's query changes only head h's logits in its own layer, so one pass per layer
    (and α chunk), stopped after that layer, measures every head of it.
    """
    device = _device(model)
    n_alpha, n_heads = len(alphas), layout.n_heads
    seq_block, chunk = _plan(tokens.shape[0], n_alpha, max_rows)
    starts = range(0, tokens.shape[0], seq_block)
    alpha_chunks = [alphas[i : i + chunk] for i in range(0, n_alpha, chunk)]
    bar = _Bar(len(layers) * len(starts) * len(alpha_chunks), progress, "exact sweep")
    out: dict[int, dict[str, Tensor]] = {}
    for l in layers:
        per_block = []
        for s in starts:
            block = tokens[s : s + seq_block].to(device)
            per_chunk = []
            for a in alpha_chunks:
                rows, row_alpha = repeat_for_alphas(block, a)
                cap = _SweepCapture(layout, layers=[l], min_position=min_position)
                cap.run(model, rows, interventions=[QueryScale(l, h, row_alpha) for h in range(n_heads)])
                per_chunk.append({n: v.view(len(a), block.shape[0], n_heads) for n, v in cap.metrics[l].items()})
                bar.step()
            per_block.append({n: torch.cat([c[n] for c in per_chunk], dim=0) for n in SWEEP_METRICS})
        out[l] = {n: torch.cat([b[n] for b in per_block], dim=1) for n in SWEEP_METRICS}
    bar.close()
    return out


def exact_head_sweep(
    model,
    tokens: Int[Tensor, "batch pos"],
    alphas: Sequence[float],
    *,
    layers: Iterable[int] | None = None,
    min_position: int = 1,
    max_rows: int = 32,
    progress: bool = False,
) -> HeadSweep:
    """Every head of `layers` at every α, each measured in real forward passes with QueryScale.

    Valid in every layer (soft-capping, ALiBi, ...); costs ⌈α·batch / max_rows⌉ forward passes
    per layer, each stopped after that layer.
    """
    tokens = check_tokens(tokens)
    alphas = check_alphas(alphas)
    layout = attention_layout(model)
    layers = _check_layers(layout, layers)
    _check_min_position(min_position, tokens.shape[1])
    metrics = _exact_layers(model, layout, tokens, alphas, layers=layers,
                            min_position=min_position, max_rows=max_rows, progress=progress)
    gain = analytic_gain(model, tokens, layers=layers, min_position=min_position, batch_size=max_rows)
    return HeadSweep(
        alphas=alphas,
        metrics=_stack_metrics(layers, metrics, dim=2),
        local_gain=gain,
        method=("exact",) * len(layers),
        reason=tuple(layout.q_reason[l] or "exact mode requested" for l in layers),
        min_position=min_position,
    )


def sweep_heads(
    model,
    tokens: Int[Tensor, "batch pos"],
    alphas: Sequence[float],
    *,
    layers: Iterable[int] | None = None,
    min_position: int = 1,
    batch_size: int | None = None,
    max_rows: int = 32,
    chunk_elements: int = _CHUNK_ELEMENTS,
    progress: bool = False,
) -> HeadSweep:
    """Every head at every α: the fast path where the layer is bilinear in q, exact elsewhere.

    `method` / `reason` of the result say which layer got which and why.
    """
    tokens = check_tokens(tokens)
    alphas = check_alphas(alphas)
    layout = attention_layout(model)
    layers = _check_layers(layout, layers)
    _check_min_position(min_position, tokens.shape[1])
    fast = [l for l in layers if layout.fast_path_ok(l)]
    exact = [l for l in layers if not layout.fast_path_ok(l)]
    if exact:
        log.info("fast path refused in layers %s (%s); using the exact mode there",
                 exact, layout.q_reason[exact[0]])
    metrics, gain = _fast_and_gain(
        model, layout, tokens, alphas, sweep_layers=fast, gain_layers=layers,
        min_position=min_position, batch_size=batch_size, chunk_elements=chunk_elements,
        progress=progress,
    )
    if exact:
        metrics |= _exact_layers(model, layout, tokens, alphas, layers=exact,
                                 min_position=min_position, max_rows=max_rows, progress=progress)
    return HeadSweep(
        alphas=alphas,
        metrics=_stack_metrics(layers, metrics, dim=2),
        local_gain=torch.stack([gain[l] for l in layers], dim=1),
        method=tuple("fast" if layout.fast_path_ok(l) else "exact" for l in layers),
        reason=tuple(None if layout.fast_path_ok(l) else layout.q_reason[l] for l in layers),
        min_position=min_position,
    )


def analytic_gain(
    model,
    tokens: Int[Tensor, "batch pos"],
    *,
    layers: Iterable[int] | None = None,
    min_position: int = 1,
    batch_size: int | None = None,
) -> Float[Tensor, "batch layer head"]:
    """dH/d ln α at α = 1 = −Var_p(s), per-sequence mean over positions ≥ min_position.

    One unscaled forward pass (stopped after the last layer asked for). It is the local gain
    under query scaling only where the layer is bilinear in q (`layout.q_bilinear`); elsewhere it
    is the gain under a temperature on the final logits (`hooks.LogitScale`).
    """
    tokens = check_tokens(tokens)
    layout = attention_layout(model)
    layers = _check_layers(layout, layers)
    _check_min_position(min_position, tokens.shape[1])
    _, gain = _fast_and_gain(
        model, layout, tokens, (1.0,), sweep_layers=(), gain_layers=layers,
        min_position=min_position, batch_size=batch_size, chunk_elements=_CHUNK_ELEMENTS,
        progress=False,
    )
    return torch.stack([gain[l] for l in layers], dim=1)


def _describe(intervention) -> str:
    parts = [f"{f.name}={getattr(intervention, f.name)}" for f in dataclasses.fields(intervention)
             if f.name != "alpha"]
    return f"{type(intervention).__name__}({', '.join(parts)}, alpha=grid)"


def _output_effects(logits: Tensor, base_logp: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(mean next-token NLL, mean KL(p ‖ p_base)) per sequence of one block, in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1).mean(-1)
    kl = torch.nn.functional.kl_div(base_logp, logp, log_target=True, reduction="none").sum(-1).mean(-1)
    return nll, kl


def exact_sweep(
    model,
    tokens: Int[Tensor, "batch pos"],
    alphas: Sequence[float],
    intervention,
    *,
    layers: Iterable[int] | None = None,
    patterns_for: Iterable[tuple[int, int]] = (),
    min_position: int = 1,
    max_rows: int = 32,
    progress: bool = False,
) -> ExactSweep:
    """`intervention` at every α in real forward passes: metrics of every head of `layers`,
    next-token loss and KL(p_α ‖ p_1).

    `intervention` is a scaling dataclass with an `alpha` field (QueryScale, KeyScale,
    LogitScale); its alpha is replaced by the grid. α values are batched (copy j of the batch
    runs with α_j) in chunks of at most `max_rows` rows, so the logits held at once are
    `max_rows × pos × vocab` floats, and the KL and loss are computed one batch block at a time.
    An α of exactly 1 reuses the unscaled pass.
    """
    tokens = check_tokens(tokens)
    alphas = check_alphas(alphas)
    layout = attention_layout(model)
    layers = _check_layers(layout, layers)
    _check_min_position(min_position, tokens.shape[1])
    if not (dataclasses.is_dataclass(intervention) and not isinstance(intervention, type)
            and any(f.name == "alpha" for f in dataclasses.fields(intervention))):
        raise SpectraError(
            f"intervention must be a scaling dataclass with an `alpha` field (QueryScale, "
            f"KeyScale, LogitScale), got {intervention!r}"
        )
    intervention.hooks(layout)  # validates its layer / head against this model now
    patterns_for = tuple((int(l), int(h)) for l, h in patterns_for)
    for l, h in patterns_for:
        layout.check_head(l, h)
    device = _device(model)
    n_batch = tokens.shape[0]
    n_alpha = len(alphas)
    seq_block, chunk = _plan(n_batch, n_alpha, max_rows)
    todo = [i for i in range(n_alpha) if alphas[i] != 1.0]
    chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    starts = list(range(0, n_batch, seq_block))
    bar = _Bar(len(starts) * (1 + len(chunks)), progress, "exact sweep")

    def capture():
        return _SweepCapture(layout, layers=layers, gain_layers=layers, patterns_for=patterns_for,
                             min_position=min_position)

    blocks = []  # per sequence block: (unscaled metrics, gain, base nll, {α index: results})
    for s in starts:
        block = tokens[s : s + seq_block].to(device)
        b = block.shape[0]
        cap = capture()
        base_logp = torch.log_softmax(cap.run(model, block, logits=True).float(), dim=-1)
        base_nll = -base_logp[:, :-1].gather(-1, block[:, 1:, None]).squeeze(-1).mean(-1).cpu()
        base = (cap.metrics, cap.gain, base_nll, cap.patterns)
        bar.step()
        got: dict[int, tuple] = {
            i: (cap.metrics, base_nll, torch.zeros(b), cap.patterns) for i in range(n_alpha) if alphas[i] == 1.0
        }
        for idx in chunks:
            rows, row_alpha = repeat_for_alphas(block, [alphas[i] for i in idx])
            cap_a = capture()
            scaled = dataclasses.replace(intervention, alpha=row_alpha)
            logits = cap_a.run(model, rows, interventions=[scaled], logits=True)
            for j, i in enumerate(idx):
                sl = slice(j * b, (j + 1) * b)
                nll, kl = _output_effects(logits[sl], base_logp, block)
                got[i] = ({l: {n: v[sl] for n, v in d.items()} for l, d in cap_a.metrics.items()},
                          nll.cpu(), kl.cpu(), {k: v[sl] for k, v in cap_a.patterns.items()})
            del logits
            bar.step()
        blocks.append((base, got))
        del base_logp
    bar.close()

    def per_layer(pick):  # {layer: {metric: [batch, head]}} for one α (or the unscaled pass)
        return {l: {n: torch.cat([pick(bl)[l][n] for bl in blocks], dim=0) for n in SWEEP_METRICS}
                for l in layers}

    scaled_layers = [per_layer(lambda bl, i=i: bl[1][i][0]) for i in range(n_alpha)]
    return ExactSweep(
        alphas=alphas,
        intervention=_describe(intervention),
        scaled=HeadMetrics(layers=layers, **{
            n: torch.stack([torch.stack([d[l][n] for l in layers], dim=1) for d in scaled_layers])
            for n in SWEEP_METRICS}),
        unscaled=_stack_metrics(layers, per_layer(lambda bl: bl[0][0]), dim=1),
        loss=torch.stack([torch.cat([bl[1][i][1] for bl in blocks]) for i in range(n_alpha)]),
        base_loss=torch.cat([bl[0][2] for bl in blocks]),
        kl=torch.stack([torch.cat([bl[1][i][2] for bl in blocks]) for i in range(n_alpha)]),
        local_gain=torch.stack([torch.cat([bl[0][1][l] for bl in blocks]) for l in layers], dim=1),
        min_position=min_position,
        patterns={k: torch.stack([torch.cat([bl[1][i][3][k] for bl in blocks]) for i in range(n_alpha)])
                  for k in patterns_for},
        base_patterns={k: torch.cat([bl[0][3][k] for bl in blocks]) for k in patterns_for},
    )


def query_sweeps(
    model,
    tokens: Int[Tensor, "batch pos"],
    alphas: Sequence[float],
    heads: Iterable[tuple[int, int]],
    *,
    downstream: bool = True,
    min_position: int = 1,
    max_rows: int = 32,
    progress: bool = False,
) -> dict[tuple[int, int], ExactSweep]:
    """`exact_sweep` with `QueryScale` for each (layer, head) in `heads`, one head at a time.

    Each sweep measures the scaled head's layer and, with `downstream`, every later layer; the
    head's own metrics are `result[(l, h)].head_frame(l, h)`.
    """
    layout = attention_layout(model)
    out: dict[tuple[int, int], ExactSweep] = {}
    for layer, head in heads:
        layout.check_head(layer, head)
        layers = range(layer, layout.n_layers) if downstream else [layer]
        out[(layer, head)] = exact_sweep(
            model, tokens, alphas, QueryScale(layer, head, 1.0), layers=layers,
            patterns_for=[(layer, head)], min_position=min_position, max_rows=max_rows,
            progress=progress,
        )
    if not out:
        raise SpectraError("heads must name at least one (layer, head), got none")
    return out

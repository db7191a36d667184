"""Query-scale sweeps, as two questions and the analytic gain.

**Each head's own α-curve** (`head_curves`): every head's attention metrics when only that
head's query is scaled by α. Scaling the effective query of one head by α turns its logits s into
α·s wherever the logits are bilinear in q and k (`AttentionLayout.q_bilinear`), so its pattern
becomes

    p(α) = softmax(α·s)  (= p^α / Σ p^α, `metrics.rescale_pattern`).

That is the fast path: one unscaled forward pass, capture hooks (`hooks.SweepCapture`) on
`hook_attn_scores` (where `layout.scores_faithful`; else log `hook_pattern`, which is s up to a
per-row constant) and `hook_pattern`, and, inside each hook, the metrics of softmax(α·s) for
every head and every α of the grid (`metrics.alpha_metrics`), reduced to per-sequence means at
once. Where the logits are not bilinear (soft-capping, ALiBi, scaling undone by a norm) the
exact mode runs: the real forward pass with `hooks.QueryScale` and the α grid batched
(`hooks.repeat_for_alphas`). `method="auto"` picks per layer and records the choice (`method`
= "fast" | "exact", `reason` from `layout.q_reason`); "fast" and "exact" force one mode.
A head's own curve follows from the mathematics (dH/d ln α = −α² Var_p(s) ≤ 0): it checks the
hooks and measures the gain's size, it is not evidence that the model uses query norm.

**One intervention's consequences** (`intervention_effects`): one intervention (`QueryScale`,
`KeyScale`, `LogitScale`: any frozen dataclass with an `alpha` field) at every α of the grid in
real forward passes, and what follows from it: the metrics of every head (the scaled head's own
and every later head's), the next-token loss and KL(p_1 ‖ p_α) (unscaled ‖ scaled) of the output distribution.
`paired_intervention_effects` runs several interventions in step, one forward pass of each at a
time, and hands each pass's attention patterns to a reducer instead of keeping them.

**The analytic gain** (`analytic_gain`): dH/d ln α at α = 1 = −Var_p(s), from one pass.

All head metrics are per-sequence means over query positions ≥ `min_position` (position 0 sees
only itself); `stats.t_interval` gives intervals over sequences. k_eff definitions:
`metrics.K_EFF_DEFINITIONS`.
"""

import dataclasses
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from spectra_lens import metrics as M
from spectra_lens.capture import (
    QueryScale,
    SweepCapture,
    repeat_for_alphas,
    tokens_and_mask,
)
from spectra_lens.errors import SpectraError
from spectra_lens.layout import AttentionLayout, attention_layout
from spectra_lens.present.display import html_card, progress_bar
from spectra_lens.stats.inference import t_interval
from spectra_lens.validate import (
    check_alphas,
    check_int,
    check_min_position,
    check_tokens,
)

__all__ = [
    "ExactSweep",
    "HeadMetrics",
    "HeadSweep",
    "analytic_gain",
    "head_curves",
    "PassPatterns",
    "intervention_effects",
    "paired_intervention_effects",
]

log = logging.getLogger(__name__)

SWEEP_FORMAT = "spectra_lens.head_sweep"  # HeadSweep.save / load


def _read_sweep(path, *, arrays: bool = True) -> tuple[dict, dict]:
    """(header, {name: array}) of a HeadSweep file; SpectraError when it is not one."""
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            data = {k: z[k] for k in z.files if k != "header"} if arrays else {}
    except Exception as e:  # numpy / zipfile / json raise many types for a damaged file
        raise SpectraError(f"sweep file {path} is unreadable ({e}); delete it and rerun to redo it") from e
    if not isinstance(header, dict) or header.get("format") != SWEEP_FORMAT or header.get("version", 0) > 1:
        raise SpectraError(f"{path} is not a {SWEEP_FORMAT} file of version 1")
    missing = [n for n in (*M.SWEEP_METRICS, "local_gain") if arrays and n not in data]
    if missing:
        raise SpectraError(f"sweep file {path} lacks {missing}; delete it and rerun to redo it")
    return header, data




# --------------------------------------------------------------------------- validation


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
        if name not in M.SWEEP_METRICS:
            raise SpectraError(f"unknown metric {name!r}; expected one of {M.SWEEP_METRICS}")
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
        return {n: getattr(self, n)[..., i, head] for n in M.SWEEP_METRICS}

    def __repr__(self) -> str:
        return f"HeadMetrics(shape={tuple(self.entropy.shape)}, layers={list(self.layers)}, metrics={list(M.SWEEP_METRICS)})"

    def _repr_html_(self) -> str:
        means = {f"mean {n}": float(getattr(self, n).double().nanmean()) for n in M.SWEEP_METRICS}
        return html_card("HeadMetrics", {"shape (…, batch, layer, head)": tuple(self.entropy.shape),
                                         "layers": self.layers, **means})


def _stack_metrics(layers: tuple[int, ...], per_layer: dict[int, dict[str, Tensor]], dim: int) -> HeadMetrics:
    return HeadMetrics(
        layers=layers,
        **{n: torch.stack([per_layer[l][n] for l in layers], dim=dim) for n in M.SWEEP_METRICS},
    )


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
        for name in M.SWEEP_METRICS:
            mean, low, high = t_interval(self.metrics.metric(name), ci=ci, axis=1)
            cols[f"mean_{name}"] = mean[a_i, l_i, h_i]
            cols[f"mean_{name}_ci_low"] = low[a_i, l_i, h_i]
            cols[f"mean_{name}_ci_high"] = high[a_i, l_i, h_i]
        cols["n_sequences"] = n_batch
        cols["method"] = np.asarray(self.method, dtype=object)[l_i]
        cols["reason"] = np.asarray([r or "" for r in self.reason], dtype=object)[l_i]
        return pd.DataFrame(cols).sort_values(["layer", "head", "scale"], ignore_index=True)

    @classmethod
    def concat(cls, parts: Sequence["HeadSweep"]) -> "HeadSweep":
        """The sweeps of consecutive blocks of sequences as one sweep (sequence axis joined in
        order). Every metric is a per-sequence mean, so a sweep measured in parts equals the
        sweep of all sequences measured with the same forward batches. The parts must share
        alphas, layers, methods and min_position."""
        parts = list(parts)
        if not parts:
            raise SpectraError("HeadSweep.concat needs at least one sweep")
        first = parts[0]
        key = (first.alphas, first.layers, first.method, first.reason, first.min_position)
        for p in parts[1:]:
            if (p.alphas, p.layers, p.method, p.reason, p.min_position) != key:
                raise SpectraError(
                    "the sweeps to join differ in alphas, layers, methods or min_position: "
                    f"{key[:3]} vs {(p.alphas, p.layers, p.method)}")
        return cls(
            alphas=first.alphas,
            metrics=HeadMetrics(layers=first.layers, **{
                n: torch.cat([p.metrics.metric(n) for p in parts], dim=1) for n in M.SWEEP_METRICS}),
            local_gain=torch.cat([p.local_gain for p in parts], dim=0),
            method=first.method, reason=first.reason, min_position=first.min_position,
        )

    def save(self, path, *, meta: dict | None = None) -> None:
        """One `.npz` file, written atomically: the metric tensors as stored (no rounding), and
        a JSON header (format `spectra_lens.head_sweep` v1, alphas, layers, method, reason,
        min_position, `meta`)."""
        from spectra_lens.io import atomic_write_bytes, npz_bytes

        header = {"format": SWEEP_FORMAT, "version": 1, "alphas": list(self.alphas),
                  "layers": list(self.layers), "method": list(self.method),
                  "reason": list(self.reason), "min_position": self.min_position, "meta": meta or {}}
        arrays = {n: self.metrics.metric(n).detach().cpu().numpy() for n in M.SWEEP_METRICS}
        atomic_write_bytes(path, npz_bytes(header=np.array(json.dumps(header)),
                                           local_gain=self.local_gain.detach().cpu().numpy(), **arrays))

    @classmethod
    def load(cls, path) -> "HeadSweep":
        """A sweep written by `save` (its header's `meta`: `HeadSweep.read_meta`)."""
        header, arrays = _read_sweep(path)
        return cls(
            alphas=tuple(header["alphas"]),
            metrics=HeadMetrics(layers=tuple(header["layers"]),
                                **{n: torch.from_numpy(arrays[n]) for n in M.SWEEP_METRICS}),
            local_gain=torch.from_numpy(arrays["local_gain"]),
            method=tuple(header["method"]), reason=tuple(header["reason"]),
            min_position=int(header["min_position"]),
        )

    @staticmethod
    def read_meta(path) -> dict:
        """The `meta` a sweep file was saved with (SpectraError when it is unreadable)."""
        return _read_sweep(path, arrays=False)[0].get("meta") or {}

    def __repr__(self) -> str:
        n_fast = sum(m == "fast" for m in self.method)
        return (f"HeadSweep(alpha×batch×layer×head={tuple(self.metrics.entropy.shape)}, "
                f"alphas={self.alphas[0]:g}..{self.alphas[-1]:g}, layers fast/exact="
                f"{n_fast}/{len(self.method) - n_fast})")

    def _repr_html_(self) -> str:
        s = self.summary()
        at = s[np.isclose(s["scale"], self.alphas[-1])].nsmallest(5, "mean_entropy")
        return html_card(
            "HeadSweep: each head's own α-curve",
            {"alpha × batch × layer × head": tuple(self.metrics.entropy.shape),
             "alphas": self.alphas, "min_position": self.min_position,
             "layers (fast / exact)": f"{self.method.count('fast')} / {self.method.count('exact')}",
             "mean analytic gain −Var_p(s)": float(self.local_gain.double().mean())},
            {f"sharpest heads at α = {self.alphas[-1]:g}":
             at[["layer", "head", "scale", "mean_entropy", "mean_max_attn", "method"]]},
        )


@dataclass(frozen=True, repr=False)
class ExactSweep:
    """One intervention at every α, in real forward passes, and everything that follows from it.

    `scaled` fields are `[alpha, batch, layer, head]`, `unscaled` the same heads without the
    intervention `[batch, layer, head]`. `loss` / `base_loss`: mean next-token NLL per sequence
    (nats); `kl`: mean over positions of KL(p_1 ‖ p_α) of the next-token distribution, p_1
    without the intervention, p_α with it (unscaled ‖ scaled; ≥ 0).
    `patterns[(l, h)]` `[alpha, batch, query_pos, key_pos]` and `base_patterns[(l, h)]` for the
    heads asked for (empty from `paired_intervention_effects`, which reduces them pass by pass). `local_gain`: −Var_p(s) of the unscaled pass, per-sequence means.
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

    def head_frame(self, layer: int, head: int, *, ci: float = 0.95, documents=None,
                   n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
        """One row per α for head (layer, head): its metrics and the output effects, with
        percentile intervals that resample documents (`causal.document_bootstrap`; `documents`
        one id per sequence, None: every sequence its own unit), so bounded metrics keep their
        bounds (entropy ≥ 0, max attention in [0, 1], KL ≥ 0).

        Columns: `scale`, `layer`, `head`, `mean_{entropy,max_attn,k_eff}` (k_eff = exp(H)) with
        `_ci_low/_ci_high`, `k_eff_pr`, `k_eff_top90`, `delta_entropy` (paired, vs unscaled)
        with interval, `delta_loss`, `kl_from_unscaled` with intervals, `n_sequences`.
        """
        m = self.scaled.head(layer, head)
        base = self.unscaled.head(layer, head)
        cols: dict[str, object] = {"scale": list(self.alphas), "layer": layer, "head": head}

        def put(name, values):
            mean, low, high = _interval(values, documents, ci=ci, n_boot=n_boot, seed=seed)
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

    def downstream_frame(self, *, ci: float = 0.95, min_layer: int | None = None, documents=None,
                         n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
        """Long table: one row per (α, layer, head) of every measured head in layers ≥
        `min_layer`: `entropy`, `delta_entropy` (paired, with a document-bootstrap interval as
        in `head_frame`), `delta_max_attn`."""
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
        mean_d, low_d, high_d = _interval(d_ent, documents, ci=ci, n_boot=n_boot, seed=seed)
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

    def _repr_html_(self) -> str:
        effects = pd.DataFrame({
            "scale": self.alphas,
            "delta_loss": self.delta_loss.double().mean(1).numpy(),
            "kl_from_unscaled": self.kl.double().mean(1).numpy(),
        })
        return html_card(
            f"ExactSweep: {self.intervention}",
            {"alpha × batch": tuple(self.loss.shape), "measured layers": self.scaled.layers,
             "min_position": self.min_position,
             "unscaled loss (nats)": float(self.base_loss.double().mean()),
             "patterns": ", ".join(f"L{l}H{h}" for l, h in self.patterns) or "none"},
            {"output effects per α (means over sequences)": effects}, max_rows=len(self.alphas),
        )


def _batches(tokens: Tensor, batch_size: int | None, mask: Tensor | None = None
             ) -> list[tuple[Tensor, Tensor | None]]:
    """(tokens, mask or None) per batch of at most `batch_size` sequences."""
    size = tokens.shape[0] if batch_size is None else check_int("batch_size", batch_size)
    masks = [None] * -(-tokens.shape[0] // size) if mask is None else list(mask.split(size))
    return list(zip(tokens.split(size), masks))


# --------------------------------------------------------------------------- the fast path


def _fast_and_gain(model, layout, tokens, alphas, *, sweep_layers, gain_layers, min_position,
                   batch_size, chunk_elements, progress, mask=None):
    """({layer: {metric: [alpha, batch, head]}}, {layer: gain [batch, head]}) from unscaled passes."""
    device = _device(model)
    metrics: dict[int, dict[str, list[Tensor]]] = {l: {n: [] for n in M.SWEEP_METRICS} for l in sweep_layers}
    gain: dict[int, list[Tensor]] = {l: [] for l in gain_layers}
    batches = _batches(tokens, batch_size, mask)
    bar = progress_bar(total=len(batches), desc="α-curves (fast path)", unit="batch", enabled=progress)
    for batch, batch_mask in batches:
        cap = SweepCapture(layout, layers=sweep_layers, alphas=alphas, gain_layers=gain_layers,
                            min_position=min_position, chunk_elements=chunk_elements,
                            attention_mask=batch_mask)
        cap.run(model, batch.to(device))
        for l in sweep_layers:
            for n in M.SWEEP_METRICS:
                metrics[l][n].append(cap.metrics[l][n])
        for l in gain_layers:
            gain[l].append(cap.gain[l])
        bar.update(1)
    bar.close()
    return (
        {l: {n: torch.cat(v, dim=1) for n, v in d.items()} for l, d in metrics.items()},
        {l: torch.cat(v, dim=0) for l, v in gain.items()},
    )


def _fast_curves(
    model,
    tokens: Int[Tensor, "batch pos"],
    alphas: Sequence[float],
    *,
    layers: Iterable[int] | None = None,
    min_position: int = 1,
    batch_size: int | None = None,
    chunk_elements: int = M.ALPHA_CHUNK_ELEMENTS,
    progress: bool = False,
    attention_mask: Tensor | None = None,
) -> HeadSweep:
    """Every head of `layers` at every α via p(α) = softmax(α·s), from unscaled forward passes.

    Refuses (SpectraError) a layer whose logits are not bilinear in the query
    (`layout.q_bilinear`), where softmax(α·s) is not what query scaling does; `head_curves`
    falls back to the exact mode there.
    """
    tokens = check_tokens(tokens)
    alphas = check_alphas(alphas)
    layout = attention_layout(model)
    layers = _check_layers(layout, layers)
    check_min_position(min_position, tokens.shape[1])
    refused = [l for l in layers if not layout.fast_path_ok(l)]
    if refused:
        raise SpectraError(
            f"the fast path softmax(α·s) does not hold in layers {refused}: "
            f"{layout.q_reason[refused[0]]}; use head_curves(method='auto') or method='exact' there"
        )
    metrics, gain = _fast_and_gain(
        model, layout, tokens, alphas, sweep_layers=layers, gain_layers=layers,
        min_position=min_position, batch_size=batch_size, chunk_elements=chunk_elements,
        progress=progress, mask=attention_mask,
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
    check_int("max_rows", max_rows)
    seq_block = min(n_batch, max_rows)
    return seq_block, max(1, min(n_alpha, max_rows // seq_block))


def _exact_layers(model, layout, tokens, alphas, *, layers, min_position, max_rows, progress,
                  mask=None):
    """{layer: {metric: [alpha, batch, head]}}: all heads of a layer scaled at once, per layer.

    Scaling head h's query changes only head h's logits in its own layer, so one pass per layer
    (and α chunk), stopped after that layer, measures every head of it.
    """
    device = _device(model)
    n_alpha, n_heads = len(alphas), layout.n_heads
    seq_block, chunk = _plan(tokens.shape[0], n_alpha, max_rows)
    starts = range(0, tokens.shape[0], seq_block)
    alpha_chunks = [alphas[i : i + chunk] for i in range(0, n_alpha, chunk)]
    bar = progress_bar(total=len(layers) * len(starts) * len(alpha_chunks), unit="pass",
                       desc="α-curves (exact)", enabled=progress)
    out: dict[int, dict[str, Tensor]] = {}
    for l in layers:
        per_block = []
        for s in starts:
            block = tokens[s : s + seq_block].to(device)
            block_mask = None if mask is None else mask[s : s + seq_block]
            per_chunk = []
            for a in alpha_chunks:
                rows, row_alpha = repeat_for_alphas(block, a)
                cap = SweepCapture(layout, layers=[l], min_position=min_position,
                                   attention_mask=None if mask is None else block_mask.repeat(len(a), 1))
                cap.run(model, rows, interventions=[QueryScale(l, h, row_alpha) for h in range(n_heads)])
                per_chunk.append({n: v.view(len(a), block.shape[0], n_heads) for n, v in cap.metrics[l].items()})
                bar.update(1)
            per_block.append({n: torch.cat([c[n] for c in per_chunk], dim=0) for n in M.SWEEP_METRICS})
        out[l] = {n: torch.cat([b[n] for b in per_block], dim=1) for n in M.SWEEP_METRICS}
    bar.close()
    return out


def _exact_curves(
    model,
    tokens: Int[Tensor, "batch pos"],
    alphas: Sequence[float],
    *,
    layers: Iterable[int] | None = None,
    min_position: int = 1,
    max_rows: int = 32,
    progress: bool = False,
    attention_mask: Tensor | None = None,
) -> HeadSweep:
    """Every head of `layers` at every α, each measured in real forward passes with QueryScale.

    Valid in every layer (soft-capping, ALiBi, ...); costs ⌈α·batch / max_rows⌉ forward passes
    per layer, each stopped after that layer.
    """
    tokens = check_tokens(tokens)
    alphas = check_alphas(alphas)
    layout = attention_layout(model)
    layers = _check_layers(layout, layers)
    check_min_position(min_position, tokens.shape[1])
    metrics = _exact_layers(model, layout, tokens, alphas, layers=layers,
                            min_position=min_position, max_rows=max_rows, progress=progress,
                            mask=attention_mask)
    gain = analytic_gain(model, tokens, layers=layers, min_position=min_position, batch_size=max_rows,
                         attention_mask=attention_mask)
    return HeadSweep(
        alphas=alphas,
        metrics=_stack_metrics(layers, metrics, dim=2),
        local_gain=gain,
        method=("exact",) * len(layers),
        reason=tuple(layout.q_reason[l] or "exact mode requested" for l in layers),
        min_position=min_position,
    )


def head_curves(
    model,
    tokens: Int[Tensor, "batch pos"] | str | list[str],
    alphas: Sequence[float],
    *,
    method: str = "auto",
    layers: Iterable[int] | None = None,
    min_position: int = 1,
    batch_size: int | None = None,
    max_rows: int = 32,
    chunk_elements: int = M.ALPHA_CHUNK_ELEMENTS,
    progress: bool = False,
    attention_mask: Tensor | None = None,
    pad_id: int | None = None,
) -> HeadSweep:
    """Each head's own metrics at every α of the grid, when only that head's query is scaled.

    `method`: "auto" (the fast path softmax(α·s) in layers whose logits are bilinear in q, the
    exact forward pass elsewhere), "fast" (refuses non-bilinear layers) or "exact" (real forward
    passes with `QueryScale` in every layer; ⌈α·batch / max_rows⌉ passes per layer). `batch_size`
    bounds the sequences per fast-path pass, `max_rows` the rows per exact pass. The result's
    `method` / `reason` say which layer got which and why.

    Padded batches: `attention_mask` (1 = real token) or `pad_id` (see
    `hooks.attention_mask_for`); padding is left out of every mean. Texts are tokenized with the
    model's padding and their mask.
    """
    tokens, mask = tokens_and_mask(model, tokens, attention_mask=attention_mask, pad_id=pad_id)
    if method == "auto":
        return _auto_curves(model, tokens, alphas, layers=layers, min_position=min_position,
                            batch_size=batch_size, max_rows=max_rows,
                            chunk_elements=chunk_elements, progress=progress, attention_mask=mask)
    if method == "fast":
        return _fast_curves(model, tokens, alphas, layers=layers, min_position=min_position,
                            batch_size=batch_size, chunk_elements=chunk_elements,
                            progress=progress, attention_mask=mask)
    if method == "exact":
        return _exact_curves(model, tokens, alphas, layers=layers, min_position=min_position,
                             max_rows=max_rows, progress=progress, attention_mask=mask)
    raise SpectraError(f"method must be 'auto', 'fast' or 'exact', got {method!r}")


def _auto_curves(
    model,
    tokens: Int[Tensor, "batch pos"],
    alphas: Sequence[float],
    *,
    layers: Iterable[int] | None = None,
    min_position: int = 1,
    batch_size: int | None = None,
    max_rows: int = 32,
    chunk_elements: int = M.ALPHA_CHUNK_ELEMENTS,
    progress: bool = False,
    attention_mask: Tensor | None = None,
) -> HeadSweep:
    """Every head at every α: the fast path where the layer is bilinear in q, exact elsewhere.

    `method` / `reason` of the result say which layer got which and why.
    """
    tokens = check_tokens(tokens)
    alphas = check_alphas(alphas)
    layout = attention_layout(model)
    layers = _check_layers(layout, layers)
    check_min_position(min_position, tokens.shape[1])
    fast = [l for l in layers if layout.fast_path_ok(l)]
    exact = [l for l in layers if not layout.fast_path_ok(l)]
    if exact:
        log.info("fast path refused in layers %s (%s); using the exact mode there",
                 exact, layout.q_reason[exact[0]])
    metrics, gain = _fast_and_gain(
        model, layout, tokens, alphas, sweep_layers=fast, gain_layers=layers,
        min_position=min_position, batch_size=batch_size, chunk_elements=chunk_elements,
        progress=progress, mask=attention_mask,
    )
    if exact:
        metrics |= _exact_layers(model, layout, tokens, alphas, layers=exact,
                                 min_position=min_position, max_rows=max_rows, progress=progress,
                                 mask=attention_mask)
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
    tokens: Int[Tensor, "batch pos"] | str | list[str],
    *,
    layers: Iterable[int] | None = None,
    min_position: int = 1,
    batch_size: int | None = None,
    attention_mask: Tensor | None = None,
    pad_id: int | None = None,
) -> Float[Tensor, "batch layer head"]:
    """dH/d ln α at α = 1 = −Var_p(s), per-sequence mean over positions ≥ min_position
    (real tokens only, with `attention_mask` or `pad_id`; see `hooks.attention_mask_for`).

    One unscaled forward pass (stopped after the last layer asked for). It is the local gain
    under query scaling only where the layer is bilinear in q (`layout.q_bilinear`); elsewhere it
    is the gain under a temperature on the final logits (`hooks.LogitScale`). `tokens`: ids or
    text (`hooks.tokens_and_mask`).
    """
    tokens, mask = tokens_and_mask(model, tokens, attention_mask=attention_mask, pad_id=pad_id)
    layout = attention_layout(model)
    layers = _check_layers(layout, layers)
    check_min_position(min_position, tokens.shape[1])
    _, gain = _fast_and_gain(
        model, layout, tokens, (1.0,), sweep_layers=(), gain_layers=layers,
        min_position=min_position, batch_size=batch_size, chunk_elements=M.ALPHA_CHUNK_ELEMENTS,
        progress=False, mask=mask,
    )
    return torch.stack([gain[l] for l in layers], dim=1)


def _label(intervention) -> str:
    """Short name of an intervention for a progress bar: "QueryScale L12 H0", "KeyScale L12 KV1"."""
    where = [f"{tag}{getattr(intervention, k)}" for k, tag in (("layer", "L"), ("head", "H"), ("kv_head", "KV"))
             if getattr(intervention, k, None) is not None]
    return " ".join([type(intervention).__name__, *where])


def _describe(intervention) -> str:
    grid_field = getattr(type(intervention), "grid_field", "alpha")
    parts = [f"{f.name}={getattr(intervention, f.name)}" for f in dataclasses.fields(intervention)
             if f.name != grid_field]
    return f"{type(intervention).__name__}({', '.join(parts)}, {grid_field}=grid)"


def _interval(values, documents, *, ci, n_boot, seed):
    """Document-bootstrap (mean, low, high) over the sequence axis 1 of `[grid, batch, ...]`."""
    from spectra_lens.causal import document_bootstrap

    x = values.detach().cpu().double().numpy() if isinstance(values, Tensor) else np.asarray(values, float)
    mean, low, high = document_bootstrap(np.moveaxis(x, 1, 0), documents, ci=ci, n_boot=n_boot, seed=seed)
    return mean, low, high


def _output_effects(logits: Tensor, base_logp: Tensor, tokens: Tensor, mask: Tensor | None = None
                    ) -> tuple[Tensor, Tensor]:
    """(mean next-token NLL, mean KL(p_base ‖ p)) per sequence of one block, in float32; with
    `mask`, over real positions only (the NLL over real tokens predicted from real tokens)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    # kl_div(input, target) = Σ target · (log target − input): KL(p_base ‖ p), unscaled ‖ scaled
    kl = torch.nn.functional.kl_div(logp, base_logp, log_target=True, reduction="none").sum(-1)
    return _next_token_nll(logp, tokens, mask), _masked_mean(kl, mask)


def _next_token_nll(logp: Tensor, tokens: Tensor, mask: Tensor | None) -> Tensor:
    nll = -logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return _masked_mean(nll, None if mask is None else mask[:, :-1] & mask[:, 1:])


def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the last axis; over the True entries of `mask` when given."""
    if mask is None:
        return x.mean(-1)
    m = mask.to(x.device)
    return torch.where(m, x, 0.0).sum(-1) / m.sum(-1).clamp_min(1)


@dataclass(frozen=True, repr=False)
class PassPatterns:
    """The patterns of one forward pass of an exact sweep (`paired_intervention_effects`).

    `start`: the index of the block's first sequence; `base`: `{(l, h): [batch, query_pos,
    key_pos]}` of the block's unscaled pass; `scaled`: `{α index: {(l, h): [batch, query_pos,
    key_pos]}}` of the α values this pass ran (a grid value equal to the intervention's identity
    is the unscaled pass: its entry is `base`). Over one sweep every (block, α index) comes once.
    """

    start: int
    base: dict
    scaled: dict

    def __repr__(self) -> str:
        return f"PassPatterns(start={self.start}, alphas={sorted(self.scaled)}, heads={sorted(self.base)})"


def intervention_effects(
    model,
    tokens: Int[Tensor, "batch pos"] | str | list[str],
    alphas: Sequence[float],
    intervention,
    *,
    layers: Iterable[int] | None = None,
    patterns_for: Iterable[tuple[int, int]] = (),
    min_position: int = 1,
    max_rows: int = 32,
    progress: bool = False,
    attention_mask: Tensor | None = None,
    pad_id: int | None = None,
) -> ExactSweep:
    """`intervention` at every α in real forward passes: metrics of every head of `layers`,
    next-token loss and KL(p_1 ‖ p_α) (unscaled ‖ scaled). Padding (`attention_mask` or
    `pad_id`, see `hooks.attention_mask_for`) is left out of every mean.

    `intervention` is a scaling dataclass with an `alpha` field (QueryScale, KeyScale,
    LogitScale); its alpha is replaced by the grid. α values are batched (copy j of the batch
    runs with α_j) in chunks of at most `max_rows` rows, so the logits held at once are
    `max_rows × pos × vocab` floats, and the KL and loss are computed one batch block at a time.
    A grid value equal to the intervention's identity (α = 1; angle 0 for QueryRotate) reuses
    the unscaled pass (`causal.sham_check` runs the hook at α = 1 for real).
    The full patterns of the heads in `patterns_for` are kept (`ExactSweep.patterns`,
    `[alpha, batch, query_pos, key_pos]` each); `paired_intervention_effects` reduces them pass
    by pass instead.
    """
    passes = _intervention_passes(
        model, tokens, alphas, intervention, layers=layers, patterns_for=patterns_for,
        min_position=min_position, max_rows=max_rows, progress=progress,
        attention_mask=attention_mask, pad_id=pad_id, keep_patterns=True)
    while True:
        try:
            next(passes)
        except StopIteration as done:
            return done.value


def paired_intervention_effects(
    model,
    tokens: Int[Tensor, "batch pos"] | str | list[str],
    alphas: Sequence[float],
    interventions: dict,
    on_patterns,
    *,
    layers: Iterable[int] | None = None,
    patterns_for: Iterable[tuple[int, int]] = (),
    min_position: int = 1,
    max_rows: int = 32,
    progress: bool = False,
    attention_mask: Tensor | None = None,
    pad_id: int | None = None,
) -> dict[str, ExactSweep]:
    """`intervention_effects` of each of `interventions` (`{name: intervention}`) on the same
    tokens and α grid, run pass by pass in step: after the i-th forward pass of every
    intervention, `on_patterns({name: PassPatterns})` sees the patterns of `patterns_for` from
    that pass of each, side by side (same block of sequences, same α values), and they are then
    dropped. Memory holds one pass's patterns per intervention (`max_rows` sequence copies) and
    the current block's unscaled ones, never a sweep's `[alpha, batch, query_pos, key_pos]`.
    Returns `{name: ExactSweep}` with the same metrics, losses and KL as `intervention_effects`
    and no patterns.
    """
    if not interventions:
        raise SpectraError("paired_intervention_effects needs at least one intervention, got none")
    runs = {name: _intervention_passes(
        model, tokens, alphas, iv, layers=layers, patterns_for=patterns_for,
        min_position=min_position, max_rows=max_rows, progress=progress,
        attention_mask=attention_mask, pad_id=pad_id, keep_patterns=False)
        for name, iv in interventions.items()}
    sweeps: dict[str, ExactSweep] = {}
    while not sweeps:
        step: dict[str, PassPatterns] = {}
        for name, run in runs.items():
            try:
                step[name] = next(run)
            except StopIteration as done:
                sweeps[name] = done.value
        if step and sweeps:  # every run has the same plan (tokens, grid, max_rows): they end together
            raise SpectraError(f"paired sweeps fell out of step: {sorted(sweeps)} ended before {sorted(step)}")
        if step:
            first = next(iter(step.values()))
            for name, got in step.items():
                if (got.start, sorted(got.scaled)) != (first.start, sorted(first.scaled)):
                    raise SpectraError(f"paired sweeps fell out of step: {name} ran {got!r}, others {first!r}")
            on_patterns(step)
        del step  # this pass's patterns go before the next pass runs
    return sweeps


def _intervention_passes(model, tokens, alphas, intervention, *, layers, patterns_for, min_position,
                         max_rows, progress, attention_mask, pad_id, keep_patterns):
    """The exact sweep of `intervention_effects` as a generator: yields a `PassPatterns` after
    every forward pass and returns the `ExactSweep` (with patterns only when `keep_patterns`)."""
    tokens, mask = tokens_and_mask(model, tokens, attention_mask=attention_mask, pad_id=pad_id)
    alphas = check_alphas(alphas)
    layout = attention_layout(model)
    layers = _check_layers(layout, layers)
    check_min_position(min_position, tokens.shape[1])
    grid_field = getattr(type(intervention), "grid_field", "alpha")
    identity = getattr(type(intervention), "identity", 1.0)
    if not (dataclasses.is_dataclass(intervention) and not isinstance(intervention, type)
            and any(f.name == grid_field for f in dataclasses.fields(intervention))):
        raise SpectraError(
            f"intervention must be a scaling dataclass with an `alpha` field (QueryScale, "
            f"KeyScale, LogitScale) or another grid field (QueryRotate: angle), got {intervention!r}"
        )
    intervention.hooks(layout)  # validates its layer / head against this model now
    patterns_for = tuple((int(l), int(h)) for l, h in patterns_for)
    for l, h in patterns_for:
        layout.check_head(l, h)
    device = _device(model)
    n_batch = tokens.shape[0]
    n_alpha = len(alphas)
    seq_block, chunk = _plan(n_batch, n_alpha, max_rows)
    todo = [i for i in range(n_alpha) if alphas[i] != identity]
    chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    starts = list(range(0, n_batch, seq_block))
    bar = progress_bar(total=len(starts) * (1 + len(chunks)), unit="pass", enabled=progress,
                       desc=f"{_label(intervention)} at {n_alpha} α")

    def capture(m):
        return SweepCapture(layout, layers=layers, gain_layers=layers, patterns_for=patterns_for,
                            min_position=min_position, attention_mask=m)

    blocks = []  # per sequence block: (unscaled metrics, gain, base nll, {α index: results})
    for s in starts:
        block = tokens[s : s + seq_block].to(device)
        block_mask = None if mask is None else mask[s : s + seq_block].to(device)
        b = block.shape[0]
        cap = capture(block_mask)
        base_logp = torch.log_softmax(cap.run(model, block, logits=True).float(), dim=-1)
        base_nll = _next_token_nll(base_logp, block, block_mask).cpu()
        kept = cap.patterns if keep_patterns else None
        base = (cap.metrics, cap.gain, base_nll, kept)
        bar.update(1)
        same = [i for i in range(n_alpha) if alphas[i] == identity]
        got: dict[int, tuple] = {i: (cap.metrics, base_nll, torch.zeros(b), kept) for i in same}
        yield PassPatterns(start=s, base=cap.patterns, scaled={i: cap.patterns for i in same})
        for idx in chunks:
            rows, row_alpha = repeat_for_alphas(block, [alphas[i] for i in idx])
            cap_a = capture(None if block_mask is None else block_mask.repeat(len(idx), 1))
            scaled = dataclasses.replace(intervention, **{grid_field: row_alpha})
            logits = cap_a.run(model, rows, interventions=[scaled], logits=True)
            pats = {}
            for j, i in enumerate(idx):
                sl = slice(j * b, (j + 1) * b)
                nll, kl = _output_effects(logits[sl], base_logp, block, block_mask)
                pats[i] = {k: v[sl] for k, v in cap_a.patterns.items()}
                got[i] = ({l: {n: v[sl] for n, v in d.items()} for l, d in cap_a.metrics.items()},
                          nll.cpu(), kl.cpu(), pats[i] if keep_patterns else None)
            del logits
            bar.update(1)
            yield PassPatterns(start=s, base=cap.patterns, scaled=pats)
            del pats, cap_a  # this pass's patterns are not held while the next one runs
        blocks.append((base, got))
        del base_logp
    bar.close()

    def per_layer(pick):  # {layer: {metric: [batch, head]}} for one α (or the unscaled pass)
        return {l: {n: torch.cat([pick(bl)[l][n] for bl in blocks], dim=0) for n in M.SWEEP_METRICS}
                for l in layers}

    scaled_layers = [per_layer(lambda bl, i=i: bl[1][i][0]) for i in range(n_alpha)]
    return ExactSweep(
        alphas=alphas,
        intervention=_describe(intervention),
        scaled=HeadMetrics(layers=layers, **{
            n: torch.stack([torch.stack([d[l][n] for l in layers], dim=1) for d in scaled_layers])
            for n in M.SWEEP_METRICS}),
        unscaled=_stack_metrics(layers, per_layer(lambda bl: bl[0][0]), dim=1),
        loss=torch.stack([torch.cat([bl[1][i][1] for bl in blocks]) for i in range(n_alpha)]),
        base_loss=torch.cat([bl[0][2] for bl in blocks]),
        kl=torch.stack([torch.cat([bl[1][i][2] for bl in blocks]) for i in range(n_alpha)]),
        local_gain=torch.stack([torch.cat([bl[0][1][l] for bl in blocks]) for l in layers], dim=1),
        min_position=min_position,
        patterns={k: torch.stack([torch.cat([bl[1][i][3][k] for bl in blocks]) for i in range(n_alpha)])
                  for k in patterns_for} if keep_patterns else {},
        base_patterns={k: torch.cat([bl[0][3][k] for bl in blocks]) for k in patterns_for} if keep_patterns else {},
    )

"""The results of the sweeps of `spectra_lens.sweep`: per-sequence head metrics, each head's own
α-curves (`HeadSweep`, saved and loaded as one npz file) and one intervention's consequences
(`ExactSweep`, with the patterns of one forward pass in `PassPatterns`)."""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from spectra_lens import metrics as M
from spectra_lens.errors import SpectraError
from spectra_lens.present.display import html_card
from spectra_lens.stats.inference import t_interval
from spectra_lens.validate import HeadRef

__all__ = ["ExactSweep", "HeadMetrics", "HeadSweep", "PassPatterns"]

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


def _interval(values, documents, *, ci, n_boot, seed):
    """Document-bootstrap (mean, low, high) over the sequence axis 1 of `[grid, batch, ...]`."""
    from spectra_lens.causal import document_bootstrap

    x = values.detach().cpu().double().numpy() if isinstance(values, Tensor) else np.asarray(values, float)
    mean, low, high = document_bootstrap(np.moveaxis(x, 1, 0), documents, ci=ci, n_boot=n_boot, seed=seed)
    return mean, low, high


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
    heads asked for (empty where `intervention_effects` hands them to `on_patterns` pass by pass instead). `local_gain`: −Var_p(s) of the unscaled pass, per-sequence means.
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
                f"patterns=[{', '.join(f'{HeadRef(l, h)}' for l, h in self.patterns)}])")

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
             "patterns": ", ".join(str(HeadRef(l, h)) for l, h in self.patterns) or "none"},
            {"output effects per α (means over sequences)": effects}, max_rows=len(self.alphas),
        )


@dataclass(frozen=True, repr=False)
class PassPatterns:
    """The patterns of one forward pass of an exact sweep (`intervention_effects`' `on_patterns`).

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

"""Per-document sufficient statistics: the count, mean and centred second-moment matrix of the
token variables of every (document, head).

Every statistic of the package is a function of these matrices, so analysis memory is
O(documents × heads), and merging shards, runs or ranks is concatenation (`DocumentMoments.concat`).
A capture forms them from its per-token metrics (`DocumentMoments.from_metrics`); per-token
records, where a run kept them, give the same moments (`moments_from_records`).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from jaxtyping import Float, Int

from spectra_lens.errors import SpectraError
from spectra_lens.io import read_npz, write_npz

__all__ = ["MOMENT_VARIABLES", "MOMENTS_FORMAT", "MOMENTS_VERSION", "DocumentMoments",
           "counterfactual_variables", "moments_from_records"]


# Per-token variables whose per-document moments a capture stores (derived: log_q_norm = ln‖q‖,
# log_k_norm = ln‖k‖, log_position = ln(position + 1), log_dir_spread = ln of the spread of
# q̂·k/√d over visible keys; *_nosink: the metric of the pattern with the first key excluded).
MOMENT_VARIABLES: tuple[str, ...] = (
    "log_q_norm", "q_norm", "log_k_norm", "log_position", "sink_mass",
    "entropy", "entropy_norm", "max_attn", "k_eff_exp", "k_eff_pr", "k_eff_top90",
    "entropy_nosink", "max_attn_nosink", "k_eff_exp_nosink", "k_eff_pr_nosink",
    "k_eff_top90_nosink", "log_dir_spread", "local_gain",
)


def counterfactual_variables(n_positions: int, min_position: int = 1) -> tuple[str, ...]:
    """The variables of the norm counterfactual's moments (a capture with a reference norm):
    `entropy`, `entropy_cf` (H(softmax(s · r/‖q‖)), `capture.MetricCapture`), `abs_delta_h_cf`
    = |H − H_cf|, and `position_bin_{b}`, the indicator of log-position bin b = ⌊log2(t + 1)⌋
    for every bin of positions min_position … n_positions − 1 but the first (the within-bin
    variances are the residual sums of squares given these indicators)."""
    first, last = (min_position + 1).bit_length() - 1, n_positions.bit_length() - 1
    return ("entropy", "entropy_cf", "abs_delta_h_cf") + tuple(
        f"position_bin_{b}" for b in range(first + 1, last + 1))


# The container of `DocumentMoments.save` (`spectra_lens.io.write_npz`): its header names these.
MOMENTS_FORMAT = "spectra_lens.document_moments"
MOMENTS_VERSION = 1
_HEAD_KEYS = ("layer", "head")
_ARRAYS = ("documents", "layers", "heads", "n", "mean", "m2")


@dataclass(frozen=True, repr=False)
class DocumentMoments:
    """Per (document, head) count, mean and centred second-moment matrix of token variables.

    For the tokens i of document g seen by head h, with v_i the vector of `variables`:
    `n[g, h]` = #tokens, `mean[g, h]` = Σ v_i / n, `m2[g, h]` = Σ (v_i − mean)(v_i − mean)ᵀ.
    That is the second-moment matrix of (1, v) in a stable form: every correlation, partial
    correlation, regression slope, the document-cluster bootstrap and the cluster-robust test
    of a head are functions of these G matrices, so analysis memory is O(documents × heads).
    Rows that share a document id merge exactly (`concat`), so per-shard, per-run or per-rank
    moments combine by concatenation.
    """

    documents: Int[np.ndarray, " doc"]
    layers: Int[np.ndarray, " head"]
    heads: Int[np.ndarray, " head"]
    variables: tuple[str, ...]
    n: Float[np.ndarray, "doc head"]
    mean: Float[np.ndarray, "doc head var"]
    m2: Float[np.ndarray, "doc head var var"]
    meta: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"DocumentMoments(documents={self.documents.size}, heads={self.layers.size}, "
                f"tokens={int(self.n.sum())}, variables={list(self.variables)})")

    @property
    def n_documents(self) -> int:
        return int(self.documents.size)

    @classmethod
    def from_tokens(cls, values, valid, documents, *, layers, heads, variables,
                    meta=None) -> "DocumentMoments":
        """Moments of token values `[sequence, head, pos, var]` where `valid[sequence, head, pos]`.

        `documents[sequence]` is each sequence's document id; sequences of one document merge.
        """
        values = np.asarray(values, dtype=np.float64)
        valid = np.asarray(valid, dtype=bool)
        documents = np.asarray(documents, dtype=np.int64)
        if values.ndim != 4 or valid.shape != values.shape[:3] or documents.shape != values.shape[:1]:
            raise SpectraError(
                "from_tokens expects values [sequence, head, pos, var], valid [sequence, head, "
                f"pos] and documents [sequence]; got {values.shape}, {valid.shape}, "
                f"{documents.shape}")
        if values.shape[3] != len(variables):
            raise SpectraError(f"values have {values.shape[3]} variables; names given: {variables}")
        w = valid.astype(np.float64)
        n = w.sum(axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.einsum("shp,shpv->shv", w, np.where(valid[..., None], values, 0.0))
            mean = np.where(n[..., None] > 0, mean / n[..., None], 0.0)
        centred = np.where(valid[..., None], values - mean[:, :, None, :], 0.0)
        m2 = np.swapaxes(centred, -1, -2) @ centred  # Σ_p c cᵀ: batched BLAS, not einsum's loop
        ids, codes = np.unique(documents, return_inverse=True)
        n, mean, m2 = _merge_rows(n, mean, m2, codes, ids.size)
        return cls(ids, np.asarray(layers, dtype=np.int64), np.asarray(heads, dtype=np.int64),
                   tuple(variables), n, mean, m2, dict(meta or {}))

    @classmethod
    def from_metrics(cls, metrics, documents, *, min_position: int = 1,
                     variables: Sequence[str] = MOMENT_VARIABLES) -> "DocumentMoments":
        """Moments of a capture's per-token metrics (`capture.TokenMetrics`, [batch, layer, head,
        pos] tensors) at positions >= min_position; `documents[b]` is sequence b's document.

        Tokens where any variable is not finite (e.g. a skipped k_eff_top90) are left out:
        pass `variables` without such a metric to keep them.
        """
        b, n_l, n_h, n_p = metrics.entropy.shape
        if not 0 <= min_position < n_p:
            raise SpectraError(f"min_position must be in [0, {n_p}); got {min_position}")
        # one layer at a time: the float64 token values of all layers at once (and from_tokens'
        # copies of them) were most of a long run's memory (2 x 8,192 tokens x 270 heads x 18
        # variables x 8 bytes = 637 MB per copy); a head's moments depend on its tokens alone
        parts = [cls._from_layer(metrics, i, min_position, variables, documents) for i in range(n_l)]
        first = parts[0]
        return cls(first.documents, np.concatenate([p.layers for p in parts]),
                   np.concatenate([p.heads for p in parts]), first.variables,
                   np.concatenate([p.n for p in parts], axis=1),
                   np.concatenate([p.mean for p in parts], axis=1),
                   np.concatenate([p.m2 for p in parts], axis=1), first.meta)

    @classmethod
    def _from_layer(cls, metrics, i: int, min_position: int, variables: Sequence[str],
                    documents) -> "DocumentMoments":
        """`from_metrics` of the i-th captured layer."""
        def layer(t):
            return np.asarray(t[:, i : i + 1].detach().cpu(), dtype=np.float64)

        b, _, n_h, n_p = metrics.entropy.shape
        logs = {"log_q_norm": "q_norm", "log_k_norm": "k_norm", "log_dir_spread": "dir_spread"}
        cols = []
        for name in variables:
            if name == "log_position":
                pos = np.log1p(np.arange(n_p, dtype=np.float64))
                cols.append(np.broadcast_to(pos, (b, 1, n_h, n_p)))
                continue
            if name.startswith("position_bin_"):
                bins = np.array([(t + 1).bit_length() - 1 for t in range(n_p)])
                ind = (bins == int(name.removeprefix("position_bin_"))).astype(np.float64)
                cols.append(np.broadcast_to(ind, (b, 1, n_h, n_p)))
                continue
            if name == "abs_delta_h_cf":
                cols.append(np.abs(layer(metrics.entropy) - layer(metrics.entropy_cf)))
                continue
            v = layer(getattr(metrics, logs.get(name, name)))
            if name in logs:
                with np.errstate(divide="ignore", invalid="ignore"):
                    v = np.log(v)
            cols.append(v)
        values = np.stack(cols, axis=-1)[:, :, :, min_position:].reshape(
            b, n_h, n_p - min_position, len(variables))
        valid = np.isfinite(values).all(axis=-1)
        l = int(metrics.layers[i])
        return cls.from_tokens(values, valid, documents, layers=np.full(n_h, l, dtype=np.int64),
                               heads=np.arange(n_h, dtype=np.int64), variables=variables,
                               meta={"min_position": min_position})

    @classmethod
    def concat(cls, parts: Sequence["DocumentMoments"]) -> "DocumentMoments":
        """The moments of the union of the tokens: rows of one document id merge exactly."""
        parts = list(parts)
        if not parts:
            raise SpectraError("concat needs at least one DocumentMoments; got none")
        first = parts[0]
        for p in parts[1:]:
            if (p.variables != first.variables or not np.array_equal(p.layers, first.layers)
                    or not np.array_equal(p.heads, first.heads)):
                raise SpectraError(
                    "moments to merge must share variables and heads; got "
                    f"{p.variables} / {p.layers.size} heads and {first.variables} / "
                    f"{first.layers.size} heads")
        documents = np.concatenate([p.documents for p in parts])
        ids, codes = np.unique(documents, return_inverse=True)
        n, mean, m2 = _merge_rows(np.concatenate([p.n for p in parts]),
                                  np.concatenate([p.mean for p in parts]),
                                  np.concatenate([p.m2 for p in parts]), codes, ids.size)
        return cls(ids, first.layers, first.heads, first.variables, n, mean, m2, dict(first.meta))

    def select(self, documents=None, heads=None) -> "DocumentMoments":
        """A subset: document ids and/or head indices (positions along the head axis)."""
        g = slice(None) if documents is None else np.isin(self.documents, documents)
        h = slice(None) if heads is None else np.asarray(heads)
        return DocumentMoments(self.documents[g], self.layers[h], self.heads[h], self.variables,
                               self.n[g][:, h], self.mean[g][:, h], self.m2[g][:, h],
                               dict(self.meta))

    def index(self, name: str) -> int:
        if name not in self.variables:
            raise SpectraError(f"variable {name!r} is not in the moments; they hold "
                               f"{list(self.variables)}")
        return self.variables.index(name)

    def augmented(self) -> tuple[np.ndarray, np.ndarray]:
        """(S, μ): S[g, h] = Σ_i z_i z_iᵀ over document g, z = (1, v − μ_h), μ_h the pooled mean.

        Centring at the pooled mean keeps the sums' digits; any statistic that is linear in the
        sums (the bootstrap, the cluster scores) is a sum over documents of these matrices.
        Computed once per object (the analysis asks for it several times) and read-only.
        """
        cached = self.__dict__.get("_augmented")
        if cached is not None:
            return cached
        total = self.n.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mu = np.where(total[:, None] > 0,
                          (self.n[..., None] * self.mean).sum(axis=0) / total[:, None], 0.0)
        d = self.mean - mu[None]
        g, h, p = self.mean.shape
        s = np.empty((g, h, p + 1, p + 1))
        s[..., 0, 0] = self.n
        b = self.n[..., None] * d
        s[..., 0, 1:] = b
        s[..., 1:, 0] = b
        s[..., 1:, 1:] = self.m2 + b[..., :, None] * d[..., None, :]
        s.setflags(write=False)
        mu.setflags(write=False)
        object.__setattr__(self, "_augmented", (s, mu))  # frozen: a cache, not a field
        return s, mu

    # --- storage: one .npz per shard (merging is concatenation) -----------------------------

    def save(self, path) -> None:
        """Write one `.npz` file atomically (`spectra_lens.io.write_npz`; header: format,
        version, variables, meta)."""
        write_npz(path, {"format": MOMENTS_FORMAT, "version": MOMENTS_VERSION,
                         "variables": list(self.variables), "meta": self.meta},
                  **{name: getattr(self, name) for name in _ARRAYS})

    @classmethod
    def load(cls, path) -> "DocumentMoments":
        """Read a `save` file; SpectraError for an unreadable file or another format."""
        header, arrays = read_npz(path, format=MOMENTS_FORMAT, version=MOMENTS_VERSION,
                                  names=_ARRAYS)
        return cls(variables=tuple(header["variables"]), meta=header.get("meta") or {}, **arrays)


def _merge_rows(n, mean, m2, codes, n_groups):
    """Merge rows of (n, mean, M2) that share a code: exact pooled count, mean and centred M2."""
    tot_n = np.zeros((n_groups,) + n.shape[1:])
    np.add.at(tot_n, codes, n)
    tot_sum = np.zeros((n_groups,) + mean.shape[1:])
    np.add.at(tot_sum, codes, n[..., None] * mean)
    with np.errstate(invalid="ignore", divide="ignore"):
        new_mean = np.where(tot_n[..., None] > 0, tot_sum / tot_n[..., None], 0.0)
    d = mean - new_mean[codes]
    new_m2 = np.zeros((n_groups,) + m2.shape[1:])
    np.add.at(new_m2, codes, m2 + n[..., None, None] * d[..., :, None] * d[..., None, :])
    return tot_n, new_mean, new_m2


def moments_from_records(records: pd.DataFrame, variables: Sequence[str], *,
                         min_position: int = 1, document: str = "document") -> DocumentMoments:
    """Per-document moments of per-token records (one row per token and head).

    Derived variables: `log_q_norm` = ln q_norm, `log_k_norm` = ln k_norm, `log_position` =
    ln(position + 1), `log_dir_spread` = ln dir_spread; other names are columns. Tokens at
    position < min_position, and tokens where any variable is not finite, are left out.
    """
    _require_columns(records, ("position", document, *_HEAD_KEYS), "records")
    rec = records[records["position"] >= min_position]
    cols = []
    for name in variables:
        cols.append(_derived(rec, name))
    values = np.column_stack(cols).astype(np.float64)
    ok = np.isfinite(values).all(axis=1)
    values, rec = values[ok], rec[ok]
    heads = rec.groupby(list(_HEAD_KEYS), sort=True).ngroup().to_numpy()
    keys = rec.groupby(list(_HEAD_KEYS), sort=True).size().index
    ids, doc = np.unique(rec[document].to_numpy(), return_inverse=True)
    n_h = len(keys)
    cell = doc * n_h + heads
    n_cells = ids.size * n_h
    n = np.bincount(cell, minlength=n_cells).astype(float)
    sums = np.stack([np.bincount(cell, values[:, j], minlength=n_cells)
                     for j in range(values.shape[1])], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n[:, None] > 0, sums / n[:, None], 0.0)
    centred = values - mean[cell]
    m2 = np.zeros((n_cells, values.shape[1], values.shape[1]))
    np.add.at(m2, cell, centred[:, :, None] * centred[:, None, :])
    p = values.shape[1]
    return DocumentMoments(
        ids.astype(np.int64),
        keys.get_level_values("layer").to_numpy().astype(np.int64),
        keys.get_level_values("head").to_numpy().astype(np.int64),
        tuple(variables), n.reshape(ids.size, n_h), mean.reshape(ids.size, n_h, p),
        m2.reshape(ids.size, n_h, p, p), {"min_position": min_position})


def _derived(frame: pd.DataFrame, name: str) -> np.ndarray:
    logs = {"log_q_norm": "q_norm", "log_k_norm": "k_norm", "log_dir_spread": "dir_spread"}
    if name == "log_position":
        return np.log1p(frame["position"].to_numpy(dtype=float))
    if name in logs:
        _require_columns(frame, (logs[name],), "records")
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(frame[logs[name]].to_numpy(dtype=float))
    _require_columns(frame, (name,), "records")
    return frame[name].to_numpy(dtype=float)


def _require_columns(frame, columns, name: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise SpectraError(f"{name} must be a pandas DataFrame; got {type(frame).__name__}")
    missing = [c for c in dict.fromkeys(columns) if c not in frame.columns]
    if missing:
        raise SpectraError(
            f"{name} lacks column(s) {missing}; expected {list(dict.fromkeys(columns))}, "
            f"got {list(frame.columns)}"
        )
    if frame.empty:
        raise SpectraError(f"{name} is empty; expected one row per token (and head)")

"""Attention metrics as pure tensor functions.

Conventions: `pattern` and `scores` have TransformerLens's axis order
`[batch, head, query_pos, key_pos]` (any leading axes are allowed; the last axis is the key
axis). `visible` is a boolean mask of the same shape, True where the query may attend to the key.
Every function computes in float32 (half-precision inputs are upcast) and returns float32.
Masked keys contribute exactly nothing.

The mathematics (for one query row, scaled scores `s_j` over the visible keys, p = softmax(α·s)):

* H(α) = log Z − α E_p[s], so dH/dα = −α Var_p(s) and the local gain dH/d ln α = −α² Var_p(s);
  at α = 1 this is −Var_p(s), available from a single forward pass.
* H is non-increasing in α, max_j p_j and the top-k mass are non-decreasing.
* softmax(α·log p) = softmax(α·s): the pattern alone determines the pattern at every α.
"""

import math
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from spectra_lens.kernels import compiled
from spectra_lens.validate import check_alphas

__all__ = [
    "causal_mask",
    "visible_from_scores",
    "n_visible",
    "entropy",
    "entropy_from_scores",
    "normalized_entropy",
    "max_attention",
    "k_eff_exp",
    "k_eff_participation",
    "k_eff_top_mass",
    "sink_mass",
    "vector_norm",
    "local_gain",
    "local_gain_under",
    "logits_from_pattern",
    "rescale_pattern",
    "K_EFF_DEFINITIONS",
    "SWEEP_METRICS",
    "ALPHA_CHUNK_ELEMENTS",
    "sorted_row_metrics",
    "query_blocks",
    "alpha_metrics",
    "pattern_metrics",
    "ROW_METRICS",
    "row_metrics",
    "without_first_key",
    "direction_spread",
    "sink_excluded_metrics",
    "alpha_row_metrics",
    "CAPTURE_ROW_METRICS",
    "capture_row_metrics",
]

K_EFF_DEFINITIONS: dict[str, str] = {
    "k_eff_exp": "exp(H): the perplexity of the attention distribution",
    "k_eff_pr": "1 / sum_j p_j^2: the participation ratio",
    "k_eff_top90": "the fewest top keys whose attention sums to at least 0.9",
}


def _f32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 or x.dtype == torch.float64 else x.float()


def causal_mask(n_query: int, n_key: int | None = None, *, device=None) -> Bool[Tensor, "query_pos key_pos"]:
    """visible[i, j] = (j <= i + n_key - n_query): causal visibility, queries aligned to the end."""
    n_key = n_query if n_key is None else n_key
    return torch.ones(n_query, n_key, dtype=torch.bool, device=device).tril(n_key - n_query)


def visible_from_scores(scores: Float[Tensor, "*batch key_pos"]) -> Bool[Tensor, "*batch key_pos"]:
    """visible = s > finfo.min / 2 and s is not -inf: recovers the additive mask of eager attention."""
    threshold = torch.finfo(scores.dtype).min / 2
    return scores > threshold


def n_visible(visible: Bool[Tensor, "*batch key_pos"]) -> Float[Tensor, "*batch"]:
    """n = sum_j visible_j, the number of keys a query may attend to."""
    return visible.sum(-1).to(torch.float32)


def entropy(pattern: Float[Tensor, "*batch key_pos"]) -> Float[Tensor, "*batch"]:
    """H = -sum_j p_j log p_j, in nats, with 0 log 0 = 0 (masked keys have p_j = 0)."""
    p = _f32(pattern)
    return -torch.special.xlogy(p, p).sum(-1)


def entropy_from_scores(
    scores: Float[Tensor, "*batch key_pos"],
    visible: Bool[Tensor, "*batch key_pos"] | None = None,
    *,
    alpha: float = 1.0,
) -> Float[Tensor, "*batch"]:
    """H = log Z − E_p[α s] with p = softmax(α·s) over the visible keys (stable log-softmax)."""
    s = _f32(scores)
    if visible is None:
        visible = visible_from_scores(scores)
    logp = torch.log_softmax((alpha * s).masked_fill(~visible, float("-inf")), dim=-1)
    p = logp.exp()
    return -(p * logp.masked_fill(~visible, 0.0)).sum(-1)


def normalized_entropy(
    entropy_: Float[Tensor, "*batch"], n_keys: Float[Tensor, "*batch"]
) -> Float[Tensor, "*batch"]:
    """H / log n over n visible keys, in [0, 1]; NaN where n = 1 (the ratio is undefined)."""
    log_n = torch.log(_f32(n_keys))
    return torch.where(log_n > 0, _f32(entropy_) / log_n.clamp_min(1e-30), torch.nan)


def max_attention(pattern: Float[Tensor, "*batch key_pos"]) -> Float[Tensor, "*batch"]:
    """max_j p_j."""
    return _f32(pattern).amax(-1)


def k_eff_exp(entropy_: Float[Tensor, "*batch"]) -> Float[Tensor, "*batch"]:
    """k_eff = exp(H): the number of equally weighted keys with the same entropy."""
    return torch.exp(_f32(entropy_))


def k_eff_participation(pattern: Float[Tensor, "*batch key_pos"]) -> Float[Tensor, "*batch"]:
    """k_eff = 1 / sum_j p_j^2 (participation ratio)."""
    p = _f32(pattern)
    return 1.0 / (p * p).sum(-1)


def k_eff_top_mass(
    pattern: Float[Tensor, "*batch key_pos"], *, mass: float = 0.9
) -> Float[Tensor, "*batch"]:
    """k_eff = min{k : sum of the k largest p_j >= mass}, the original's definition (mass 0.9)."""
    if not 0.0 < mass <= 1.0:
        from spectra_lens.errors import SpectraError

        raise SpectraError(f"mass must be in (0, 1], got {mass!r}")
    p = _f32(pattern)
    # Summed in float64: in float32 the rounding of a long row's cumulative sum shifts the
    # count by several keys where the mass approaches 1.
    cum = p.sort(dim=-1, descending=True).values.double().cumsum(-1)
    # A tolerance so that a row summing to 1 - 1e-7 still reaches mass = 1.
    below = cum < (mass - 1e-6)
    return (below.sum(-1) + 1).clamp_max(p.shape[-1]).to(torch.float32)


def sink_mass(pattern: Float[Tensor, "*batch key_pos"]) -> Float[Tensor, "*batch"]:
    """p_0: attention on the first (sink / BOS) token."""
    return _f32(pattern[..., 0])


def vector_norm(x: Float[Tensor, "*batch d_head"]) -> Float[Tensor, "*batch"]:
    """||x||_2 over the last axis."""
    return torch.linalg.vector_norm(_f32(x), dim=-1)


def logits_from_pattern(pattern: Float[Tensor, "*batch key_pos"]) -> Float[Tensor, "*batch key_pos"]:
    """log p_j = s_j − log Z: the scores up to a per-row constant (−inf where p_j = 0)."""
    return torch.log(_f32(pattern))


def local_gain(
    scores: Float[Tensor, "*batch key_pos"],
    visible: Bool[Tensor, "*batch key_pos"] | None = None,
    *,
    alpha: float = 1.0,
) -> Float[Tensor, "*batch"]:
    """dH/d ln α = −α² Var_p(s), p = softmax(α·s) over the visible keys; −Var_p(s) at α = 1.

    `scores` may be shifted by any per-row constant, so `logits_from_pattern(p)` works as well.
    """
    s = _f32(scores)
    if visible is None:
        visible = visible_from_scores(scores) if torch.isfinite(s).all() else torch.isfinite(s)
    s0 = s.masked_fill(~visible, 0.0)
    p = torch.softmax((alpha * s).masked_fill(~visible, float("-inf")), dim=-1)
    mean = (p * s0).sum(-1, keepdim=True)
    var = (p * (s0 - mean).square()).sum(-1)
    return -(alpha**2) * var


def local_gain_under(
    pattern: Float[Tensor, "*batch key_pos"],
    scores: Float[Tensor, "*batch key_pos"],
    visible: Bool[Tensor, "*batch key_pos"],
) -> Float[Tensor, "*batch"]:
    """−Var_p(s) with p the model's own pattern: the local gain at α = 1, no softmax recomputed.

    `scores` may be shifted by any per-row constant (log p works); masked keys contribute nothing.
    On the CPU, [..., query, key] tensors go in blocks of query rows over the keys that some row
    of the block sees (`query_blocks`: under a causal mask about half of the keys).
    """
    p, s = _f32(pattern), _f32(scores)
    if p.device.type != "cpu" or p.ndim < 2 or not (p.shape == s.shape == visible.shape):
        return _local_gain_rows(p, s, visible)
    out = p.new_empty(p.shape[:-1])
    for rows, n_keys in query_blocks(visible):
        out[..., rows] = _local_gain_rows(p[..., rows, :n_keys], s[..., rows, :n_keys],
                                          visible[..., rows, :n_keys])
    return out


def _local_gain_rows(p: Tensor, s: Tensor, visible: Tensor) -> Tensor:
    s0 = torch.where(visible, s, 0.0)
    mean = (p * s0).sum(-1, keepdim=True)
    return -(p * (s0 - mean).square()).sum(-1)


def rescale_pattern(
    pattern: Float[Tensor, "*batch key_pos"], alpha: float
) -> Float[Tensor, "*batch key_pos"]:
    """p(α)_j = p_j^α / sum_k p_k^α = softmax(α·s)_j: the pattern at query scale α, from p alone."""
    if not (math.isfinite(alpha) and alpha > 0):
        from spectra_lens.errors import SpectraError

        raise SpectraError(f"alpha must be finite and > 0, got {alpha!r}")
    logp = torch.log(_f32(pattern))
    return torch.softmax(alpha * logp, dim=-1)


# --------------------------------------------------------------------------- α-sweep kernels

# The metrics of an α-sweep (per-sequence means over query rows).
SWEEP_METRICS: tuple[str, ...] = ("entropy", "max_attn", "k_eff_exp", "k_eff_pr", "k_eff_top90")

# Floats held by one α-chunk of patterns while a fast-path hook runs (a few temporaries of this
# size exist at once): 2**24 floats = 64 MiB each.
ALPHA_CHUNK_ELEMENTS = 2**24

# Query rows per block: a block only needs the keys up to its last visible one, which under a
# causal mask roughly halves the work on patterns (and on the sort for k_eff_top90).
_QUERY_BLOCK = 16


def sorted_row_metrics(p: Tensor, logp: Tensor | None) -> dict[str, Tensor]:
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


def query_blocks(visible: Tensor) -> list[tuple[slice, int]]:
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
    chunk_elements: int = ALPHA_CHUNK_ELEMENTS,
    row_weight: Float[Tensor, "*#batch query_pos"] | None = None,
) -> dict[str, Float[Tensor, " alpha *batch"]]:
    """Mean over query rows of each metric of p(α) = softmax(α·s) over the visible keys.

    `scores` may be shifted by any per-row constant (log p works). Keys are sorted once per row
    (softmax(α·s) keeps the order of s); the α grid runs in chunks of at most `chunk_elements`
    pattern entries. Every query row must see at least one key, except rows of weight 0 in
    `row_weight` (padding), which the mean leaves out. On the CPU each query block goes through
    `alpha_row_metrics` (NumPy's sort; the metrics from e = exp(α (s − max s)) and its sums, no
    softmax); on other devices through torch's log-softmax and sort.
    """
    alphas = check_alphas(alphas)
    if scores.device.type == "cpu":  # NumPy's sort and no softmax: `alpha_row_metrics`
        lead, (n_rows, n_k) = scores.shape[:-2], scores.shape[-2:]
        s3, v3 = scores.reshape(-1, n_rows, n_k), visible.reshape(-1, n_rows, n_k)
        n_b = s3.shape[0]
        rw = None if row_weight is None else row_weight.expand(*lead, n_rows).reshape(n_b, n_rows).double().numpy()
        acc = {n: np.zeros((len(alphas), n_b)) for n in SWEEP_METRICS}
        for rows, n_keys in query_blocks(visible):
            n_r = rows.stop - rows.start
            z = torch.where(v3[:, rows, :n_keys], s3[:, rows, :n_keys].float(), float("-inf"))
            got = _alpha_rows(z.reshape(-1, n_keys).numpy(), alphas, chunk_elements)
            for n in SWEEP_METRICS:
                v = got[n].reshape(len(alphas), n_b, n_r)
                acc[n] += v.sum(-1) if rw is None else np.where(rw[:, rows] > 0, v * rw[:, rows], 0.0).sum(-1)
        denom = n_rows if rw is None else rw.sum(-1)
        return {n: torch.from_numpy(v / denom).float().reshape(len(alphas), *lead) for n, v in acc.items()}
    a_all = torch.tensor(alphas, dtype=torch.float32, device=scores.device)
    n_q = scores.shape[-2] if row_weight is None else row_weight.sum(-1)
    sums = {n: scores.new_zeros((len(alphas), *scores.shape[:-2]), dtype=torch.float32)
            for n in SWEEP_METRICS}
    for rows, n_keys in query_blocks(visible):
        z = scores[..., rows, :n_keys].float().masked_fill(~visible[..., rows, :n_keys], float("-inf"))
        z = z.sort(dim=-1, descending=True).values
        step = max(1, chunk_elements // max(1, z.numel()))
        for i in range(0, len(alphas), step):
            a = a_all[i : i + step].view(-1, *([1] * z.ndim))
            logp = torch.log_softmax(a * z, dim=-1)
            for n, v in sorted_row_metrics(logp.exp(), logp).items():
                sums[n][i : i + step] += _row_sum(v, row_weight, rows)
            del logp
    return {n: v / n_q for n, v in sums.items()}


def _row_sum(v: Tensor, row_weight: Tensor | None, rows: slice) -> Tensor:
    """Σ over the query rows `rows` of `v` [..., rows], weighted; rows of weight 0 (padding,
    possibly NaN there) add nothing."""
    if row_weight is None:
        return v.sum(-1)
    w = row_weight[..., rows]
    return torch.where(w > 0, v * w, 0.0).sum(-1)


def pattern_metrics(
    pattern: Float[Tensor, "*batch query_pos key_pos"],
    visible: Bool[Tensor, "*batch query_pos key_pos"] | None = None,
    *,
    row_weight: Float[Tensor, "*#batch query_pos"] | None = None,
) -> dict[str, Float[Tensor, "*batch"]]:
    """Mean over query rows of each metric of the pattern itself (`metrics` definitions);
    rows of weight 0 in `row_weight` (padding) are left out.

    `visible` is accepted for symmetry with `alpha_metrics`; none of these metrics needs it
    (masked keys have p = 0). Computed by `row_metrics` (query blocks, visible keys only).
    """
    got = row_metrics(pattern, None, top_mass=0.9)
    if row_weight is None:
        return {n: got[n].mean(-1) for n in SWEEP_METRICS}
    w = row_weight.float()
    return {n: torch.where(w > 0, got[n] * w, 0.0).sum(-1) / w.sum(-1) for n in SWEEP_METRICS}


# --------------------------------------------------------------------------- capture kernel


#: Pattern entries per query block of `row_metrics` on the CPU (2**18 floats = 1 MiB: a block
#: and its temporaries stay in the cache). On other devices the blocks are larger.
CPU_BLOCK_ELEMENTS = 2**18
DEVICE_BLOCK_ELEMENTS = 2**26
ROW_METRICS: tuple[str, ...] = (
    "entropy", "entropy_norm", "max_attn", "k_eff_exp", "k_eff_pr", "k_eff_top90",
    "sink_mass", "local_gain",
)
_TOP_TOL = 1e-6  # the tolerance of k_eff_top_mass: a row summing to 1 − 1e-7 reaches mass 1
_TOP_CHUNK = 16  # keys per chunk of the cumulative sums behind k_eff_top90
_TOP_PREFIX = 64  # keys summed one by one in every row before chunks are used
_TOPK_FIRST = 64  # the first pass of k_eff_top90 off the CPU: topk, then a sort where unsettled
_SCORE_FLOOR = -1e18  # masked scores (finfo.min, −inf) clamped here: p = 0 times it is 0


def _top_count_sorted(E: Tensor, lim: Tensor) -> Tensor:
    """Rows of E [rows, W] sorted in descending order (≥ 0): the fewest leading entries whose
    sum reaches lim [rows]; W + 1 where the row never does (callers read it as every key).

    `_top_counts_sorted` with one threshold per row.
    """
    return _top_counts_sorted(E, lim[:, None])[:, 0]


def _top_counts_sorted(E: Tensor, lims: Tensor) -> Tensor:
    """Rows of E [rows, W] sorted in descending order (≥ 0): for every threshold lims[:, m]
    (float64 [rows, m]), the fewest leading entries whose sum reaches it; W + 1 where the row
    never does. Returns [rows, m].

    Sums in float64, as `k_eff_top_mass`: a cumulative sum of the first `_TOP_PREFIX` keys
    settles most rows; only the rows it leaves open for some threshold get the cumulative sum of
    every key (a full cumulative sum of every row costs more than the sort). The count is the
    insertion point of the threshold in the non-decreasing cumulative sums.
    """
    rows, W = E.shape
    k = min(_TOP_PREFIX, W)
    c = E[:, :k].double().cumsum_(-1)
    lims = lims.contiguous()
    count = torch.searchsorted(c, lims) + 1
    if k == W:
        return count
    open_ = (c[:, -1:] < lims).any(-1).nonzero()[:, 0]
    if open_.numel():
        full = E[open_].double().cumsum_(-1)
        count[open_] = torch.searchsorted(full, lims[open_]) + 1
    return count


def _top_mass_count_torch(p: Tensor, mass: float) -> Tensor:
    """The same count with torch ops (any device): `topk` first, a full sort only for the rows
    the top keys do not settle."""
    lim = mass - _TOP_TOL
    W = p.shape[-1]
    k = min(_TOPK_FIRST, W)
    c = p.topk(k, dim=-1, sorted=True).values.double().cumsum(-1)
    out = (c < lim).sum(-1) + 1
    if k < W:
        uns = (c[..., -1] < lim).nonzero(as_tuple=True)
        if uns[0].numel():
            c2 = p[uns].sort(dim=-1, descending=True).values.double().cumsum(-1)
            out[uns] = (c2 < lim).sum(-1) + 1
    return out


def _key_extent(scores: Tensor | None, pattern: Tensor, q0: int, q1: int) -> int:
    """Keys [0, extent) hold every visible key of query rows [q0, q1): the causal extent when no
    key after it is visible (checked), else all keys."""
    n_q, n_k = pattern.shape[-2:]
    ext = min(n_k, q1 + n_k - n_q)
    if ext < n_k:
        tail = (scores if scores is not None else pattern)[..., q0:q1, ext:]
        if scores is not None:
            hidden = bool(tail.amax() <= torch.finfo(scores.dtype).min / 2)
        else:
            hidden = bool(tail.amax() <= 0)
        if not hidden:
            ext = n_k
    return max(ext, 1)


def row_metrics(
    pattern: Float[Tensor, "*batch query_pos key_pos"],
    scores: Float[Tensor, "*batch query_pos key_pos"] | None = None,
    *,
    top_mass: float | None = 0.9,
    block_elements: int | None = None,
    backend: str | None = None,
) -> dict[str, Float[Tensor, "*batch query_pos"]]:
    """Every per-query metric of `ROW_METRICS` from one pattern (and its scores), in one pass.

    Equal to the single-metric functions of this module (`entropy`, `normalized_entropy`,
    `max_attention`, `k_eff_*`, `sink_mass`, `local_gain_under`) applied to the whole tensor, but
    computed in query blocks over the visible keys only (under a causal mask the keys after the
    block's last query are skipped once they are checked to be masked), with each block read once
    into float32 (half-precision inputs are upcast per block), so the temporaries are the size of
    one block, not of the pattern. `scores` (masked entries ≤ finfo.min / 2 or −inf) give the
    visible keys and the logits of the local gain; without them the visible keys are p > 0 and
    the logits log p. `top_mass` None skips k_eff_top90 (NaN).

    `backend` "numpy" (the CPU default: NumPy's vectorized sort and row dots) or "torch" (the
    default elsewhere; `topk` first, a full sort only for unsettled rows); both give the same
    values (tested). k_eff_top90 sums the sorted masses in float64, so a count can differ from a
    float32 cumulative sum only where the mass crosses the threshold within rounding.
    """
    if top_mass is not None and not 0.0 < top_mass <= 1.0:
        from spectra_lens.errors import SpectraError

        raise SpectraError(f"top_mass must be in (0, 1] or None, got {top_mass!r}")
    lead, (n_q, n_k) = pattern.shape[:-2], pattern.shape[-2:]
    p3 = pattern.reshape(-1, n_q, n_k)
    s3 = None if scores is None else scores.reshape(-1, n_q, n_k)
    device = pattern.device
    if backend is None:
        backend = "numpy" if device.type == "cpu" else "torch"
    if backend not in ("numpy", "torch") or (backend == "numpy" and device.type != "cpu"):
        from spectra_lens.errors import SpectraError

        raise SpectraError(f"backend must be 'torch', or 'numpy' for CPU tensors; got {backend!r} "
                           f"for a tensor on {device}")
    if block_elements is None:
        block_elements = CPU_BLOCK_ELEMENTS if device.type == "cpu" else DEVICE_BLOCK_ELEMENTS
    n_b = p3.shape[0]
    rows_per = max(1, block_elements // max(1, n_b * n_k))
    names = ("entropy", "n_visible", "max_attn", "k_eff_pr", "k_eff_top90", "local_gain")
    out = {n: torch.empty(n_b, n_q, dtype=torch.float32, device=device) for n in names}
    # blocks are float32: a float64 mask (≤ float64 min / 2) is −inf there
    thr = max(torch.finfo(s3.dtype).min, torch.finfo(torch.float32).min) / 2 if s3 is not None else 0.0
    with torch.no_grad():
        for q0 in range(0, n_q, rows_per):
            _row_block(p3, s3, q0, min(n_q, q0 + rows_per), out, thr, top_mass, backend)
    return {n: v.reshape(*lead, n_q) for n, v in _row_results(out, p3, top_mass).items()}


def _row_results(out: dict[str, Tensor], p3: Tensor, top_mass: float | None) -> dict[str, Tensor]:
    """The `ROW_METRICS` of a row kernel's sums `out` [batch, query] (its visible-key counts
    become entropy_norm)."""
    H = out["entropy"]
    log_n = out["n_visible"].log()
    return {
        "entropy": H,
        "entropy_norm": torch.where(log_n > 0, H / log_n.clamp_min(1e-30), torch.nan),
        "max_attn": out["max_attn"],
        "k_eff_exp": torch.exp(H),
        "k_eff_pr": out["k_eff_pr"],
        "k_eff_top90": out["k_eff_top90"] if top_mass is not None else torch.full_like(H, torch.nan),
        # a copy: a view of a float32 pattern would keep the whole layer's pattern alive
        "sink_mass": p3[:, :, 0].to(torch.float32, copy=True),
        "local_gain": out["local_gain"],
    }


def _row_block(p3, s3, q0, q1, out, thr, top_mass, backend) -> None:
    """Row metrics of query rows [q0, q1) into `out` (see row_metrics)."""
    n_b, n_q, n_k = p3.shape
    ext = _key_extent(s3, p3, q0, q1)
    f32 = torch.float32
    if backend == "numpy":
        # Read once into float32 blocks, zero-padded to whole chunks of the top-mass sums.
        width = ext + (-ext % _TOP_CHUNK)
        pb = torch.zeros(n_b, q1 - q0, width, dtype=f32)
        pb[..., :ext] = p3[:, q0:q1, :ext]
        sb = None
        if s3 is not None:
            sb = torch.full((n_b, q1 - q0, width), torch.finfo(f32).min, dtype=f32)
            sb[..., :ext] = s3[:, q0:q1, :ext]
            sb = sb.view(-1, width)
        got = _block_numpy(pb.view(-1, width), sb, thr, top_mass)
    else:
        pb = p3[:, q0:q1, :ext].to(f32).reshape(-1, ext)
        sb = None if s3 is None else s3[:, q0:q1, :ext].to(f32).reshape(-1, ext)
        got = _block_torch(pb, sb, thr, top_mass)
    if top_mass is not None:  # a row that never reaches the mass: every key, as k_eff_top_mass
        top = got["k_eff_top90"]
        got["k_eff_top90"] = torch.where(top > ext, float(n_k), top)
    for n, v in got.items():
        out[n][:, q0:q1] = v.view(n_b, q1 - q0)


def _block_numpy(pb: Tensor, sb: Tensor | None, thr: float, top_mass: float | None) -> dict[str, Tensor]:
    """Row metrics of one float32 CPU block [rows, keys] (keys zero-padded to whole chunks);
    NumPy's row dots and vectorized sort, torch's vectorized log."""
    P = pb.numpy()
    logp = pb.clamp_min(torch.finfo(torch.float32).tiny).log_().numpy()
    if sb is None:
        S, n_vis = logp, (P > 0).sum(-1)  # log p: the scores up to a per-row shift
    else:
        S = sb.numpy()
        n_vis = (S > thr).sum(-1)
        S = np.maximum(S, _SCORE_FLOOR)  # a copy: p = 0 there, so it adds nothing below
    mean = np.einsum("ij,ij->i", P, S)
    D = S - mean[:, None]
    np.square(D, out=D)
    got = {
        "entropy": -np.einsum("ij,ij->i", P, logp),
        "n_visible": n_vis,
        "max_attn": P.max(-1),
        "k_eff_pr": 1.0 / np.einsum("ij,ij->i", P, P),
        "local_gain": -np.einsum("ij,ij->i", P, D),
    }
    out = {n: torch.from_numpy(np.asarray(v, dtype=np.float32)) for n, v in got.items()}
    if top_mass is not None:
        desc = torch.from_numpy(np.negative(np.sort(np.negative(P), axis=-1)))
        lim = torch.full((P.shape[0],), top_mass - _TOP_TOL, dtype=torch.float64)
        out["k_eff_top90"] = _top_count_sorted(desc, lim).float()
    return out


def _block_torch(pb: Tensor, sb: Tensor | None, thr: float, top_mass: float | None) -> dict[str, Tensor]:
    if sb is None:
        visible = pb > 0
        s0 = torch.log(pb).masked_fill_(~visible, 0.0)
    else:
        visible = sb > thr
        s0 = sb.masked_fill(~visible, 0.0)
    mean = (pb * s0).sum(-1, keepdim=True)
    got = {
        "entropy": -torch.special.xlogy(pb, pb).sum(-1),
        "n_visible": visible.sum(-1).float(),
        "max_attn": pb.amax(-1),
        "k_eff_pr": 1.0 / (pb * pb).sum(-1),
        "local_gain": -(pb * (s0 - mean).square_()).sum(-1),
    }
    if top_mass is not None:
        got["k_eff_top90"] = _top_mass_count_torch(pb, top_mass).float()
    return got


_EXP_FLOOR = -87.0
# `alpha_row_metrics`: rows padded to a multiple of _ALPHA_PAD keys (whole vectors for exp);
# keys per chunk of the chunk sums behind k_eff_top90 (divides _ALPHA_PAD); pattern entries per
# piece of the exponentials and their sums (2**17 floats = 512 KiB: a piece, its exponents and
# its exponentials stay in the cache while they are summed).
_ALPHA_PAD = 16
_ALPHA_KEY_CHUNK = 8
_ALPHA_PIECE = 2**17
_F32_EPS = 2.0**-24  # unit roundoff of float32


def alpha_row_metrics(
    z: Float[Tensor, "rows key_pos"], alphas: Sequence[float], *, chunk_elements: int = ALPHA_CHUNK_ELEMENTS,
    backend: str | None = None,
) -> dict[str, Float[Tensor, "alpha rows"]]:
    """Metrics of softmax(α·z) for every α, per row of z [rows, keys] (float32, masked −inf).

    Sorts each row once (softmax(α·z) keeps the order of z for α > 0); per α:
    e = exp(α (z − max z)) (so e_0 = 1), Z = Σ e, H = log Z − α Σ e (z − max) / Z,
    max p = 1 / Z, 1 / Σ p² = Z² / Σ e², and the top-mass count from e against 0.9 · Z
    (`_top_count_from_chunks`: exactly the float64 count of `k_eff_top_mass`). Σ e² is summed
    as Σ exp(2α (z − max z)) (equal to float32 rounding; squares of small e would be subnormal
    floats, which are many times slower), which is the Z of 2α where 2α is on the grid too
    (log-spaced grids with a point per octave).

    The α grid runs in chunks of at most `chunk_elements` entries of e; inside a chunk the
    exponentials and their sums are formed in cache-sized pieces. Every per-row quantity depends
    only on that row and α, so the chunking does not change any result.

    `backend`: "compiled" (the default where numba is available: `compiled.alpha_row_sums`, one
    pass per α and row in float64, no chunks) or "numpy" (the kernel above, the reference).
    """
    if backend not in (None, "numpy", "compiled") or (backend == "compiled" and not compiled.AVAILABLE):
        from spectra_lens.errors import SpectraError

        raise SpectraError(f"backend must be None, 'numpy' or 'compiled' (numba available: "
                           f"{compiled.AVAILABLE}), got {backend!r}")
    got = _alpha_rows(z.float().numpy(), check_alphas(alphas), chunk_elements, backend)
    return {n: torch.from_numpy(v).float() for n, v in got.items()}


def _alpha_rows(z: np.ndarray, alphas: tuple[float, ...], chunk_elements: int,
                backend: str | None = None) -> dict[str, np.ndarray]:
    """`alpha_row_metrics` on z [rows, keys] (float32 NumPy), in float64 [alpha, rows]."""
    if backend == "compiled" or (backend is None and compiled.AVAILABLE):
        got = compiled.alpha_row_sums(z, alphas, top_mass=0.9, tol=_TOP_TOL)
        return {n: got[i] for i, n in enumerate(SWEEP_METRICS)}
    rows, n_keys = z.shape
    kc = _ALPHA_KEY_CHUNK
    width = n_keys + (-n_keys % _ALPHA_PAD)
    n_chunks = width // kc
    zs = np.sort(z, axis=-1)[:, ::-1]  # descending, −inf last
    zc = np.full((rows, width), _SCORE_FLOOR, dtype=np.float32)  # exp(α · floor) = 0
    with np.errstate(invalid="ignore"):  # a row with no visible key (padding) gives NaN
        np.maximum(zs - zs[:, :1], _SCORE_FLOOR, out=zc[:, :n_keys])
    n_a = len(alphas)
    a_all = np.asarray(alphas, dtype=np.float32)
    # double[i]: the index of 2 α_i on the grid (exact in float32), or -1: Σ e² summed
    double = [next((j for j in range(n_a) if a_all[j] == 2 * a_all[i]), -1) for i in range(n_a)]
    out = {n: np.empty((n_a, rows)) for n in SWEEP_METRICS}
    Z_all = np.empty((n_a, rows))
    step = max(1, chunk_elements // zc.size)  # α per chunk
    piece = max(1, min(chunk_elements, _ALPHA_PIECE))
    if zc.size <= piece:  # a piece: several α × every row, or one α × a range of rows
        p_a, p_r = piece // zc.size, rows
    else:
        p_a, p_r = 1, max(1, piece // width)
    c_a = min(step, n_a)
    E = np.empty((c_a, rows, width), np.float32)  # e of one chunk, for the top-mass count
    E_t = torch.from_numpy(E)
    sums = np.zeros((3, c_a, rows), np.float32)  # Z, Σ e·x, Σ e² (x = α (z − max z))
    chunk_sums = np.zeros((1 + n_chunks, c_a * rows), np.float32)  # [0 | key chunk, (α, row)]
    x_buf = np.empty(min(p_a, c_a) * min(p_r, rows) * width, np.float32)
    y_buf = np.empty(min(p_r, rows) * width, np.float32)  # exp(2x) of one α
    ones = np.ones(kc, np.float32)
    for i in range(0, n_a, step):
        n_ai = min(step, n_a - i)
        for ia in range(0, n_ai, p_a):
            ib = min(ia + p_a, n_ai)
            for r0 in range(0, rows, p_r):
                r1 = min(r0 + p_r, rows)
                x = x_buf[: (ib - ia) * (r1 - r0) * width].reshape(ib - ia, r1 - r0, width)
                np.multiply(zc[None, r0:r1], a_all[i + ia : i + ib, None, None], out=x)
                # exp is many times slower below −87 (subnormal range and beyond): clamp the
                # exponent there (exp = 1.6e−38, the smallest normal float): such terms add
                # < 1e−36 each to any sum.
                x_t = torch.from_numpy(x).clamp_min_(_EXP_FLOOR)
                torch.exp(x_t, out=E_t[ia:ib, r0:r1])
                e = E[ia:ib, r0:r1].reshape(-1, width)
                xf = x.reshape(-1, width)
                sums[0, ia:ib, r0:r1] = np.einsum("ij->i", e).reshape(ib - ia, r1 - r0)
                sums[1, ia:ib, r0:r1] = np.einsum("ij,ij->i", e, xf).reshape(ib - ia, r1 - r0)
                for ja in range(ia, ib):
                    if double[i + ja] < 0:  # Σ exp(2x), clamped as every exponent
                        y = y_buf[: (r1 - r0) * width].reshape(r1 - r0, width)
                        np.multiply(x[ja - ia], np.float32(2), out=y)
                        y_t = torch.from_numpy(y).clamp_min_(_EXP_FLOOR)
                        torch.exp(y_t, out=y_t)
                        sums[2, ja, r0:r1] = np.einsum("ij->i", y)
                cs = (e.reshape(-1, kc) @ ones).reshape(-1, n_chunks)
                chunk_sums[1:, ia * rows + r0 : (ib - 1) * rows + r1] = cs.T
        n = n_ai * rows
        Z, ex, ee = (v.reshape(-1).astype(np.float64) for v in sums[:, :n_ai])
        top = _top_count_from_chunks(E[:n_ai].reshape(n, width), (0.9 - _TOP_TOL) * Z, chunk_sums[:, :n])
        H = np.log(Z) - ex / Z
        got = {"entropy": H, "max_attn": 1.0 / Z, "k_eff_exp": np.exp(H), "k_eff_pr": ee,
               "k_eff_top90": np.minimum(top, n_keys)}
        for name, v in got.items():
            out[name][i : i + n_ai] = v.reshape(n_ai, rows)
        Z_all[i : i + n_ai] = Z.reshape(n_ai, rows)
    for i, j in enumerate(double):  # k_eff_pr = Z² / Σ e², Σ e² held there so far where j < 0
        out["k_eff_pr"][i] = Z_all[i] ** 2 / (Z_all[j] if j >= 0 else out["k_eff_pr"][i])
    return out


def _top_count_from_chunks(E: np.ndarray, lim: np.ndarray, chunk_sums: np.ndarray) -> np.ndarray:
    """Rows of E [N, W] (float32 ≥ 0, sorted in descending order, W a multiple of
    `_ALPHA_KEY_CHUNK`): the fewest leading entries whose float64 sum reaches lim [N] (float64);
    W where the row never does. `chunk_sums` [1 + W / _ALPHA_KEY_CHUNK, N] (float32): zeros,
    then each row's sums of its consecutive chunks of keys; overwritten (cumulative sums).

    Found in float32, one operation over all rows at a time: the chunk where the cumulative sum
    reaches lim, then the key inside it. A float32 partial sum (a chunk sum, the sum of the
    chunk sums before it, the keys of its chunk) adds at most n_chunks + 2·chunk nonnegative
    terms, so it is within (n_chunks + 2·chunk) u Z of the exact one (u = 2⁻²⁴, Z the row's
    sum); with δ = 2 (n_chunks + 2·chunk + 2) u Z (which also covers rounding lim ± δ to
    float32), where no partial sum of that chunk (nor the sum before it) lies within δ of lim,
    the count is the float64 count. The few other rows (a partial sum within δ of lim, a NaN
    row) are counted again with a float64 cumulative sum.
    """
    kc = _ALPHA_KEY_CHUNK
    N, W = E.shape
    n_chunks = W // kc
    C = chunk_sums  # C[c]: the sum of the first c chunks
    for c in range(2, n_chunks + 1):
        np.add(C[c], C[c - 1], out=C[c])
    delta = C[-1].astype(np.float64) * (2 * (n_chunks + 2 * kc + 2) * _F32_EPS)
    lim32, lo32, hi32 = (v.astype(np.float32) for v in (lim, lim - delta, lim + delta))
    # whole chunks below lim (≤ n_chunks; uint8 counts of a bool view are the fast sum)
    j = (C[1:] < lim32).view(np.uint8).sum(0, dtype=np.uint8 if n_chunks < 256 else np.int64)
    jj = np.minimum(j, n_chunks - 1).astype(np.intp)
    r = np.arange(N)
    base = np.take(C.reshape(-1), jj * N + r)  # the sum before chunk jj
    w = np.take(E.reshape(N * n_chunks, kc), r * n_chunks + jj, axis=0).T.copy()  # [key, row]
    w[0] += base
    for t in range(1, kc):
        np.add(w[t], w[t - 1], out=w[t])

    def below(v):  # keys of chunk jj whose partial sum is below v
        return (w < v).view(np.uint8).sum(0, dtype=np.uint8)

    k, k_lo, k_hi = below(lim32), below(lo32), below(hi32)
    settled = (k_lo == k_hi) & (k_hi < kc) & ((jj == 0) | (base < lo32))
    count = jj * kc + k + 1
    redo = np.flatnonzero(~settled)
    if redo.size:
        c = torch.from_numpy(np.take(E, redo, axis=0)).cumsum(-1, dtype=torch.float64)
        count[redo] = ((c < torch.from_numpy(lim[redo, None])).sum(-1) + 1).clamp_max_(W).numpy()
    return count


def without_first_key(
    scores: Float[Tensor, "*batch key_pos"], visible: Bool[Tensor, "*batch key_pos"]
) -> Float[Tensor, "*batch key_pos"]:
    """p'_j = softmax of s over the visible keys after the first visible one (the sink; key 0 unless
    padding precedes it): p_j / (1 − p_sink), 0 at the sink.

    The pattern with the first (sink / BOS) key excluded and the rest renormalized, computed
    from the scores (or log p: any per-row shift works) so that p_0 near 1 loses no digits.
    Rows with no visible key after the first (query position 0) are NaN.
    """
    # the first *visible* key: key 0 in an unpadded causal row, the first real token under left padding
    first = visible & (visible.long().cumsum(-1) == 1)
    vis = visible & ~first
    return torch.softmax(_f32(scores).masked_fill(~vis, float("-inf")), dim=-1)


def direction_spread(
    scores: Float[Tensor, "*batch key_pos"],
    visible: Bool[Tensor, "*batch key_pos"],
    q_norm: Float[Tensor, "*batch"],
) -> Float[Tensor, "*batch"]:
    """sd_j(s_j / ‖q‖) over the visible keys (population sd): the spread of q̂·k/√d.

    The scores at unit query norm: the part of the logits set by the query's direction (and
    the keys), so that entropy can be compared with the norm and with the direction. Any
    per-row shift of `scores` (log p) gives the same value. 0 where one key is visible.
    """
    s = _f32(scores).masked_fill(~visible, 0.0)
    n = visible.sum(-1, keepdim=True).clamp_min(1).to(s.dtype)
    mean = s.sum(-1, keepdim=True) / n
    var = ((s - mean).square() * visible).sum(-1) / n[..., 0]
    return var.sqrt() / _f32(q_norm)


def sink_excluded_metrics(
    pattern: Float[Tensor, "*batch query_pos key_pos"],
    scores: Float[Tensor, "*batch query_pos key_pos"] | None,
    q_norm: Float[Tensor, "*batch query_pos"],
    *,
    top_mass: float | None = 0.9,
    block_elements: int | None = None,
    backend: str | None = None,
) -> dict[str, Float[Tensor, "*batch query_pos"]]:
    """The metrics of the pattern without the first key, and the direction spread of the logits.

    `entropy_nosink`, `max_attn_nosink`, `k_eff_exp_nosink`, `k_eff_pr_nosink`,
    `k_eff_top90_nosink` are `entropy`, `max_attention`, `k_eff_exp`, `k_eff_participation`,
    `k_eff_top_mass` of `without_first_key` (NaN at query position 0, which sees only the first
    key; k_eff_top90_nosink NaN throughout when `top_mass` is None); `dir_spread` is
    `direction_spread`. Without `scores` the visible keys are p > 0 and the logits log p.

    Computed like `row_metrics`: in query blocks over the visible keys only, `without_first_key`
    of each block and `row_metrics` of that (one block at a time, so the temporaries are the
    size of a block); equal to the single-metric functions on the whole tensor up to rounding
    (`_sink_excluded_metrics_whole` is that reference; tested).
    """
    lead, (n_q, n_k) = pattern.shape[:-2], pattern.shape[-2:]
    p3 = pattern.reshape(-1, n_q, n_k)
    s3 = None if scores is None else scores.reshape(-1, n_q, n_k)
    qn = q_norm.reshape(-1, n_q)
    device = pattern.device
    if block_elements is None:
        block_elements = CPU_BLOCK_ELEMENTS if device.type == "cpu" else DEVICE_BLOCK_ELEMENTS
    n_b = p3.shape[0]
    rows_per = max(1, block_elements // max(1, n_b * n_k))
    out = {n: torch.empty(n_b, n_q, dtype=torch.float32, device=device) for n in _SINK_NAMES}
    with torch.no_grad():
        for q0 in range(0, n_q, rows_per):
            _sink_block(p3, s3, qn, q0, min(n_q, q0 + rows_per), out, top_mass, backend)
    return {n: v.reshape(*lead, n_q) for n, v in _sink_results(out, top_mass).items()}


_SINK_NAMES = ("entropy_ns", "max_attn_ns", "k_eff_pr_ns", "k_eff_top90_ns", "dir_spread")


def _sink_results(out: dict[str, Tensor], top_mass: float | None) -> dict[str, Tensor]:
    h = out["entropy_ns"]
    return {
        "entropy_nosink": h,
        "max_attn_nosink": out["max_attn_ns"],
        "k_eff_exp_nosink": torch.exp(h),
        "k_eff_pr_nosink": out["k_eff_pr_ns"],
        "k_eff_top90_nosink": out["k_eff_top90_ns"] if top_mass is not None else torch.full_like(h, torch.nan),
        "dir_spread": out["dir_spread"],
    }


def _sink_block(p3, s3, qn, q0, q1, out, top_mass, backend) -> None:
    """Sink-excluded metrics of query rows [q0, q1) into `out` (see sink_excluded_metrics):
    `without_first_key` of the block from its scores, then `row_metrics` of that."""
    ext = _key_extent(s3, p3, q0, q1)
    pb = p3[:, q0:q1, :ext]
    if s3 is None:
        visible = pb > 0
        sb = logits_from_pattern(pb)
    else:
        sb = s3[:, q0:q1, :ext]
        visible = visible_from_scores(sb)
    rest = without_first_key(sb, visible)
    with np.errstate(divide="ignore", invalid="ignore"):  # all-zero rows: NaN below
        got = row_metrics(rest.nan_to_num(0.0), top_mass=top_mass,
                          block_elements=max(1, rest.numel()), backend=backend)
    undefined = ~(visible.sum(-1) > 1)  # nothing visible after the first key: NaN
    for n in ("entropy", "max_attn", "k_eff_pr", "k_eff_top90"):
        out[n + "_ns"][:, q0:q1] = got[n].masked_fill(undefined, torch.nan)
    out["dir_spread"][:, q0:q1] = direction_spread(sb, visible, qn[:, q0:q1])


#: The metrics of `capture_row_metrics`: `ROW_METRICS` and those of `sink_excluded_metrics`.
CAPTURE_ROW_METRICS: tuple[str, ...] = ROW_METRICS + (
    "entropy_nosink", "max_attn_nosink", "k_eff_exp_nosink", "k_eff_pr_nosink",
    "k_eff_top90_nosink", "dir_spread",
)
_NOSINK_MIN_MASS = 1e-30  # below this, the rest of a row is renormalized from its scores
_NUMPY_FLOATS = (torch.float32, torch.float64)  # the compiled kernel reads these in place
_CPU_FLOATS = _NUMPY_FLOATS + (torch.float16, torch.bfloat16)  # these in float32 blocks
_MIN_BLOCK_ROWS = 256  # rows (batch × head × query) per block of capture_row_metrics by default


def _subnormal_below(dtype: torch.dtype) -> float:
    """float16's smallest normal number (its p below it keep few digits), 0 for the types whose
    range is float32's or wider."""
    return torch.finfo(torch.float16).tiny if dtype == torch.float16 else 0.0


def capture_row_metrics(
    pattern: Float[Tensor, "*batch query_pos key_pos"],
    scores: Float[Tensor, "*batch query_pos key_pos"] | None,
    q_norm: Float[Tensor, "*batch query_pos"],
    *,
    top_mass: float | None = 0.9,
    block_elements: int | None = None,
    backend: str | None = None,
) -> dict[str, Float[Tensor, "*batch query_pos"]]:
    """`row_metrics` and `sink_excluded_metrics` together (`CAPTURE_ROW_METRICS`), in one pass.

    The same values as the two functions (tested), computed in one read of each query block
    where the block allows it: a CPU pattern ("numpy" backend; half precision is read into a
    float32 copy of the block) whose first key is visible in every row of the block (no left
    padding). There the pattern without its first key is p_j / R with R = Σ_{j≥1} p_j summed
    directly (not 1 − p_0, so a sink near 1 loses no digits), and its metrics follow from the
    sums of the full row's: H' = −Σ_{j≥1} p_j log p_j / R + log R, max' = max_{j≥1} p_j / R,
    1 / Σ p'² = R² / Σ_{j≥1} p_j²; both top-mass counts come from one sort of the full row
    (removing p_0 from a sorted row shifts the cumulative sums after its rank by p_0). Rows whose
    rest underflows (R < 1e-30; in float16 also R below its smallest normal number, 6.1e-5, per
    visible key) are renormalized from their scores instead, as `without_first_key` does. Other blocks (left
    padding) and other devices go through the two functions' block kernels.

    `backend`: "compiled" (the CPU default where numba is available and the scores are given:
    `spectra_lens.kernels.compiled`, the same values row by row, its flagged rows from the two
    functions; a half-precision pattern and its scores are read one query block at a time into
    float32 copies over the block's key extent, never the whole pattern at once), "numpy" (the
    kernel above, the reference) or "torch" (the two functions).

    bfloat16 inputs give the values of the same path on their float32 upcast (float16 too, but
    for its subnormal p, above). With scores, half inputs differ from the two functions' values
    on the same inputs by the inputs' own rounding (a half pattern is softmax of its half scores
    only to its rounding, and the paths take log p and the rest's renormalization from one or
    the other): a few units of the half type's eps, not float32's (tested).
    """
    if top_mass is not None and not 0.0 < top_mass <= 1.0:
        from spectra_lens.errors import SpectraError

        raise SpectraError(f"top_mass must be in (0, 1] or None, got {top_mass!r}")
    lead, (n_q, n_k) = pattern.shape[:-2], pattern.shape[-2:]
    device = pattern.device
    compilable = (device.type == "cpu" and scores is not None and pattern.dtype in _CPU_FLOATS
                  and scores.dtype in _CPU_FLOATS)
    if backend is None:
        backend = ("compiled" if compilable and compiled.AVAILABLE
                   else "numpy" if device.type == "cpu" else "torch")
    elif backend == "compiled" and not (compilable and compiled.AVAILABLE):
        from spectra_lens.errors import SpectraError

        have = "" if scores is not None else " without scores"
        raise SpectraError(f"backend 'compiled' needs numba (available: {compiled.AVAILABLE}) and a "
                           f"float16/bfloat16/float32/float64 CPU pattern with its scores; got a "
                           f"{pattern.dtype} pattern on {device}{have}"
                           + ("" if scores is None else f" with {scores.dtype} scores"))
    fused = (backend in ("numpy", "compiled") and device.type == "cpu" and pattern.dtype in _CPU_FLOATS
             and (scores is None or scores.dtype in _CPU_FLOATS))
    if not fused:
        return (row_metrics(pattern, scores, top_mass=top_mass, block_elements=block_elements, backend=backend)
                | sink_excluded_metrics(pattern, scores, q_norm, top_mass=top_mass,
                                        block_elements=block_elements, backend=backend))
    p3 = pattern.reshape(-1, n_q, n_k)
    s3 = None if scores is None else scores.reshape(-1, n_q, n_k)
    qn = q_norm.reshape(-1, n_q)
    n_b = p3.shape[0]
    if block_elements is None:  # at least _MIN_BLOCK_ROWS rows, so that long rows amortize the calls
        rows_per = max(CPU_BLOCK_ELEMENTS // max(1, n_b * n_k), -(-_MIN_BLOCK_ROWS // n_b))
    else:
        rows_per = max(1, block_elements // max(1, n_b * n_k))
    names = ("entropy", "n_visible", "max_attn", "k_eff_pr", "k_eff_top90", "local_gain") + _SINK_NAMES
    # blocks are float32: a float64 mask (≤ float64 min / 2) is −inf there; a half mask
    # (finfo(half).min, or −inf) is below finfo(half).min / 2 in float32 as in half
    thr = max(torch.finfo(s3.dtype).min, torch.finfo(torch.float32).min) / 2 if s3 is not None else 0.0
    if backend == "compiled":
        res = _capture_compiled(p3, s3, qn, thr, top_mass, rows_per)
        return {n: v.reshape(*lead, n_q) for n, v in res.items()}
    out = {n: torch.empty(n_b, n_q, dtype=torch.float32) for n in names}
    with torch.no_grad():
        for q0 in range(0, n_q, rows_per):
            q1 = min(n_q, q0 + rows_per)
            if not _fused_block(p3, s3, qn, q0, q1, out, thr, top_mass):
                _row_block(p3, s3, q0, q1, out, thr, top_mass, backend)
                _sink_block(p3, s3, qn, q0, q1, out, top_mass, backend)
    res = _row_results(out, p3, top_mass) | _sink_results(out, top_mass)
    return {n: v.reshape(*lead, n_q) for n, v in res.items()}


def _capture_compiled(p3, s3, qn, thr, top_mass, rows_per) -> dict[str, Tensor]:
    """`capture_row_metrics` by the compiled kernel (`spectra_lens.kernels.compiled`), row by row; the
    rows it flags (first key hidden; the rest underflowed) from the two functions' blocks."""
    n_b, n_q, _ = p3.shape
    kw = dict(thr=thr, floor=_SCORE_FLOOR, top_mass=top_mass, tol=_TOP_TOL, min_rest=_NOSINK_MIN_MASS)
    with torch.no_grad():
        Q = qn.detach().float().contiguous().numpy()
        if p3.dtype in _NUMPY_FLOATS and s3.dtype in _NUMPY_FLOATS:
            got, flag = compiled.capture_rows(p3.detach().contiguous().numpy(),
                                              s3.detach().contiguous().numpy(), Q, block_rows=rows_per,
                                              reuse=True, **kw)  # `got` is copied below
        else:
            got, flag = _compiled_by_block(p3, s3, Q, rows_per, kw)
        out = {n: torch.from_numpy(got[i]).to(torch.float32, copy=True) for i, n in enumerate(compiled.OUT_NAMES)}
        flag = torch.from_numpy(flag)
        for code, names in ((compiled.FLAG_ROW, compiled.OUT_NAMES), (compiled.FLAG_REST, _SINK_NAMES)):
            rows = flag == code
            if not rows.any():
                continue
            qs = rows.any(0).nonzero()[:, 0]
            tmp = {n: torch.empty(n_b, n_q, dtype=torch.float32) for n in compiled.OUT_NAMES}
            for q0 in range(int(qs[0]), int(qs[-1]) + 1, rows_per):
                q1 = min(n_q, q0 + rows_per)
                if code == compiled.FLAG_ROW:
                    _row_block(p3, s3, q0, q1, tmp, thr, top_mass, "numpy")
                _sink_block(p3, s3, qn, q0, q1, tmp, top_mass, "numpy")
            for n in names:
                out[n] = torch.where(rows, tmp[n], out[n])
    return _row_results(out, p3, top_mass) | _sink_results(out, top_mass)


def _compiled_by_block(p3, s3, Q, rows_per, kw) -> tuple[np.ndarray, np.ndarray]:
    """`compiled.capture_rows` on float32 copies of one query block at a time (inputs NumPy
    cannot hold, as bfloat16), each cut to the block's key extent: the whole pattern is never
    copied, and each block is read once. A float16 pattern's subnormal p are not used as the
    anchor of log p, and rests made of them come from the scores (`compiled.capture_rows`)."""
    n_b, n_q, n_k = p3.shape
    got = np.empty((len(compiled.OUT_NAMES), n_b, n_q))
    flag = np.empty((n_b, n_q), np.int8)
    size = n_b * min(rows_per, n_q) * n_k
    tiny = _subnormal_below(p3.dtype)
    buf_p, buf_s = torch.empty(size, dtype=torch.float32), torch.empty(size, dtype=torch.float32)
    for q0 in range(0, n_q, rows_per):
        q1 = min(n_q, q0 + rows_per)
        ext = _key_extent(s3, p3, q0, q1)
        shape, n = (n_b, q1 - q0, ext), n_b * (q1 - q0) * ext
        P = buf_p[:n].view(shape).copy_(p3[:, q0:q1, :ext]).numpy()
        S = buf_s[:n].view(shape).copy_(s3[:, q0:q1, :ext]).numpy()
        got[:, :, q0:q1], flag[:, q0:q1] = compiled.capture_rows(
            P, S, np.ascontiguousarray(Q[:, q0:q1]), block_rows=q1 - q0, n_keys=n_k,
            anchor=max(1e-30, tiny), rest_tiny=tiny, reuse=True, **kw)
    return got, flag


def _fused_block(p3, s3, qn, q0, q1, out, thr, top_mass) -> bool:
    """Every metric of `capture_row_metrics` for query rows [q0, q1) from one float32 read of
    the block; False (nothing written) where the first key is hidden in some row.

    With p = softmax(s) over the visible keys, s = log p + log Z there, so the local gain
    −Var_p(s) = −Σ p (log p + H)² needs no scores; the scores give the visible keys and the
    direction spread. Keys whose p underflows to 0 add nothing to either sum.
    """
    n_b, n_q, n_k = p3.shape
    ext = _key_extent(s3, p3, q0, q1)
    f32 = torch.float32
    rows = n_b * (q1 - q0)
    width = max(ext, 2)  # a second column (zero) where only the first key is in the block

    def block(x: Tensor, fill: float) -> np.ndarray:  # a float32 copy [rows, width]
        if width == ext:
            return x[:, q0:q1, :ext].to(f32, copy=True).reshape(rows, width).numpy()
        b = torch.full((n_b, q1 - q0, width), fill, dtype=f32)
        b[..., :ext] = x[:, q0:q1, :ext]
        return b.view(rows, width).numpy()

    P = block(p3, 0.0)
    if s3 is None:
        V = P > 0
    else:
        S = block(s3, torch.finfo(f32).min)
        V = S > thr
    if not V[:, 0].all():  # left padding: the first visible key is not key 0
        return False
    L = np.maximum(P, np.float32(torch.finfo(f32).tiny))
    np.log(L, out=L)
    if s3 is None:
        S = L
    else:
        np.maximum(S, _SCORE_FLOOR, out=S)  # −inf masks: finite, so that masking by product works
    # Each temporary is freed as soon as it is used, so that few block-sized arrays are alive at
    # once (the allocator's high-water mark, not only the time).
    n_vis = np.count_nonzero(V, axis=-1)
    P0 = P[:, 0]
    PL = P * L
    A1 = PL[:, 1:].sum(-1)  # Σ_{j≥1} p log p
    H = -(A1 + PL[:, 0])
    del PL
    B1 = np.einsum("ij,ij->i", P[:, 1:], P[:, 1:])  # Σ_{j≥1} p²
    R = P[:, 1:].sum(-1).astype(np.float64)  # the mass off the first key, summed directly
    E = S * V  # the logits, 0 at masked keys
    del S
    m_s = (E.sum(-1) / np.maximum(n_vis, 1)).astype(np.float32)
    E -= m_s[:, None]
    E *= V
    del V
    spread = np.sqrt(np.einsum("ij,ij->i", E, E) / np.maximum(n_vis, 1))
    del E
    # −Σ p (log p + H)², about the mean −H (the one-pass Σ p (log p)² − H² loses the small
    # variance of a long, nearly uniform row)
    L += H[:, None]
    np.square(L, out=L)
    gain = -np.einsum("ij,ij->i", P, L)
    del L
    if top_mass is not None:  # one sort of each row gives both top-mass counts and max_{j≥1}
        desc = np.negative(P)
        desc.sort(axis=-1)  # −p ascending
        # p_0 sits after the r0 keys larger than it (the first of them is max_{j≥1} p_j)
        r0 = torch.searchsorted(torch.from_numpy(desc), torch.from_numpy(-P0[:, None]))[:, 0].numpy()
        np.negative(desc, out=desc)  # p descending
        max1 = np.where(r0 > 0, desc[:, 0], desc[:, 1])
    else:
        max1 = P[:, 1:].max(-1)
    with np.errstate(divide="ignore", invalid="ignore"):  # undefined rows: NaN below
        Hn = -A1 / R + np.log(R)
        maxn = max1 / R
        prn = R * R / B1
    undefined = n_vis <= 1  # nothing visible after the first key
    got = {
        "entropy": H,
        "n_visible": n_vis,
        "max_attn": np.maximum(P0, max1),
        "k_eff_pr": 1.0 / (B1 + P0 * P0),
        "local_gain": gain,
        "entropy_ns": np.where(undefined, np.nan, Hn),
        "max_attn_ns": np.where(undefined, np.nan, maxn),
        "k_eff_pr_ns": np.where(undefined, np.nan, prn),
    }
    if top_mass is not None:
        lim = top_mass - _TOP_TOL
        lims = np.stack([np.full(rows, lim), lim * R, lim * R + P0], axis=-1)
        cnt = _top_counts_sorted(torch.from_numpy(desc), torch.from_numpy(lims)).numpy()
        # up to p_0's rank the rest's cumulative sums are the row's; after it, the row's one key
        # later minus p_0
        ns = np.where(cnt[:, 1] <= r0, cnt[:, 1], cnt[:, 2] - 1)
        ns = np.where((cnt[:, 1] > r0) & (cnt[:, 2] > ext), width + 1, ns)  # never reached
        # A rest below float64's resolution next to p_0 (p_0 the largest key and R < 1e-6):
        # its own cumulative sums, from the sorted row with p_0 (its first key) set to 0.
        tiny = ((r0 == 0) & (R < 1e-6) & ~undefined).nonzero()[0]
        if tiny.size:
            rest = desc[tiny].copy()
            rest[:, 0] = 0.0
            got_rest = _top_count_sorted(torch.from_numpy(rest), torch.from_numpy(lim * R[tiny])).numpy()
            ns[tiny] = got_rest - 1
        full = cnt[:, 0]
        got["k_eff_top90"] = np.where(full > ext, n_k, full)
        got["k_eff_top90_ns"] = np.where(undefined, np.nan, np.where(ns > ext, n_k, ns))
    else:
        got["k_eff_top90"] = np.full(rows, np.nan)
        got["k_eff_top90_ns"] = np.full(rows, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero query norm: inf or NaN
        got["dir_spread"] = spread / _f32(qn[:, q0:q1]).reshape(rows).numpy()
    for n, v in got.items():
        out[n][:, q0:q1] = torch.from_numpy(np.asarray(v, dtype=np.float32)).view(n_b, q1 - q0)
    # the rest underflowed in p, or is made of float16 subnormals: from the scores
    lost = ~undefined & ((R < _NOSINK_MIN_MASS) | (R < _subnormal_below(p3.dtype) * n_vis))
    if lost.any():
        tmp = {n: out[n][:, q0:q1].clone() for n in _SINK_NAMES}
        _sink_block(p3, s3, qn, q0, q1, out, top_mass, "numpy")
        keep = torch.from_numpy(~lost).view(n_b, q1 - q0)
        for n in _SINK_NAMES:
            out[n][:, q0:q1] = torch.where(keep, tmp[n], out[n][:, q0:q1])
    return True


def _sink_excluded_metrics_whole(pattern, scores, q_norm, *, top_mass=0.9):
    """`sink_excluded_metrics` by the single-metric functions on the whole tensor (the reference)."""
    if scores is None:
        visible = pattern > 0
        scores = logits_from_pattern(pattern)
    else:
        visible = visible_from_scores(scores)
    rest = without_first_key(scores, visible)
    h = entropy(rest)
    undefined = torch.isnan(h)
    if top_mass is None:
        top = torch.full_like(h, torch.nan)
    else:
        top = k_eff_top_mass(rest.nan_to_num(0.0), mass=top_mass).masked_fill(undefined, torch.nan)
    return {
        "entropy_nosink": h,
        "max_attn_nosink": max_attention(rest),
        "k_eff_exp_nosink": k_eff_exp(h),
        "k_eff_pr_nosink": k_eff_participation(rest),
        "k_eff_top90_nosink": top,
        "dir_spread": direction_spread(scores, visible, q_norm),
    }

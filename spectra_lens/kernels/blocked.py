"""The blocked engines: every metric of `spectra_lens.metrics` in query blocks over the visible keys.

Each function equals the definitions of `spectra_lens.metrics` applied to the whole tensor (tested
in tests/capture/test_kernels_*.py) but reads a block of query rows at a time, over the keys that
some row of the block sees (under a causal mask about half of them), so its temporaries are the
size of a block, not of the pattern. `backend` picks the implementation of a block: "numpy" (the
CPU default: NumPy's vectorized sort and row dots) or "torch" (any device).
"""

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from spectra_lens.errors import SpectraError
from spectra_lens.metrics import (
    SWEEP_METRICS,
    _f32,
    direction_spread,
    logits_from_pattern,
    visible_from_scores,
    without_first_key,
)

__all__ = [
    "ALPHA_CHUNK_ELEMENTS",
    "CPU_BLOCK_ELEMENTS",
    "DEVICE_BLOCK_ELEMENTS",
    "local_gain_under",
    "pattern_metrics",
    "query_blocks",
    "row_metrics",
    "sink_excluded_metrics",
    "sorted_row_metrics",
]

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


def local_gain_under(
    pattern: Float[Tensor, "*batch key_pos"],
    scores: Float[Tensor, "*batch key_pos"],
    visible: Bool[Tensor, "*batch key_pos"],
) -> Float[Tensor, "*batch"]:
    """`metrics.local_gain_under` (−Var_p(s) under the model's own pattern). On the CPU,
    [..., query, key] tensors go in blocks of query rows over the keys that some row of the
    block sees (`query_blocks`: under a causal mask about half of the keys).
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

    Equal to the single-metric functions of `spectra_lens.metrics` (`entropy`, `normalized_entropy`,
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
        raise SpectraError(f"top_mass must be in (0, 1] or None, got {top_mass!r}")
    lead, (n_q, n_k) = pattern.shape[:-2], pattern.shape[-2:]
    p3 = pattern.reshape(-1, n_q, n_k)
    s3 = None if scores is None else scores.reshape(-1, n_q, n_k)
    device = pattern.device
    if backend is None:
        backend = "numpy" if device.type == "cpu" else "torch"
    if backend not in ("numpy", "torch") or (backend == "numpy" and device.type != "cpu"):
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
    (`metrics.sink_excluded` is that reference; tested).
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

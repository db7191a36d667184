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

import torch
from jaxtyping import Bool, Float
from torch import Tensor

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
    cum = p.sort(dim=-1, descending=True).values.cumsum(-1)
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
    """
    p = _f32(pattern)
    s0 = _f32(scores).masked_fill(~visible, 0.0)
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
    `row_weight` (padding), which the mean leaves out.
    """
    alphas = check_alphas(alphas)
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
    rows of weight 0 in `row_weight` (padding) are left out."""
    p = pattern.float()
    visible = p > 0 if visible is None else visible
    n_q = p.shape[-2] if row_weight is None else row_weight.sum(-1)
    sums = {n: p.new_zeros(p.shape[:-2]) for n in SWEEP_METRICS}
    for rows, n_keys in query_blocks(visible):
        ps = p[..., rows, :n_keys].sort(dim=-1, descending=True).values
        for n, v in sorted_row_metrics(ps, None).items():
            sums[n] += _row_sum(v, row_weight, rows)
    return {n: v / n_q for n, v in sums.items()}



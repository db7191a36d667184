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


import torch
from jaxtyping import Bool, Float
from torch import Tensor

from spectra_lens.errors import SpectraError
from spectra_lens.validate import check_alpha

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
    "without_first_key",
    "direction_spread",
    "sink_excluded",
    "log_position_bin",
    "counterfactual_entropy",
    "K_EFF_DEFINITIONS",
    "SWEEP_METRICS",
    "ROW_METRICS",
    "CAPTURE_ROW_METRICS",
    "TOKEN_METRICS",
]

# --------------------------------------------------------------------------- the registry of names

K_EFF_DEFINITIONS: dict[str, str] = {
    "k_eff_exp": "exp(H): the perplexity of the attention distribution",
    "k_eff_pr": "1 / sum_j p_j^2: the participation ratio",
    "k_eff_top90": "the fewest top keys whose attention sums to at least 0.9",
}

# The metrics of an α-sweep (per-sequence means over query rows of p(α) = softmax(α·s)).
SWEEP_METRICS: tuple[str, ...] = ("entropy", "max_attn", "k_eff_exp", "k_eff_pr", "k_eff_top90")

# The per-query metrics of one pattern and its scores (`kernels.blocked.row_metrics`).
ROW_METRICS: tuple[str, ...] = (
    "entropy", "entropy_norm", "max_attn", "k_eff_exp", "k_eff_pr", "k_eff_top90",
    "sink_mass", "local_gain",
)

#: `ROW_METRICS` and those of the pattern without its first key (`sink_excluded`): the row
#: metrics of a capture (`kernels.fused.capture_row_metrics`).
CAPTURE_ROW_METRICS: tuple[str, ...] = ROW_METRICS + (
    "entropy_nosink", "max_attn_nosink", "k_eff_exp_nosink", "k_eff_pr_nosink",
    "k_eff_top90_nosink", "dir_spread",
)

#: Every per-token metric of a capture (`capture.TokenMetrics`): the norms of the effective query
#: and key, then `CAPTURE_ROW_METRICS`.
TOKEN_METRICS: tuple[str, ...] = ("q_norm", "k_norm") + CAPTURE_ROW_METRICS


# --------------------------------------------------------------------------- definitions


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
    (`kernels.blocked.local_gain_under` computes it in query blocks over the visible keys.)
    """
    p, s = _f32(pattern), _f32(scores)
    s0 = torch.where(visible, s, 0.0)
    mean = (p * s0).sum(-1, keepdim=True)
    return -(p * (s0 - mean).square()).sum(-1)


def rescale_pattern(
    pattern: Float[Tensor, "*batch key_pos"], alpha: float
) -> Float[Tensor, "*batch key_pos"]:
    """p(α)_j = p_j^α / sum_k p_k^α = softmax(α·s)_j: the pattern at query scale α, from p alone."""
    alpha = check_alpha(alpha)
    logp = torch.log(_f32(pattern))
    return torch.softmax(alpha * logp, dim=-1)



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



def sink_excluded(
    pattern: Float[Tensor, "*batch query_pos key_pos"],
    scores: Float[Tensor, "*batch query_pos key_pos"] | None,
    q_norm: Float[Tensor, "*batch query_pos"],
    *,
    top_mass: float | None = 0.9,
) -> dict[str, Float[Tensor, "*batch query_pos"]]:
    """The metrics of the pattern without the first key, and the direction spread of the logits.

    `entropy_nosink`, `max_attn_nosink`, `k_eff_exp_nosink`, `k_eff_pr_nosink`,
    `k_eff_top90_nosink` are `entropy`, `max_attention`, `k_eff_exp`, `k_eff_participation`,
    `k_eff_top_mass` of `without_first_key` (NaN at query position 0, which sees only the first
    key; k_eff_top90_nosink NaN throughout when `top_mass` is None); `dir_spread` is
    `direction_spread`. Without `scores` the visible keys are p > 0 and the logits log p.
    (`kernels.blocked.sink_excluded_metrics` computes the same in query blocks.)
    """
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


# --------------------------------------------------------------------------- the norm counterfactual


def log_position_bin(position: Tensor) -> Tensor:
    """b = ⌊log2(t + 1)⌋ for position t ≥ 0 (int64): octaves of t + 1, the bins of log position.

    t = 0 is bin 0, t ∈ {1, 2} bin 1, t ∈ [3, 6] bin 2, [7, 14] bin 3, … : the entropy bound
    log(t + 1) changes by at most ln 2 inside a bin. Computed exactly on integers (the bit
    length of t + 1, minus one), never through a floating-point logarithm.
    """
    t = torch.as_tensor(position)
    if t.dtype.is_floating_point or (t < 0).any():
        raise SpectraError(f"positions must be integers >= 0, got {t.dtype} values "
                           f"{t.flatten()[:5].tolist()}")
    v = t.to(torch.int64) + 1
    b = torch.zeros_like(v)
    while bool((v > 1).any()):
        b += (v > 1).to(torch.int64)
        v = v // 2
    return b


def counterfactual_entropy(
    scores: Float[Tensor, "*batch key_pos"],
    visible: Bool[Tensor, "*batch key_pos"],
    alpha: Float[Tensor, "*batch"],
) -> Float[Tensor, "*batch"]:
    """H(softmax(α_i · s_i)) per row i, one α per row: the entropy the row would have if its query
    were scaled by α_i in the forward pass (a bilinear layer: the logits scale with the query).

    The exact norm counterfactual takes α_i = r / ‖q_i‖ (r the head's reference norm,
    `spectra_lens.reference.ReferenceNorm`): the query keeps its direction and has norm r.
    `scores` may be shifted by any per-row constant (log p works). In float64; returned in float32.
    (`kernels.alpha.row_alpha_entropy` computes it in query blocks.)
    """
    s = scores.double()
    a = torch.as_tensor(alpha, device=s.device).double()[..., None]
    logp = torch.log_softmax((a * s).masked_fill(~visible, float("-inf")), dim=-1)
    return (-(logp.exp() * logp.masked_fill(~visible, 0.0)).sum(-1)).float()

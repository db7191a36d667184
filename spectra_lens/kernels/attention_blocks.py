"""Attention in query blocks, with every per-row metric of the capture, never holding a T×T pattern.

`attention_blocks(q, k, v, scale=...)` computes one layer's causal attention output and the
per-query-row metrics of `spectra_lens.metrics.capture_row_metrics` (the function the eager
capture applies to `hook_pattern`) one block of query rows at a time. A block of rows
[q0, q1) needs only the keys [0, q1) (causal), so the scores and probabilities held at once are
[batch, head, rows, q1]: peak memory O(block × T), not O(T²).

For query i and key j (query head h reads kv head h // (n_heads // n_kv_heads), the
`repeat_interleave` grouping of Hugging Face and TransformerLens):

    s_ij = scale · q_i·k_j                      (the model's score scale, e.g. 1/√d_head)
    s_ij ← cap · tanh(s_ij / cap)               (logit soft-capping, when `softcap` is given)
    s_ij ← s_ij + slope_h · j                   (ALiBi, when `alibi_slopes` is given)
    p_i  = softmax over the visible keys of s_i (masked keys: p = 0; s = finfo(float32).min)
    z_i  = Σ_j p_ij v_j

in the same order of operations as the bridge's eager attention, so that the scores, the
pattern and the output agree with `hook_attn_scores`, `hook_pattern` and `hook_z` to rounding.
The row metrics are `metrics.capture_row_metrics(p, s, ‖q‖)` of each block: the same function,
hence the same definitions, as the eager capture (entropy, its normalization, max attention,
the three k_eff, sink mass, the local gain −Var_p(s), the `_nosink` metrics, the direction
spread).
"""

import math

import torch
from torch import Tensor

from spectra_lens import metrics as M
from spectra_lens.errors import SpectraError
from spectra_lens.kernels.alpha import row_alpha_entropy
from spectra_lens.kernels.fused import capture_row_metrics

__all__ = ["BLOCK_ELEMENTS", "attention_blocks", "block_rows"]

#: Score entries [batch, head, rows, keys] per query block (2**22 floats = 16 MiB; the block's
#: probabilities, its metrics' temporaries and the float32 copies add a few times that).
BLOCK_ELEMENTS = 2**22


def block_rows(n_rows_total: int, batch: int, n_heads: int, n_keys: int, block_elements: int) -> int:
    """Query rows per block so that batch × heads × rows × keys ≤ block_elements (at least 1)."""
    return max(1, min(n_rows_total, block_elements // max(1, batch * n_heads * n_keys)))


def _check(q: Tensor, k: Tensor, v: Tensor, where: str) -> tuple[int, int, int, int, int]:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise SpectraError(f"{where}: q, k, v must be [batch, pos, head, d_head], got shapes "
                           f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, n, h, d = q.shape
    if k.shape[:2] != (b, n) or v.shape[:3] != k.shape[:3] or k.shape[3] != d:
        raise SpectraError(f"{where}: k [batch, pos, kv_head, d_head] and v [batch, pos, kv_head, d_v] "
                           f"must match q {tuple(q.shape)}; got {tuple(k.shape)} and {tuple(v.shape)}")
    n_kv = k.shape[2]
    if h % n_kv:
        raise SpectraError(f"{where}: n_heads ({h}) is not a multiple of n_kv_heads ({n_kv})")
    return b, n, h, n_kv, d


def _mask_bias(mask: Tensor | None, q0: int, q1: int, sliding_window: int | None, device,
               where: str) -> tuple[Tensor | None, int, Tensor | None]:
    """The additive mask of query rows [q0, q1) over keys [k0, q1): (bias, k0, empty rows).

    bias is 0 at visible keys and finfo(float32).min at hidden ones (s + min rounds to min for
    any |s| < 1e31, the value the eager bridge writes there), shaped [batch | 1, head | 1, rows,
    q1 - k0]; None where nothing is hidden. Without a mask only the causal triangle of the
    block's last keys (k0 = q0) is hidden, or the sliding window. Keys ≥ q1 are checked to be
    hidden (causal). `empty` [batch | 1, head | 1, rows] marks rows that see no key (padding
    queries); their key 0 is made visible as a placeholder (the caller drops those rows).
    """
    masked = torch.finfo(torch.float32).min
    if mask is None:
        i = torch.arange(q0, q1, device=device)[:, None]
        if sliding_window is None or q1 - 1 - sliding_window < 0:
            j = torch.arange(q0, q1, device=device)[None, :]
            return torch.zeros(q1 - q0, q1 - q0, device=device).masked_fill_(j > i, masked), q0, None
        j = torch.arange(q1, device=device)[None, :]
        hidden = (j > i) | (j <= i - sliding_window)  # Hugging Face's window: kv_idx > q_idx − window
        return torch.zeros(q1 - q0, q1, device=device).masked_fill_(hidden, masked), 0, None
    m = mask[..., q0:q1, :]
    if m.dtype == torch.bool:
        vis, later = m[..., :q1], m[..., q1:]
    else:  # additive: 0 where visible, ≤ finfo.min / 2 where masked
        thr = torch.finfo(m.dtype).min / 2
        vis, later = m[..., :q1] > thr, m[..., q1:] > thr
        if bool((m[..., :q1].masked_fill(~vis, 0) != 0).any()):
            raise SpectraError(f"{where}: the attention mask adds a bias to visible scores; expected "
                               f"0 (visible) or the dtype's minimum (masked)")
    if bool(later.any()):
        raise SpectraError(f"{where}: the attention mask lets a query see a later key; expected causal "
                           f"attention")
    empty = ~vis.any(-1)
    if bool(empty.any()):
        vis = vis.clone()
        vis[..., 0] |= empty
    else:
        empty = None
    return torch.zeros(vis.shape, device=device).masked_fill_(~vis, masked), 0, empty


def attention_blocks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    mask: Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    metrics: bool = True,
    top_mass: float | None = 0.9,
    sink_index: Tensor | None = None,
    q_norm: Tensor | None = None,
    cf_alpha: Tensor | None = None,
    block_elements: int = BLOCK_ELEMENTS,
    layer: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One layer's causal attention and its per-query-row metrics, in query blocks.

    q [batch, pos, n_heads, d] and k [batch, pos, n_kv, d] are the effective query and key (the
    vectors that enter the dot product: after QK-norm and rotary), v [batch, pos, n_kv, d_v];
    query head h reads kv head h // (n_heads // n_kv). `scale` multiplies q·k (the model's own,
    e.g. 1/√d). `mask`: None (causal, and `sliding_window` keys back when given) or the model's
    4-D mask [batch | 1, head | 1, pos, pos], bool (True = visible) or additive (0 / ≤ min / 2).
    `softcap`: logits capped as cap · tanh(s / cap) (Gemma 2). `alibi_slopes` [n_heads]: the
    bias slope_h · j on key j (unpadded rows). Rows that see no key (padding queries) give a
    zero output and metrics that are not meaningful (the caller sets them NaN).

    Returns z [batch, pos, n_heads, d_v] (the layout of `hook_z`) and, with `metrics`, the
    `metrics.CAPTURE_ROW_METRICS` of every query row, each [batch, n_heads, pos], computed by
    `metrics.capture_row_metrics` on each block (top_mass None: k_eff_top90 NaN). `sink_index`
    [batch]: the key whose mass is `sink_mass` in each row of the batch (the first real token
    under left padding; key 0 when None). `q_norm` [batch, n_heads, pos]: ‖q‖ for the direction
    spread (computed from q when None). `cf_alpha` [batch, n_heads, pos]: with `metrics`, also
    "entropy_cf" = H(softmax(α_i·s_i)) of every row (`kernels.alpha.row_alpha_entropy` on each
    block's scores; the norm counterfactual where α = r/‖q‖ and the scores are bilinear in q).
    Peak memory: a few blocks of `block_elements` scores.
    """
    where = "attention" if layer is None else f"layer {layer}"
    b, n, h, n_kv, d = _check(q, k, v, where)
    if not (isinstance(scale, float | int) and math.isfinite(scale) and scale > 0):
        raise SpectraError(f"{where}: scale must be a finite number > 0, got {scale!r}")
    if softcap is not None and not softcap > 0:
        raise SpectraError(f"{where}: softcap must be > 0 or None, got {softcap!r}")
    if mask is not None and (mask.ndim != 4 or mask.shape[-1] != n or mask.shape[-2] != n
                             or mask.shape[0] not in (1, b) or mask.shape[1] not in (1, h)):
        raise SpectraError(f"{where}: mask must be [batch | 1, head | 1, {n}, {n}], got {tuple(mask.shape)}")
    if alibi_slopes is not None and tuple(alibi_slopes.shape) != (h,):
        raise SpectraError(f"{where}: alibi_slopes must be [n_heads] = ({h},), got {tuple(alibi_slopes.shape)}")
    g = h // n_kv
    device = q.device
    qh = q.permute(0, 2, 1, 3).reshape(b, n_kv, g, n, d)  # [b, kv, group, pos, d]
    kh = k.permute(0, 2, 3, 1)  # [b, kv, d, pos]
    vh = v.permute(0, 2, 1, 3)  # [b, kv, pos, d_v]
    d_v = v.shape[-1]
    z = torch.empty(b, n, h, d_v, dtype=v.dtype, device=device)
    out: dict[str, Tensor] = {}
    if metrics:
        if q_norm is None:
            q_norm = M.vector_norm(q).transpose(1, 2)
        out = {name: torch.empty(b, h, n, dtype=torch.float32, device=device) for name in M.CAPTURE_ROW_METRICS}
        if cf_alpha is not None:
            if tuple(cf_alpha.shape) != (b, h, n):
                raise SpectraError(f"{where}: cf_alpha must be [batch, n_heads, pos] = {(b, h, n)}, "
                                   f"got {tuple(cf_alpha.shape)}")
            out["entropy_cf"] = torch.empty(b, h, n, dtype=torch.float32, device=device)
    f32 = torch.float32
    rows = block_rows(n, b, h, n, block_elements)
    with torch.no_grad():
        for q0 in range(0, n, rows):
            q1 = min(n, q0 + rows)
            # scores in the inputs' dtype, as the eager bridge computes them: (q @ kᵀ) · scale;
            # one GEMM per kv head over its group's rows stacked (a broadcast over the group would
            # copy the block's keys once per query head)
            qb = qh[:, :, :, q0:q1].reshape(b, n_kv, g * (q1 - q0), d)
            s = torch.matmul(qb, kh[:, :, :, :q1]).mul_(scale)  # [b, kv, g·r, q1]
            s = s.view(b, h, q1 - q0, q1)
            if softcap is not None:
                s = s.div_(softcap).tanh_().mul_(softcap)
            s = s.to(f32)
            if alibi_slopes is not None:
                s = s + alibi_slopes.to(device, f32)[:, None, None] * torch.arange(q1, device=device, dtype=f32)
            bias, k0, empty = _mask_bias(mask, q0, q1, sliding_window, device, where)
            s[..., k0:].add_(bias)
            p = torch.softmax(s, dim=-1)  # exp(min − max) = 0 at hidden keys
            zb = torch.matmul(p.to(v.dtype).view(b, n_kv, g * (q1 - q0), q1), vh[:, :, :q1])
            zb = zb.view(b, h, q1 - q0, d_v)
            if empty is not None:  # padding queries: no output
                zb = zb.masked_fill(empty.expand(b, h, q1 - q0)[..., None], 0.0)
            z[:, q0:q1] = zb.transpose(1, 2)
            if metrics:
                got = capture_row_metrics(p, s, q_norm[:, :, q0:q1], top_mass=top_mass)
                if sink_index is not None:
                    idx = sink_index.to(device).view(b, 1, 1, 1).expand(b, h, q1 - q0, 1)
                    got["sink_mass"] = p.gather(-1, idx.clamp_max(q1 - 1)).squeeze(-1).masked_fill(
                        idx.squeeze(-1) >= q1, 0.0)
                for name in M.CAPTURE_ROW_METRICS:
                    out[name][:, :, q0:q1] = got[name]
                if cf_alpha is not None:
                    out["entropy_cf"][:, :, q0:q1] = row_alpha_entropy(
                        s, M.visible_from_scores(s), cf_alpha[:, :, q0:q1].to(device))
            del s, p, zb
    return z, out

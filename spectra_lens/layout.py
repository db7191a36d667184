"""The attention layout of a loaded bridge: `AttentionLayout` and `attention_layout(model)`.

The layout is not read from a table of model names: it comes from the bridge's config plus two
forward passes of a few tokens: one that finds which hook carries the effective query and key
(the vectors that enter the dot product), and one batched pass that checks, layer by layer, that
scaling them scales the attention logits (one batch row per layer, ending at the last layer's
pattern: on the default model about a tenth of the first call's time before this batching). It
is derived once per model (cached in memory, per bridge object) and passed down to everything
that needs it.
"""

import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from spectra_lens.errors import SpectraError

__all__ = ["AttentionLayout", "attention_layout", "hook_name"]


def hook_name(layer: int, kind: str) -> str:
    """The TransformerLens hook name of attention hook `kind` (e.g. "rot_q", "pattern") in `layer`."""
    return f"blocks.{layer}.attn.hook_{kind}"





@dataclass(frozen=True)
class AttentionLayout:
    """How attention is laid out in a bridge, and where it can be measured and scaled.

    `q_kind` / `k_kind` name the hooks (`hook_name(layer, kind)`) holding the effective query
    and key: the vectors that enter the dot product, after QK-norm and rotary where present
    (rotary is a rotation, so it preserves norms and commutes with scaling). `q_bilinear[l]` is
    True when the probe saw layer l's logits scale exactly with the query (no ALiBi, no
    soft-capping, no normalization after the scaling point); `q_reason[l]` says why not.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    q_kind: str
    k_kind: str
    scores_faithful: bool  # softmax(hook_attn_scores) == hook_pattern in every layer
    score_scale: tuple[float | None, ...]  # s / (q·k) per layer where q·k reproduces s, else None
    q_bilinear: tuple[bool, ...]
    k_bilinear: tuple[bool, ...]
    q_reason: tuple[str | None, ...]
    k_reason: tuple[str | None, ...]
    pattern_editable: bool  # editing hook_pattern changes the model's output

    @property
    def group_size(self) -> int:
        """Query heads per kv head."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """The kv head a query head reads: h // (n_heads // n_kv_heads) (repeat_interleave)."""
        self.check_head(0, head)
        return head // self.group_size

    def heads_of_kv(self, kv_head: int) -> tuple[int, ...]:
        """The query heads that share kv head `kv_head`."""
        if not 0 <= kv_head < self.n_kv_heads:
            raise SpectraError(f"kv head must be in [0, {self.n_kv_heads}), got {kv_head}")
        g = self.group_size
        return tuple(range(kv_head * g, (kv_head + 1) * g))

    def kv_index(self) -> torch.Tensor:
        """LongTensor [n_heads]: kv head of each query head."""
        return torch.arange(self.n_heads) // self.group_size

    def check_head(self, layer: int, head: int) -> None:
        """Raise SpectraError unless (layer, head) exists."""
        if not (isinstance(layer, int) and 0 <= layer < self.n_layers):
            raise SpectraError(f"layer must be an int in [0, {self.n_layers}), got {layer!r}")
        if not (isinstance(head, int) and 0 <= head < self.n_heads):
            raise SpectraError(f"head must be an int in [0, {self.n_heads}), got {head!r}")

    def q_hook(self, layer: int) -> str:
        return hook_name(layer, self.q_kind)

    def k_hook(self, layer: int) -> str:
        return hook_name(layer, self.k_kind)

    def _repr_html_(self) -> str:
        import pandas as pd

        from spectra_lens.present.display import html_card

        odd = [(l, self.q_reason[l] or "", self.k_reason[l] or "") for l in range(self.n_layers)
               if not (self.q_bilinear[l] and self.k_bilinear[l])]
        tables = {"layers not bilinear in q or k": pd.DataFrame(odd, columns=["layer", "q", "k"])} if odd else {}
        return html_card("AttentionLayout", {
            "layers × heads": f"{self.n_layers} × {self.n_heads}",
            "kv heads": f"{self.n_kv_heads} ({self.group_size} query heads each)",
            "d_head": self.d_head,
            "effective q / k hook": f"hook_{self.q_kind} / hook_{self.k_kind}",
            "bilinear in q (fast path)": f"{sum(self.q_bilinear)} of {self.n_layers} layers",
            "hook_attn_scores faithful": self.scores_faithful,
            "hook_pattern editable": self.pattern_editable,
        }, tables)

    def fast_path_ok(self, layer: int) -> bool:
        """softmax(α·s) of the unscaled logits is the pattern under query scale α in `layer`."""
        return self.q_bilinear[layer]


_LAYOUTS: "weakref.WeakKeyDictionary[Any, AttentionLayout]" = weakref.WeakKeyDictionary()


def attention_layout(model) -> AttentionLayout:
    """The AttentionLayout of a bridge, derived once (config + a probe forward) and cached."""
    try:
        return _LAYOUTS[model]
    except (KeyError, TypeError):
        pass
    layout = _derive_layout(model)
    try:
        _LAYOUTS[model] = layout
    except TypeError:
        pass
    return layout


def _cfg_int(cfg, *names) -> int | None:
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


class _ProbeDone(Exception):
    """Raised by the probe's hook on the last layer's pattern: nothing after it is needed."""


# Probe sizes: a handful of positions gives every query row several keys to spread over, and
# keeps the batched probe (1 + n_layers rows of them) to a fraction of one ordinary forward pass.
_PROBE_POS = 6
_PROBE_ALPHA = 2.0


def _probe_tokens(model, cfg, device) -> torch.Tensor:
    vocab = _cfg_int(cfg, "d_vocab") or 100
    gen = torch.Generator().manual_seed(0)
    return torch.randint(min(vocab, 1000), (1, _PROBE_POS), generator=gen).to(device)


def _observe(model, names: list[str], tokens) -> tuple[dict[str, torch.Tensor], bool]:
    """One forward pass of two copies of `tokens`: every hook of `names` that fires, as seen by
    row 0, and whether replacing row 1's layer-0 pattern by uniform attention changes its logits
    (`hook_pattern` editable; on some bridges it is only observed)."""
    seen: dict[str, torch.Tensor] = {}

    # hook.name is the canonical name (e.g. "attn.q.hook_out" for the alias "attn.hook_q"),
    # so each hook function is bound to the name it was registered under.
    def saver(name):
        def save(x, hook):
            seen[name] = x[:1].detach()

        return save

    def uniform(x, hook):
        out = x.clone()
        causal = torch.tril(torch.ones_like(x[1]))
        out[1] = causal / causal.sum(-1, keepdim=True)
        return out

    points = model.hook_dict  # the bridge rebuilds it on every access (~1 ms on the default)
    names = [n for n in names if n in points]
    hooks = [(n, saver(n)) for n in names] + [(hook_name(0, "pattern"), uniform)]
    # On observe-only bridges TransformerLens warns that the edit is discarded: that is exactly
    # what this probe asks, so the warning is not the user's concern.
    with torch.no_grad(), warnings.catch_warnings(), model.hooks(fwd_hooks=hooks):
        warnings.filterwarnings("ignore", message=".*returned a modified tensor.*")
        logits = model(tokens.repeat(2, 1), return_type="logits").float()
    tol = 1e-4 * (1.0 + float(logits[0].abs().max()))
    editable = bool((logits[1] - logits[0]).abs().max() > tol)
    return seen, editable


def _derive_layout(model) -> AttentionLayout:
    """Two forward passes of a few tokens: `_observe` (which hooks fire, their shapes, the scores'
    scale, pattern editability), then `_probe_scaling` (bilinearity of every layer in q and in k,
    one batch row per layer, ending at the last layer's pattern)."""
    cfg = model.cfg
    n_layers = _cfg_int(cfg, "n_layers")
    n_heads = _cfg_int(cfg, "n_heads")
    n_kv = _cfg_int(cfg, "n_key_value_heads") or n_heads
    d_head = _cfg_int(cfg, "d_head")
    if None in (n_layers, n_heads, d_head):
        raise SpectraError(f"the bridge's config lacks n_layers/n_heads/d_head: {cfg!r}")
    if n_heads % n_kv:
        raise SpectraError(f"n_heads ({n_heads}) is not a multiple of n_kv_heads ({n_kv})")
    device = next(model.parameters()).device
    tokens = _probe_tokens(model, cfg, device)
    n_pos = tokens.shape[1]

    kinds = ["q", "rot_q", "k", "rot_k", "attn_scores", "pattern"]
    names = [hook_name(l, k) for l in range(n_layers) for k in kinds]
    seen, pattern_editable = _observe(model, names, tokens)
    for l in range(n_layers):
        for k in ("q", "k", "pattern"):
            if hook_name(l, k) not in seen:
                raise SpectraError(f"hook {hook_name(l, k)} did not fire; this bridge is unsupported")
    # The effective query is the last hook before the dot product: rot_q when it fires.
    q_kind = "rot_q" if hook_name(0, "rot_q") in seen else "q"
    k_kind = "rot_k" if hook_name(0, "rot_k") in seen else "k"
    expected = {
        q_kind: (1, n_pos, n_heads, d_head),
        k_kind: (1, n_pos, n_kv, d_head),
        "pattern": (1, n_heads, n_pos, n_pos),
    }
    for l in range(n_layers):
        for kind, shape in expected.items():
            got = tuple(seen[hook_name(l, kind)].shape)
            if got != shape:
                raise SpectraError(
                    f"{hook_name(l, kind)}: expected shape {shape} [batch, ...], got {got}"
                )

    tol = probe_tolerance(seen[hook_name(0, "pattern")].dtype)
    scores_faithful = all(
        hook_name(l, "attn_scores") in seen
        and torch.allclose(
            torch.softmax(seen[hook_name(l, "attn_scores")].float(), -1),
            seen[hook_name(l, "pattern")].float(), atol=tol,
        )
        for l in range(n_layers)
    )
    kv_idx = torch.arange(n_heads, device=device) // (n_heads // n_kv)
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool, device=device).tril()
    score_scale: list[float | None] = []
    for l in range(n_layers):
        if not scores_faithful:
            score_scale.append(None)
            continue
        q = seen[hook_name(l, q_kind)][0].float()
        k = seen[hook_name(l, k_kind)][0].float()[:, kv_idx]
        dot = torch.einsum("qhd,khd->hqk", q, k)[:, causal]
        s = seen[hook_name(l, "attn_scores")][0].float()[:, causal]
        c = (s * dot).sum() / (dot * dot).sum()
        ok = torch.allclose(c * dot, s, atol=tol * float(s.abs().max()) + 1e-6)
        score_scale.append(float(c) if ok else None)

    (q_bilinear, q_reason), (k_bilinear, k_reason) = _probe_scaling(
        model, tokens, seen, q_kind, k_kind, n_layers, n_heads, kv_idx)
    # Config facts that a probe with small logits could miss.
    cap = getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0
    config_reason = None
    if getattr(cfg, "positional_embedding_type", None) == "alibi":
        config_reason = "ALiBi adds a position bias to the logits"
    elif cap > 0:
        config_reason = f"attention logits are soft-capped (cap={cap})"
    if config_reason:
        q_bilinear = [False] * n_layers
        k_bilinear = [False] * n_layers
        q_reason = [config_reason] * n_layers
        k_reason = [config_reason] * n_layers

    return AttentionLayout(
        n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, d_head=d_head,
        q_kind=q_kind, k_kind=k_kind, scores_faithful=scores_faithful,
        score_scale=tuple(score_scale),
        q_bilinear=tuple(q_bilinear), k_bilinear=tuple(k_bilinear),
        q_reason=tuple(q_reason), k_reason=tuple(k_reason),
        pattern_editable=pattern_editable,
    )


def probe_tolerance(dtype: torch.dtype) -> float:
    """Absolute tolerance of the layout probes' comparisons of attention probabilities (and,
    relative to the largest logit, of logits): 1e-4, or the dtype's machine epsilon where that is
    larger. In half precision the pattern is itself rounded: on the default model a bfloat16
    pattern differs from the softmax of its own scores by up to 2.0e-3 (float16: 2.4e-4), a
    quarter of the epsilon, and the bilinearity probe's prediction by up to 2.8e-3 (float16:
    3.6e-4); a tolerance of 1e-4 there called every layer unfaithful and not bilinear."""
    return max(1e-4, float(torch.finfo(dtype).eps)) if dtype.is_floating_point else 1e-4


def _probe_scaling(model, tokens, seen, q_kind, k_kind, n_layers, n_heads, kv_idx):
    """Is each layer's logit bilinear in q and in k? One batched pass: row 0 unscaled; in row
    1 + l, layer l's query head 0 is scaled by 2 at `q_kind` and its last kv head at `k_kind`
    (two disjoint sets of query heads; with a single kv head the key gets rows of its own,
    1 + n_layers + l). Layer l's inputs in those rows are row 0's, so in a bilinear layer each
    scaled head's pattern must be softmax(2 · log p) of row 0's, and every other head's must be
    unchanged. The pass ends at the last layer's pattern.
    Returns ((q_ok, q_reasons), (k_ok, k_reasons))."""
    alpha = _PROBE_ALPHA
    tol = 2 * probe_tolerance(seen[hook_name(0, "pattern")].dtype)
    n_kv = int(kv_idx.max()) + 1
    k_target = n_kv - 1  # the last kv head: none of its query heads is head 0 when n_kv > 1
    shared = n_kv > 1
    batch = tokens.repeat(1 + (1 if shared else 2) * n_layers, 1)
    pats: dict[int, torch.Tensor] = {}

    def make(layer):
        q_row = 1 + layer
        k_row = q_row if shared else 1 + n_layers + layer
        rows = torch.tensor([0, q_row, k_row], device=tokens.device)

        def scale(row, head):
            def fn(x, hook):
                out = x.clone()
                out[row, :, head] = out[row, :, head] * alpha
                return out

            return fn

        def grab(x, hook):
            pats[layer] = x[rows].detach().float()
            if layer == n_layers - 1:
                raise _ProbeDone

        return [(hook_name(layer, q_kind), scale(q_row, 0)),
                (hook_name(layer, k_kind), scale(k_row, k_target)),
                (hook_name(layer, "pattern"), grab)]

    hooks = [h for l in range(n_layers) for h in make(l)]
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            model(batch, return_type=None)
    except _ProbeDone:
        pass
    if len(pats) != n_layers:
        raise SpectraError(f"the probe pass ended before {hook_name(n_layers - 1, 'pattern')}")
    q_heads = torch.arange(n_heads, device=kv_idx.device) == 0
    k_heads = kv_idx == k_target
    results = []
    for which, kind, index, affected, label in (("q", q_kind, 1, q_heads, "query head 0"),
                                                ("k", k_kind, 2, k_heads, f"kv head {k_target}")):
        scaled_in_row = (q_heads | k_heads) if shared else affected
        ok, reasons = [], []
        for l in range(n_layers):
            base, new = pats[l][0], pats[l][index]
            # softmax(α·log p) = softmax(α·s): what a bilinear layer must produce.
            predicted = torch.softmax(alpha * torch.log(base), dim=-1)
            if not torch.allclose(new[~scaled_in_row], base[~scaled_in_row], atol=1e-5):
                raise SpectraError(
                    f"scaling {label} at {hook_name(l, kind)} changed other heads; "
                    f"the hook's head axis is not where expected"
                )
            if torch.allclose(new[affected], base[affected], atol=1e-6):
                ok.append(False)
                reasons.append(f"scaling at {hook_name(l, kind)} is undone before the logits (QK-norm?)")
            elif torch.allclose(new[affected], predicted[affected], atol=tol):
                ok.append(True)
                reasons.append(None)
            else:
                ok.append(False)
                reasons.append(f"logits of layer {l} are not bilinear in {which} (probe mismatch)")
        results.append((ok, reasons))
    return results

"""Capture hooks on TransformerLens hook points, attached by a context manager.

* `MetricCapture` computes per-token metrics for every head *inside* the forward pass, keeping
  O(batch · layers · heads · positions) memory; full patterns only for heads the caller names.
* `SweepCapture` reduces them to per-sequence means inside the pass (the α-sweeps of `sweep`).
* `attached(model, ...)` adds hooks (captures, and the interventions of
  `spectra_lens.interventions`) and removes exactly those, also when the forward raises.
"""

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import no_type_check

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from spectra_lens import metrics as M
from spectra_lens.errors import SpectraError
from spectra_lens.interventions import HookFn, check_hook_shape
from spectra_lens.kernels import blocked
from spectra_lens.kernels.alpha import alpha_metrics, row_alpha_entropy
from spectra_lens.kernels.fused import capture_row_metrics
from spectra_lens.layout import AttentionLayout, attention_layout, hook_name
from spectra_lens.validate import HeadRef, check_context, check_min_position, check_tokens

__all__ = [
    "METRIC_NAMES",
    "HookFn",
    "MetricCapture",
    "SweepCapture",
    "TokenMetrics",
    "attached",
    "attention_mask_for",
    "capture_metrics",
    "count_hooks",
]

#: Every per-token metric of `TokenMetrics` (the registry is `metrics.TOKEN_METRICS`).
METRIC_NAMES: tuple[str, ...] = M.TOKEN_METRICS


# --------------------------------------------------------------------------- validation


@no_type_check  # validates its input itself (SpectraError)
def attention_mask_for(
    tokens: Int[Tensor, "batch pos"], *, attention_mask=None, pad_id: int | None = None
) -> Bool[Tensor, "batch pos"] | None:
    """The real tokens of `tokens` as a bool mask (None when every token is real).

    `attention_mask` (1 = real token, 0 = padding, as in Hugging Face) wins; else `pad_id` marks
    padding at the start (left padding) or the end (right padding) of a row. A pad id between
    real tokens is refused: many tokenizers use EOS as the pad id, and EOS also separates
    documents inside a sequence, so only an explicit mask can say which is which there.
    """
    if attention_mask is None and pad_id is None:
        return None
    if attention_mask is not None:
        m = torch.as_tensor(attention_mask)
        if tuple(m.shape) != tuple(tokens.shape):
            raise SpectraError(f"attention_mask must have the tokens' shape {tuple(tokens.shape)}, "
                               f"got {tuple(m.shape)}")
        if m.dtype != torch.bool:
            if m.dtype.is_floating_point or not ((m == 0) | (m == 1)).all():
                raise SpectraError("attention_mask must hold 0 (padding) and 1 (real token) only")
            m = m.bool()
    else:
        if isinstance(pad_id, bool) or not isinstance(pad_id, int):
            raise SpectraError(f"pad_id must be an integer token id, got {pad_id!r}")
        pad = tokens == pad_id
        real = ~pad
        seen_real = real.int().cumsum(1) > 0
        after_last = real.flip(1).int().cumsum(1).flip(1) == 0
        inner = pad & seen_real & ~after_last
        if inner.any():
            row, pos = (int(i) for i in inner.nonzero()[0])
            raise SpectraError(
                f"pad id {pad_id} occurs between real tokens (row {row}, position {pos}), where it "
                f"is not padding (EOS, often the pad id, also separates documents); pass "
                f"attention_mask instead of pad_id"
            )
        m = real
    m = m.to(tokens.device)
    if not m.any(1).all():
        raise SpectraError(f"attention_mask rows {m.any(1).logical_not().nonzero().flatten().tolist()} "
                           f"hold no real token; expected at least one per row")
    starts = m.int().diff(dim=1) == 1  # a real token right after padding
    if (starts.sum(1) > 1).any() or ((starts.sum(1) == 1) & m[:, 0]).any():
        raise SpectraError("attention_mask has padding between real tokens; expected left or right "
                           "padding (one contiguous block of real tokens per row)")
    return None if bool(m.all()) else m


@no_type_check  # validates its input itself (SpectraError)
def tokens_and_mask(model, tokens, *, attention_mask=None, pad_id: int | None = None
                    ) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"] | None]:
    """(token ids, mask of real tokens or None) from what TransformerLens accepts: token ids
    [batch, pos] (with `attention_mask` or `pad_id` for padding, see `attention_mask_for`), a
    string, or a list of strings. Text is tokenized by the model (`model.to_tokens`, BOS as the
    model prepends it); texts of different token lengths are padded and masked."""
    is_text = isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and len(tokens) > 0
                                          and all(isinstance(t, str) for t in tokens))
    if is_text:
        if attention_mask is not None or pad_id is not None:
            raise SpectraError("attention_mask / pad_id apply to token tensors; texts get their own")
        if getattr(model, "tokenizer", None) is None:
            raise SpectraError("text was given but the model has no tokenizer; pass token ids [batch, pos]")
        texts = [tokens] if isinstance(tokens, str) else list(tokens)
        tokens = check_tokens(model.to_tokens(texts))
        check_context(model, tokens.shape[1])
        return tokens, _text_mask(model, texts, tokens)
    tokens = check_tokens(tokens)
    check_context(model, tokens.shape[1])
    return tokens, attention_mask_for(tokens, attention_mask=attention_mask, pad_id=pad_id)


def _text_mask(model, texts: list[str], tokens: Tensor) -> Tensor | None:
    """The real tokens of `model.to_tokens(texts)`: each text's own length, padding on the side
    the tokenizer pads (None when no text was padded)."""
    lengths = [model.to_tokens(t).shape[1] for t in texts]
    n = tokens.shape[1]
    if all(k == n for k in lengths):
        return None
    pos = torch.arange(n)
    left = getattr(model.tokenizer, "padding_side", "right") == "left"
    rows = [(pos >= n - k) if left else (pos < k) for k in lengths]
    return torch.stack(rows).to(tokens.device)


# --------------------------------------------------------------------------- capture


@dataclass(frozen=True, repr=False)
class TokenMetrics:
    """Per-token attention metrics of every captured head, each `[batch, layer, head, pos]`.

    `layers[i]` is the model layer held at index i of the layer axis. `patterns` holds full
    patterns `[batch, query_pos, key_pos]` only for the (layer, head) pairs that were asked for.
    k_eff definitions: see `spectra_lens.metrics.K_EFF_DEFINITIONS`.
    """

    layers: tuple[int, ...]
    q_norm: Float[Tensor, "batch layer head pos"]
    k_norm: Float[Tensor, "batch layer head pos"]
    entropy: Float[Tensor, "batch layer head pos"]
    entropy_norm: Float[Tensor, "batch layer head pos"]
    max_attn: Float[Tensor, "batch layer head pos"]
    k_eff_exp: Float[Tensor, "batch layer head pos"]
    k_eff_pr: Float[Tensor, "batch layer head pos"]
    k_eff_top90: Float[Tensor, "batch layer head pos"]
    sink_mass: Float[Tensor, "batch layer head pos"]
    local_gain: Float[Tensor, "batch layer head pos"]
    entropy_nosink: Float[Tensor, "batch layer head pos"]
    max_attn_nosink: Float[Tensor, "batch layer head pos"]
    k_eff_exp_nosink: Float[Tensor, "batch layer head pos"]
    k_eff_pr_nosink: Float[Tensor, "batch layer head pos"]
    k_eff_top90_nosink: Float[Tensor, "batch layer head pos"]
    dir_spread: Float[Tensor, "batch layer head pos"]
    patterns: dict = field(default_factory=dict)
    # Real tokens [batch, pos] (None: all real). Metrics of padding positions are NaN.
    attention_mask: Tensor | None = None
    # The exact norm counterfactual H(softmax(s · r/‖q‖)) where the capture had a reference norm
    # (`spectra_lens.reference.ReferenceNorm`); NaN in layers not bilinear in q. None without one.
    entropy_cf: Tensor | None = None

    def metric(self, name: str) -> Tensor:
        if name not in METRIC_NAMES:
            raise SpectraError(f"unknown metric {name!r}; expected one of {METRIC_NAMES}")
        return getattr(self, name)

    def head(self, layer: int, head: int) -> dict[str, Tensor]:
        """{metric: [batch, pos]} for one model (layer, head)."""
        if layer not in self.layers:
            raise SpectraError(f"layer {layer} was not captured; captured layers: {self.layers}")
        i = self.layers.index(layer)
        return {n: getattr(self, n)[:, i, head] for n in METRIC_NAMES}

    def to_frame(
        self, *, sequence_ids: Sequence[int] | Tensor | None = None, shard: int | None = None
    ) -> pd.DataFrame:
        """Long format: one row per (sequence, layer, head, position) with every metric.

        Padding positions are left out; `position` counts real tokens only (under left padding
        the first real token is position 0, as the model's position ids are).
        """
        b, n_l, n_h, n_p = self.entropy.shape
        seq = torch.arange(b) if sequence_ids is None else torch.as_tensor(sequence_ids)
        if seq.numel() != b:
            raise SpectraError(f"sequence_ids must have {b} entries, got {seq.numel()}")
        grid = list(torch.meshgrid(
            seq, torch.as_tensor(self.layers), torch.arange(n_h), torch.arange(n_p), indexing="ij"
        ))
        keep = None
        if self.attention_mask is not None:
            mask = self.attention_mask.detach().cpu()
            real_pos = mask.long().cumsum(1) - 1  # [batch, pos]
            grid[3] = real_pos[:, None, None, :].expand(b, n_l, n_h, n_p)
            keep = mask[:, None, None, :].expand(b, n_l, n_h, n_p).reshape(-1).numpy()
        cols: dict[str, object] = {}
        n_rows = grid[0].numel() if keep is None else int(keep.sum())
        if shard is not None:
            cols["shard"] = pd.array([shard] * n_rows, dtype="int32")
        for name, g in zip(("sequence", "layer", "head", "position"), grid):
            v = g.reshape(-1).numpy().astype("int32")
            cols[name] = v if keep is None else v[keep]
        for name in METRIC_NAMES + (("entropy_cf",) if self.entropy_cf is not None else ()):
            v = getattr(self, name).detach().cpu().reshape(-1).numpy()
            cols[name] = v if keep is None else v[keep]
        return pd.DataFrame(cols)

    def __repr__(self) -> str:
        shape = tuple(self.entropy.shape)
        pats = ", ".join(str(HeadRef(l, h)) for l, h in self.patterns) or "none"
        return (f"TokenMetrics(batch×layer×head×pos={shape}, layers={self.layers[0]}..{self.layers[-1]}, "
                f"metrics={list(METRIC_NAMES)}, patterns=[{pats}])")

    def _repr_html_(self) -> str:
        from spectra_lens.present.display import html_card

        means = pd.DataFrame({"metric": list(METRIC_NAMES),
                              "mean": [float(getattr(self, n).nanmean()) for n in METRIC_NAMES]})
        pats = ", ".join(str(HeadRef(l, h)) for l, h in self.patterns) or "none"
        return html_card("TokenMetrics", {"batch × layer × head × pos": tuple(self.entropy.shape),
                                          "layers": self.layers, "patterns": pats},
                         {"means over every token and head": means}, max_rows=len(METRIC_NAMES))


class _PassDone(Exception):
    """Raised by a capture's last pattern hook inside `_run_capture`: the pass has given every
    value asked of it, so the rest of the forward is not computed."""


def _run_capture(model, tokens: Tensor, cap, stop_after: int | None, *, interventions=(),
                 layout: AttentionLayout, **model_kwargs):
    """model(tokens) without grad, `interventions` then `cap` attached. With `stop_after` a layer
    the pass ends at that layer's pattern hook (`cap` raises `_PassDone` there once its values
    are stored) and returns None; with None it runs whole and returns the logits."""
    cap._stop_after = stop_after
    try:
        with torch.no_grad(), attached(model, *interventions, cap, layout=layout):
            out = model(tokens, return_type="logits" if stop_after is None else None, **model_kwargs)
    except _PassDone:
        return None
    finally:
        cap._stop_after = None
    if stop_after is not None:  # the hook that ends the pass never ran
        raise SpectraError(f"the forward pass ended without reaching {hook_name(stop_after, 'pattern')}")
    return out


class MetricCapture:
    """Hooks that compute `TokenMetrics` inside one forward pass.

    Use: `cap = MetricCapture(layout)`; `tm = cap.run(model, tokens)` (the pass ends at the last
    captured layer's attention pattern: neither that layer's MLP nor the logits are computed),
    or `with attached(model, cap): model(tokens)` then `cap.result()`. A capture holds one
    forward pass: `result()` clears it for the next.
    With padded batches call `cap.set_attention_mask(mask)` before the pass and give the model the
    same mask (`model(tokens, attention_mask=mask)`): padding rows get NaN metrics, the sink is
    the first real key, and a pass that attended to padding is refused.
    `top_mass` is the mass of `k_eff_top90` (0.9); None skips that metric (NaN), which saves
    the sort of every attention row.
    With `reference` (`spectra_lens.reference.ReferenceNorm`) the capture also gives
    `entropy_cf`, the exact norm counterfactual H(softmax(α·s)) with α = r / ‖q‖ per row
    (`kernels.alpha.row_alpha_entropy`: one more pass over each row); NaN in a layer whose
    logits are not bilinear in q (`layout.q_bilinear`), where scaling q does not scale s.
    """

    def __init__(
        self,
        layout: AttentionLayout,
        *,
        layers: Iterable[int] | None = None,
        patterns_for: Iterable[tuple[int, int]] = (),
        top_mass: float | None = 0.9,
        reference=None,
    ):
        self.layout = layout
        self.reference = reference
        self.layers = tuple(range(layout.n_layers)) if layers is None else tuple(layers)
        if not self.layers:
            raise SpectraError("layers must name at least one layer, got none")
        if len(set(self.layers)) != len(self.layers):
            raise SpectraError(f"layers must not repeat, got {list(self.layers)}")
        self._index = {l: i for i, l in enumerate(self.layers)}
        for l in self.layers:
            layout.check_head(l, 0)
        self.patterns_for = tuple((int(l), int(h)) for l, h in patterns_for)
        for l, h in self.patterns_for:
            layout.check_head(l, h)
            if l not in self.layers:
                raise SpectraError(f"pattern asked for {HeadRef(l, h)} but layer {l} is not captured")
        if top_mass is not None and not 0 < top_mass <= 1:
            raise SpectraError(f"top_mass must be in (0, 1] or None, got {top_mass}")
        self.top_mass = top_mass
        self._kv = layout.kv_index()
        self._mask: Tensor | None = None
        self._stop_after: int | None = None  # set by run(): the layer whose pattern ends the pass
        self._clear()

    def set_attention_mask(self, attention_mask: Tensor | None) -> None:
        """Real tokens `[batch, pos]` of the next forward pass (None: all real); see
        `attention_mask_for`. `result()` clears it."""
        if attention_mask is not None:
            m = torch.as_tensor(attention_mask)
            if m.ndim != 2 or m.dtype != torch.bool:
                raise SpectraError(f"attention_mask must be a bool tensor [batch, pos], got "
                                   f"{m.dtype} {tuple(m.shape)} (see capture.attention_mask_for)")
            attention_mask = m
        self._mask = attention_mask

    def _mask_for(self, p: Tensor, hook: str) -> Tensor | None:
        """The mask on `p`'s device, checked against the pattern [batch, head, query, key]."""
        m = self._mask
        if m is None:
            return None
        if tuple(m.shape) != (p.shape[0], p.shape[-1]):
            raise SpectraError(f"{hook}: attention_mask has shape {tuple(m.shape)}; the forward pass "
                               f"has [batch, pos] = {(p.shape[0], p.shape[-1])}")
        return m.to(p.device)

    def _clear(self) -> None:
        # Per metric, one [batch, layer, head, pos] tensor for the whole pass, allocated at its
        # first layer and filled layer by layer (`_put`); `_filled` names the layers written.
        # Small per-layer tensors kept between the forward's large temporaries fragmented the
        # heap: the pass's peak RSS was 60-110 MiB higher on the default model at 8 x 128 tokens.
        self._out: dict[str, Tensor] = {}
        self._filled: dict[str, set[int]] = {n: set() for n in METRIC_NAMES}
        self._scores: dict[int, Tensor] = {}
        self._patterns: dict[tuple[int, int], Tensor] = {}

    def hooks(self, layout: AttentionLayout | None = None) -> list[HookFn]:
        out: list[HookFn] = []
        for l in self.layers:
            out.append((self.layout.q_hook(l), self._q_hook(l)))
            out.append((self.layout.k_hook(l), self._k_hook(l)))
            if self.layout.scores_faithful:
                out.append((hook_name(l, "attn_scores"), self._scores_hook(l)))
            out.append((hook_name(l, "pattern"), self._pattern_hook(l)))
        return out

    def _q_hook(self, l: int):
        name, L = self.layout.q_hook(l), self.layout

        def fn(q, hook):
            check_hook_shape(q, name, (None, None, L.n_heads, L.d_head), "batch pos head d_head")
            self._put("q_norm", l, M.vector_norm(q.detach()).transpose(1, 2))

        return fn

    def _k_hook(self, l: int):
        name, L = self.layout.k_hook(l), self.layout

        def fn(k, hook):
            check_hook_shape(k, name, (None, None, L.n_kv_heads, L.d_head), "batch pos kv_head d_head")
            norms = M.vector_norm(k.detach())  # [batch, pos, kv_head]
            self._put("k_norm", l, norms[:, :, self._kv.to(norms.device)].transpose(1, 2))

        return fn

    def _scores_hook(self, l: int):
        name, L = hook_name(l, "attn_scores"), self.layout

        def fn(s, hook):
            check_hook_shape(s, name, (None, L.n_heads, None, None), "batch head query_pos key_pos")
            self._scores[l] = s.detach()

        return fn

    def _pattern_hook(self, l: int):
        name, L = hook_name(l, "pattern"), self.layout

        def fn(p, hook):
            check_hook_shape(p, name, (None, L.n_heads, None, None), "batch head query_pos key_pos")
            p = p.detach()
            # One blocked pass over the visible keys (kernels.fused.capture_row_metrics); without
            # faithful scores the logits are log p (the same up to a per-row constant).
            # top_mass=None skips k_eff_top90 (NaN), the only metric that sorts the rows.
            s = self._scores.pop(l, None)
            # the pass's tensors live on the first layer's device (`_put`), p on this layer's
            q_norm = self._out["q_norm"][:, self._index[l]].to(p.device)
            got = capture_row_metrics(p, s, q_norm, top_mass=self.top_mass)
            mask = self._mask_for(p, name)
            if mask is not None:
                pf = p.float()
                # rows of real queries only: a padding query may see nothing but padding
                leak = ((pf * (~mask)[:, None, None, :]).sum(-1) * mask[:, None, :]).amax()
                if leak > 1e-6:
                    raise SpectraError(
                        f"{name}: {float(leak):.3g} of the attention went to padding; give the model "
                        f"the same attention_mask as the capture (model(tokens, attention_mask=mask))"
                    )
                first = mask.int().argmax(1)  # the first real key of each row: the sink
                idx = first[:, None, None, None].expand(p.shape[0], p.shape[1], p.shape[2], 1)
                got["sink_mass"] = pf.gather(-1, idx).squeeze(-1)
            if self.reference is not None:
                got["entropy_cf"] = self._counterfactual(l, p, s, q_norm, mask)
            for n, v in got.items():
                self._put(n, l, v)
            for ll, h in self.patterns_for:
                if ll == l:
                    self._patterns[(l, h)] = p[:, h].float().clone()
            if l == self._stop_after:
                raise _PassDone

        return fn

    def _counterfactual(self, l: int, p: Tensor, s: Tensor | None, q_norm: Tensor,
                        mask: Tensor | None) -> Tensor:
        """H(softmax(α·s)) [batch, head, pos] with α = r / ‖q‖ (`self.reference`), from the
        scores where faithful, else from log p (the same up to a per-row constant)."""
        if not self.layout.q_bilinear[l]:
            return torch.full(q_norm.shape, torch.nan, dtype=torch.float32, device=p.device)
        if mask is None:
            positions = torch.arange(p.shape[-2], device=p.device)
        else:
            positions = (mask.long().cumsum(1) - 1).clamp_min(0)
        alpha = self.reference.alpha(l, q_norm, positions)
        if s is None:
            visible = p > 0
            s = M.logits_from_pattern(p)
        else:
            visible = M.visible_from_scores(s)
        return row_alpha_entropy(s, visible, alpha)

    def _put(self, name: str, l: int, value: Tensor) -> None:
        """Layer `l`'s `value` [batch, head, pos] into the pass's tensor of `name`, which lives
        on the device of the first layer to arrive (under a device map, the first layer's)."""
        out = self._out.get(name)
        if out is None or out.shape[0] != value.shape[0] or out.shape[2:] != value.shape[1:]:
            b, h, n = value.shape
            out = self._out[name] = torch.empty(b, len(self.layers), h, n, dtype=value.dtype,
                                                device=value.device)
            self._filled[name] = set()  # layers of an earlier (failed) pass are not in it
        i = self._index[l]
        out[:, i].copy_(value)
        self._filled[name].add(l)

    def run(self, model, tokens: Tensor, *, interventions=(), layout: AttentionLayout | None = None) -> TokenMetrics:
        """One forward pass (no grad) of `tokens` with `interventions` before the capture, ended
        at the last captured layer's attention pattern; its `result()`. Under a mask set by
        `set_attention_mask` the model gets the same mask."""
        extra = {} if self._mask is None else {"attention_mask": self._mask.long().to(tokens.device)}
        _run_capture(model, tokens, self, max(self.layers), interventions=interventions,
                     layout=layout or self.layout, **extra)
        return self.result()

    def result(self) -> TokenMetrics:
        names = METRIC_NAMES + (("entropy_cf",) if self.reference is not None else ())
        missing = sorted({l for n in names for l in self.layers if l not in self._filled.get(n, ())})
        if missing:
            raise SpectraError(f"no forward pass reached layers {missing}; run the model inside attached()")
        # Under a device map the layers live on several devices: `_put` gathered them on the
        # first layer's. Every layer of every metric was written (checked above, per metric).
        vals = dict(self._out)
        mask = self._mask
        if mask is not None:
            pad = ~mask.to(vals["entropy"].device)[:, None, None, :]
            vals = {n: v.masked_fill(pad, torch.nan) for n, v in vals.items()}
            mask = mask.cpu()
        out = TokenMetrics(layers=self.layers, patterns=dict(self._patterns), attention_mask=mask, **vals)
        self._mask = None
        self._clear()
        return out


# --------------------------------------------------------------------------- attaching


def count_hooks(model) -> int:
    """Non-permanent forward hooks attached anywhere on the model (0 on a clean model).

    TransformerLens itself keeps a few permanent hooks on some bridges (OPT); those are not ours.
    """
    points = {id(h): h for h in model.hook_dict.values()}.values()
    return sum(1 for hp in points for handle in hp.fwd_hooks if not handle.is_permanent)


@contextmanager
def attached(model, *items, layout: AttentionLayout | None = None) -> Iterator[AttentionLayout]:
    """Attach scaling / capture hooks for the duration of the block; remove exactly those.

    `items` are objects with a `.hooks(layout)` method (QueryScale, KeyScale, LogitScale,
    QueryRotate, MetricCapture, SweepCapture) or `(hook_name, fn)` pairs. Hooks on the same point run in the given order,
    so put scalings before captures to measure the scaled model.
    """
    layout = layout or attention_layout(model)
    hooks: list[HookFn] = []
    points = None  # the bridge rebuilds `hook_dict` on every access (~1 ms on the default model)
    for item in items:
        if hasattr(item, "hooks"):
            hooks += item.hooks(layout)
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            points = model.hook_dict if points is None else points
            if item[0] not in points:
                raise SpectraError(f"no hook point named {item[0]!r} on this model")
            hooks.append(item)
        else:
            raise SpectraError(f"expected a scaling/capture object or a (hook_name, fn) pair, got {item!r}")
    # TransformerBridge.hooks removes the handles it added in a `finally`, so an exception or a
    # KeyboardInterrupt inside the block leaves the model clean.
    with model.hooks(fwd_hooks=hooks):
        yield layout


@no_type_check  # validates `tokens` itself (SpectraError)
def capture_metrics(
    model,
    tokens: Int[Tensor, "batch pos"] | str | list[str],
    *,
    layers: Iterable[int] | None = None,
    patterns_for: Iterable[tuple[int, int]] = (),
    interventions: Sequence = (),
    top_mass: float | None = 0.9,
    attention_mask: Tensor | None = None,
    pad_id: int | None = None,
    reference=None,
) -> TokenMetrics:
    """One forward pass (no grad) with `interventions` applied; per-token metrics of every head.

    Padded batches: pass `attention_mask` (1 = real token) or `pad_id` (padding at either end of
    a row); padding positions get NaN metrics and no attention (see `attention_mask_for`).
    `tokens` may also be a string or a list of strings, tokenized by the model as TransformerLens
    does (`tokens_and_mask`). With `reference` (`spectra_lens.reference.ReferenceNorm`) the
    result also holds `entropy_cf`, the exact norm counterfactual (see `MetricCapture`).
    """
    tokens, mask = tokens_and_mask(model, tokens, attention_mask=attention_mask, pad_id=pad_id)
    layout = attention_layout(model)
    cap = MetricCapture(layout, layers=layers, patterns_for=patterns_for, top_mass=top_mass,
                        reference=reference)
    cap.set_attention_mask(mask)
    return cap.run(model, tokens.to(next(model.parameters()).device), interventions=interventions,
                   layout=layout)


class SweepCapture:
    """Per-sequence capture for sweeps: hooks on hook_attn_scores / hook_pattern computing
    per-sequence means inside the pass (`MetricCapture` is the per-token capture).

    For layers in `layers`: with `alphas` the metrics of softmax(α·s) at every α (the fast path,
    `[alpha, batch, head]`), without them the metrics of the pattern itself (`[batch, head]`:
    a real, possibly scaled pass). For `gain_layers`: −Var_p(s) `[batch, head]`. Full patterns
    `[batch, query_pos, key_pos]` for the (layer, head) pairs in `patterns_for`.
    With `attention_mask` (bool `[batch, pos]`, True = real token) padding rows are left out of
    every mean and `min_position` counts real tokens (the model's position ids under left padding).
    """

    def __init__(self, layout, *, layers=(), alphas=None, gain_layers=(), patterns_for=(),
                 min_position=1, chunk_elements=blocked.ALPHA_CHUNK_ELEMENTS, attention_mask=None):
        self.layout = layout
        self.attention_mask = attention_mask
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
        self._stop_after: int | None = None  # set by run(): the layer whose pattern ends the pass

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
            check_min_position(self.min_position, p.shape[-2])
            p = p.detach()
            for ll, h in self.patterns_for:
                if ll == l:
                    # a copy: a view of p would keep the layer's pattern of every head alive
                    self.patterns[(l, h)] = p[:, h].to("cpu", torch.float32, copy=True)
            q0 = self.min_position
            p = p.float()[..., q0:, :]
            s = self._scores.pop(l, None)
            if s is not None:
                s = s.float()[..., q0:, :]
                visible = M.visible_from_scores(s)
            else:  # scores not faithful: log p is s up to a per-row constant
                visible = p > 0
                s = M.logits_from_pattern(p)
            w = self._row_weight(p)
            if l in self.gain_layers:
                g = blocked.local_gain_under(p, s, visible)
                self.gain[l] = (g.mean(-1) if w is None else
                                torch.where(w > 0, g * w, 0.0).sum(-1) / w.sum(-1)).cpu()
            if l in self.layers:
                if self.alphas is None:
                    got = blocked.pattern_metrics(p, visible, row_weight=w)
                else:
                    got = alpha_metrics(s, visible, self.alphas, chunk_elements=self.chunk_elements,
                                        row_weight=w)
                self.metrics[l] = {n: v.cpu() for n, v in got.items()}
            if l == self._stop_after:
                raise _PassDone

        return fn

    def _row_weight(self, p: Tensor) -> Tensor | None:
        """[batch, 1, query_pos - min_position] weights of the rows averaged: 1 for a real token
        at real position >= min_position, 0 for padding (None without a mask)."""
        m = self.attention_mask
        if m is None:
            return None
        if m.shape[0] != p.shape[0] or m.shape[1] != p.shape[-1]:
            raise SpectraError(f"attention_mask has shape {tuple(m.shape)}; the pass has "
                               f"[batch, pos] = {(p.shape[0], p.shape[-1])}")
        m = m.to(p.device)
        keep = m & (m.long().cumsum(1) - 1 >= self.min_position)
        if not keep.any(1).all():
            raise SpectraError(f"a sequence has no real token at position >= min_position "
                               f"({self.min_position}) to average")
        return keep[:, None, self.min_position:].float()

    def run(self, model, tokens: Tensor, *, interventions=(), layout=None, logits: bool = False):
        """One forward pass (no grad) with `interventions` before the capture; the logits if
        asked, else None: the pass then ends at the last captured layer's pattern, computing
        neither that layer's output nor anything after it (the last MLP, the unembedding)."""
        extra = {}
        if self.attention_mask is not None:
            extra["attention_mask"] = self.attention_mask.to(tokens.device).long()
        return _run_capture(model, tokens, self, None if logits else max(self.all_layers()),
                            interventions=interventions, layout=layout or self.layout, **extra)

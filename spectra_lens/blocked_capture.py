"""Per-token capture of a whole forward pass without the [head, T, T] attention pattern.

The eager capture (`spectra_lens.capture.MetricCapture`) reads `hook_pattern`, a
[batch, head, T, T] tensor per layer. TransformerLens's bridge forms that tensor in every layer
whatever the Hugging Face attention implementation: for the families it reimplements
(Llama, Qwen, Gemma, GPT-2, GPT-NeoX, BLOOM) `attn_implementation="sdpa"` changes only the mask
it is handed (None without padding, a bool [batch, 1, T, T] with it) and `hook_attn_scores` /
`hook_pattern` still fire; where it delegates to the Hugging Face module (OPT) SDPA returns no
pattern and the two hooks do not fire at all.

This module runs the bridge with its attention core replaced, layer by layer, by
`kernels.attention_blocks.attention_blocks`: query blocks of O(block × T) memory. The bridge's
own hooks still fire up to the effective query and key (`hook_rot_q` / `hook_rot_k` where they
exist, else `hook_q` / `hook_k`; `layout.attention_layout`) and `hook_v`, so scaling
interventions there (`QueryScale`, `KeyScale`) change the real forward pass; the output goes
back through the bridge's output projection (`hook_z`, `hook_out`). `hook_attn_scores` and
`hook_pattern` never fire: interventions on them (`LogitScale`) are refused.

Entry points: `capture_metrics_blocked(model, tokens, ...)` (the blocked twin of
`capture.capture_metrics`: the same `TokenMetrics`), `BlockedCapture(layout).run(...)`, and
`blocked_attention(model)`, a context manager under which `model(tokens)` runs blocked.
"""

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from spectra_lens import metrics as M
from spectra_lens.capture import METRIC_NAMES, TokenMetrics, attached, attention_mask_for
from spectra_lens.errors import SpectraError
from spectra_lens.kernels.attention_blocks import BLOCK_ELEMENTS, attention_blocks
from spectra_lens.layout import AttentionLayout, attention_layout, hook_name
from spectra_lens.validate import check_context, check_tokens

__all__ = ["BlockedCapture", "LayerPlan", "blocked_attention", "capture_metrics_blocked", "layer_plan"]

# The bridge's attention classes whose core this module replaces, and how their output leaves
# the layer after the attention output z: "o" (output projection, then hook_out) or "joint"
# (the joint-QKV bridges' projection and output processing).
_SUPPORTED = {
    "PositionEmbeddingsAttentionBridge": "o",
    "JointQKVAttentionBridge": "joint",
    "JointQKVPositionEmbeddingsAttentionBridge": "joint",
    "AttentionBridge": "o",
}
# AttentionBridge hands the whole computation to the Hugging Face module; only modules whose
# forward ends in the output projection right after the attention are known to fit.
_HF_MODULES = ("OPTAttention",)


@dataclass(frozen=True)
class LayerPlan:
    """How one layer's attention is recomputed: the model's score scale, soft-cap, sliding
    window (used when the model passes no mask), whether rotary is applied after the effective
    q/k hooks (GPT-NeoX's bridge), and how the output leaves the layer."""

    layer: int
    scale: float
    softcap: float | None
    sliding_window: int | None
    rotary_after_hooks: bool
    exit: str


class _Escape(Exception):
    """Raised by the capture hooks once a layer's q, k and v are held: the bridge's own
    attention core (which forms the pattern) is skipped."""

    def __init__(self, layer: int):
        super().__init__(layer)
        self.layer = layer


class _Stop(Exception):
    """Raised after the last captured layer when the logits are not asked for."""


def layer_plan(model, layout: AttentionLayout, layer: int) -> LayerPlan:
    """The `LayerPlan` of `layer`, or a one-line SpectraError naming the layer and why the
    blocked path cannot reproduce its attention (ALiBi, attention sinks, gated attention, ...)."""
    attn = model.blocks[layer].attn
    cls = type(attn).__name__
    hf = attn.original_component
    where = f"layer {layer} ({cls} around {type(hf).__name__})"
    reason = None
    if getattr(model.cfg, "positional_embedding_type", None) == "alibi" or "ALiBi" in (layout.q_reason[layer] or ""):
        reason = "ALiBi position bias is not reproduced by the blocked path"
    elif cls not in _SUPPORTED:
        reason = f"attention class {cls} is not supported by the blocked path"
    elif cls == "AttentionBridge" and type(hf).__name__ not in _HF_MODULES:
        reason = f"the Hugging Face module {type(hf).__name__} is not known to the blocked path"
    elif getattr(hf, "sinks", None) is not None:
        reason = "learned attention sinks are not reproduced by the blocked path"
    elif getattr(model.cfg, "gated_q_proj", False) or "gate" in attn._modules:
        reason = "gated attention is not reproduced by the blocked path"
    elif getattr(model.cfg, "qk_norm_after_rope", False):
        reason = "QK-norm after rotary is not reproduced by the blocked path"
    elif getattr(model.cfg, "use_attn_result", False):
        reason = "use_attn_result (per-head outputs) is not reproduced by the blocked path"
    elif cls == "PositionEmbeddingsAttentionBridge" and (
            type(attn)._pre_output_projection is not _position_bridge()._pre_output_projection):
        reason = "a transform before the output projection is not reproduced by the blocked path"
    if reason is not None:
        raise SpectraError(f"{where}: {reason}; use the eager attention path")
    s_hf = getattr(hf, "scaling", None)
    s_lay = layout.score_scale[layer]
    scale = s_hf
    if s_lay is not None and (s_hf is None or abs(s_hf - s_lay) > 1e-4 * abs(s_lay)):
        scale = s_lay  # what the probe measured (e.g. GPT-2's scaling by inverse layer index)
    if not isinstance(scale, float | int) or not scale > 0:
        raise SpectraError(f"{where}: the score scale is unknown (no probe scale, no module "
                           f"`scaling`); use the eager attention path")
    cap = getattr(hf, "attn_logit_softcapping", None) if cls == "PositionEmbeddingsAttentionBridge" else None
    window = getattr(hf, "sliding_window", None)
    return LayerPlan(layer=layer, scale=float(scale), softcap=float(cap) if cap else None,
                     sliding_window=int(window) if window else None,
                     rotary_after_hooks=cls == "JointQKVPositionEmbeddingsAttentionBridge",
                     exit=_SUPPORTED[cls])


def _position_bridge():
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )

    return PositionEmbeddingsAttentionBridge


class _Runner:
    """The hooks and attention replacements of one blocked pass."""

    def __init__(self, model, layout: AttentionLayout, capture: "BlockedCapture | None"):
        self.model, self.layout, self.capture = model, layout, capture
        self.plans = [layer_plan(model, layout, l) for l in range(layout.n_layers)]
        self.held: dict[int, dict[str, Tensor]] = {}

    def hooks(self) -> list[tuple[str, object]]:
        out = []
        for l in range(self.layout.n_layers):
            for slot, name in (("q", self.layout.q_hook(l)), ("k", self.layout.k_hook(l)),
                               ("v", hook_name(l, "v"))):
                out.append((name, self._grab(l, slot)))
        return out

    def _grab(self, l: int, slot: str):
        def fn(x, hook):
            held = self.held.setdefault(l, {})
            held[slot] = x.detach()
            if len(held) == 3:
                raise _Escape(l)

        return fn

    @contextmanager
    def replaced(self) -> Iterator[None]:
        """Every layer's attention forward wrapped (instance attribute; removed on exit)."""
        done = []
        try:
            for l in range(self.layout.n_layers):
                attn = self.model.blocks[l].attn
                # object.__setattr__: the bridge forwards ordinary attribute writes to the
                # Hugging Face module it wraps
                object.__setattr__(attn, "forward", self._forward(l, attn))
                done.append(attn)
            yield
        finally:
            for attn in done:
                object.__delattr__(attn, "forward")

    def _forward(self, l: int, attn):
        bound = type(attn).forward.__get__(attn)
        plan = self.plans[l]

        def forward(*args, **kwargs):
            self.held.pop(l, None)
            cache = kwargs.get("past_key_values", kwargs.get("layer_past"))
            if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length(l) > 0:
                raise SpectraError(f"layer {l}: a filled key/value cache was given; the blocked path "
                                   f"runs whole sequences only")
            try:
                bound(*args, **kwargs)
            except _Escape as e:
                if e.layer != l:
                    raise
            else:
                raise SpectraError(f"layer {l}: the attention ran without firing its q, k and v hooks "
                                   f"({self.layout.q_hook(l)}, {self.layout.k_hook(l)}, "
                                   f"{hook_name(l, 'v')}); this bridge is unsupported by the blocked path")
            held = self.held.pop(l)
            return self._attend(l, attn, plan, held, kwargs)

        return forward

    def _attend(self, l, attn, plan: LayerPlan, held, kwargs):
        q, k, v = held["q"], held["k"], held["v"]
        q_norm = None
        cap = self.capture
        want = cap is not None and l in cap._index
        cf_alpha = None
        if want:
            q_norm = M.vector_norm(q).transpose(1, 2)  # of the hooked effective query, as eager
            if cap.reference is not None:  # the norm counterfactual, as MetricCapture gives it
                cf_alpha = cap._cf_alpha(l, q_norm)
        if plan.rotary_after_hooks:  # GPT-NeoX's bridge rotates after hook_q / hook_k
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                cos, sin = attn._apply_position_embedding_hooks(pe)
                qr, kr = attn._apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
                q, k = qr.transpose(1, 2), kr.transpose(1, 2)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim != 4:
            raise SpectraError(f"layer {l}: expected a 4-D attention mask [batch, 1, pos, pos] or none, "
                               f"got shape {tuple(mask.shape)}")
        z, got = attention_blocks(
            q, k, v, scale=plan.scale, mask=mask, sliding_window=plan.sliding_window,
            softcap=plan.softcap, metrics=want, top_mass=cap.top_mass if want else None,
            sink_index=cap._sink_index if want else None, q_norm=q_norm, cf_alpha=cf_alpha,
            block_elements=cap.block_elements if cap is not None else BLOCK_ELEMENTS, layer=l)
        if want:
            kn = M.vector_norm(held["k"])  # [batch, pos, kv_head]
            got["q_norm"] = q_norm
            got["k_norm"] = kn[:, :, self.layout.kv_index().to(kn.device)].transpose(1, 2)
            cap._put(l, got)
        b, n = z.shape[:2]
        zf = z.reshape(b, n, -1)
        if plan.exit == "joint":
            out = attn._process_output((attn._apply_output_projection(zf), None))
        else:
            o_weight = getattr(getattr(attn.o, "original_component", None), "weight", None)
            if isinstance(o_weight, Tensor) and o_weight.dtype.is_floating_point and zf.dtype != o_weight.dtype:
                zf = zf.to(o_weight.dtype)
            out = (attn.hook_out(attn.o(zf)), None)
        if want and cap._stop_after == l:
            raise _Stop
        return out


@contextmanager
def _sdpa_masks(model) -> Iterator[None]:
    """The Hugging Face model builds SDPA-style masks for the pass (None without padding, so no
    [T, T] mask exists at all); the bridge's components do not read the setting."""
    hf = getattr(model, "original_model", None)
    prev = getattr(getattr(hf, "config", None), "_attn_implementation", None)
    switched = False
    if hf is not None and prev not in (None, "sdpa"):
        try:
            hf.set_attn_implementation("sdpa")
            switched = True
        except (ValueError, ImportError, AttributeError, TypeError, NotImplementedError):
            pass
    try:
        yield
    finally:
        if switched:
            hf.set_attn_implementation(prev)


def _check_interventions(interventions: Sequence, layout: AttentionLayout) -> None:
    for item in interventions:
        names = [n for n, _ in item.hooks(layout)] if hasattr(item, "hooks") else [item[0]]
        for n in names:
            if n.endswith(("hook_pattern", "hook_attn_scores")):
                raise SpectraError(f"{type(item).__name__} acts on {n}, which the blocked attention "
                                   f"path never forms; use the eager attention path")


@contextmanager
def blocked_attention(model, *, interventions: Sequence = (), layout: AttentionLayout | None = None,
                      capture: "BlockedCapture | None" = None) -> Iterator[AttentionLayout]:
    """Within the block, `model(...)` runs with every layer's attention computed in query blocks
    (`kernels.attention_blocks`), `interventions` applied at their hooks, and `capture` (if
    given) filled. The model is left as it was on exit, also after an exception."""
    layout = layout or attention_layout(model)
    _check_interventions(interventions, layout)
    runner = _Runner(model, layout, capture)
    with _sdpa_masks(model), runner.replaced(), attached(model, *interventions, *runner.hooks(), layout=layout):
        yield layout


class BlockedCapture:
    """Per-token metrics of every head of `layers`, as `capture.MetricCapture` gives them, from
    one forward pass whose attention is computed in query blocks (no T×T pattern held).

    `top_mass`: the mass of k_eff_top90 (None skips it: NaN, and no row is sorted).
    `block_elements`: score entries per query block (memory ≈ a few times 4 bytes × this).
    `reference` (`spectra_lens.reference.ReferenceNorm`): also "entropy_cf", the exact norm
    counterfactual H(softmax(s · r/‖q‖)) of every row, as `capture.MetricCapture` gives it (NaN
    in layers whose scores are not bilinear in q).
    """

    def __init__(self, layout: AttentionLayout, *, layers: Iterable[int] | None = None,
                 top_mass: float | None = 0.9, block_elements: int = BLOCK_ELEMENTS,
                 reference=None):
        self.layout = layout
        self.layers = tuple(range(layout.n_layers)) if layers is None else tuple(layers)
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise SpectraError(f"layers must name at least one layer, none twice; got {list(self.layers)}")
        for l in self.layers:
            layout.check_head(l, 0)
        if top_mass is not None and not 0 < top_mass <= 1:
            raise SpectraError(f"top_mass must be in (0, 1] or None, got {top_mass}")
        if not (isinstance(block_elements, int) and block_elements > 0):
            raise SpectraError(f"block_elements must be a positive int, got {block_elements!r}")
        self.top_mass = top_mass
        self.block_elements = block_elements
        self.reference = reference
        self._positions: Tensor | None = None
        self._index = {l: i for i, l in enumerate(self.layers)}
        self._out: dict[str, Tensor] = {}
        self._filled: set[int] = set()
        self._sink_index: Tensor | None = None
        self._stop_after: int | None = None

    def _cf_alpha(self, l: int, q_norm: Tensor) -> Tensor:
        """α = r / ‖q‖ [batch, head, pos] of layer `l` (NaN rows where the layer is not bilinear
        in q, so the counterfactual is NaN there, as in the eager capture)."""
        if not self.layout.q_bilinear[l]:
            return torch.full(q_norm.shape, torch.nan, dtype=torch.float64, device=q_norm.device)
        positions = self._positions if self._positions is not None else \
            torch.arange(q_norm.shape[-1], device=q_norm.device)
        return self.reference.alpha(l, q_norm, positions.to(q_norm.device))

    def _put(self, l: int, got: dict[str, Tensor]) -> None:
        for name in METRIC_NAMES + (("entropy_cf",) if self.reference is not None else ()):
            v = got[name]
            out = self._out.get(name)
            if out is None:
                b, h, n = v.shape
                out = self._out[name] = torch.empty(b, len(self.layers), h, n, dtype=torch.float32,
                                                    device=v.device)
            out[:, self._index[l]].copy_(v)
        self._filled.add(l)

    def run(self, model, tokens: Tensor, *, interventions: Sequence = (), attention_mask: Tensor | None = None,
            logits: bool = False) -> TokenMetrics | tuple[TokenMetrics, Tensor]:
        """One forward pass (no grad) of `tokens` [batch, pos] with `interventions`; its
        `TokenMetrics` (and the logits when `logits`; otherwise the pass ends after the last
        captured layer's attention). `attention_mask` [batch, pos] (bool or 0/1; True = real
        token): padding positions get NaN metrics and the sink is each row's first real token."""
        tokens = check_tokens(tokens)
        check_context(model, tokens.shape[1])
        mask = attention_mask_for(tokens, attention_mask=attention_mask)
        device = next(model.parameters()).device
        tokens = tokens.to(device)
        self._out, self._filled = {}, set()
        self._sink_index = None if mask is None else mask.int().argmax(1)
        self._positions = None if mask is None else (mask.long().cumsum(1) - 1).clamp_min(0)
        self._stop_after = None if logits else max(self.layers)
        extra = {} if mask is None else {"attention_mask": mask.long().to(device)}
        out = None
        try:
            with torch.no_grad(), blocked_attention(model, interventions=interventions, layout=self.layout,
                                                    capture=self):
                out = model(tokens, return_type="logits" if logits else None, **extra)
        except _Stop:
            pass
        finally:
            self._stop_after = None
        missing = [l for l in self.layers if l not in self._filled]
        if missing:
            raise SpectraError(f"the forward pass did not reach layers {missing}")
        vals = dict(self._out)
        if mask is not None:
            pad = ~mask.to(vals["entropy"].device)[:, None, None, :]
            vals = {n: v.masked_fill(pad, torch.nan) for n, v in vals.items()}
            mask = mask.cpu()
        self._out, self._filled, self._sink_index, self._positions = {}, set(), None, None
        tm = TokenMetrics(layers=self.layers, attention_mask=mask, **vals)
        return (tm, out) if logits else tm


def capture_metrics_blocked(
    model,
    tokens: Tensor,
    *,
    layers: Iterable[int] | None = None,
    interventions: Sequence = (),
    top_mass: float | None = 0.9,
    attention_mask: Tensor | None = None,
    block_elements: int = BLOCK_ELEMENTS,
    logits: bool = False,
    reference=None,
) -> TokenMetrics | tuple[TokenMetrics, Tensor]:
    """`capture.capture_metrics` with attention in query blocks: the same `TokenMetrics` (every
    metric of `capture.METRIC_NAMES`, [batch, layer, head, pos]; no full patterns), peak memory
    O(block × T) per layer instead of O(T²). With `logits`, also the model's logits; with
    `reference`, also `entropy_cf` (the exact norm counterfactual, see `BlockedCapture`)."""
    layout = attention_layout(model)
    cap = BlockedCapture(layout, layers=layers, top_mass=top_mass, block_elements=block_elements,
                         reference=reference)
    return cap.run(model, tokens, interventions=interventions, attention_mask=attention_mask, logits=logits)

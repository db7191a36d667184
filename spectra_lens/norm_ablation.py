"""Norm ablation: replace a head's query norm by a reference norm, keep its direction, and
measure what follows in the real forward pass; beside it, the baselines on the same head.

**The reference norm.** For head (l, h) and log-position bin b,

    r(l, h, b) = exp( mean of ln ‖q_eff‖ over the selection tokens of the head in bin b ),

the geometric-mean norm of the head's *effective* query (the vector that enters the dot
product: `hook_rot_q` where the bridge has it, else `hook_q`; `AttentionLayout.q_kind`) at
positions of the same bin. Bins (`position_bins`): position 0 alone (bin 0), then
[2^k, 2^(k+1)) as bin k + 1 (positions 1, 2–3, 4–7, ...). The selection sequences come from
documents disjoint from the measured ones (the experiments enforce it and record both document
sets), so r is not fitted on the tokens it is then applied to (`REFERENCE_RULE`).

**The intervention** (`NormReplace`): every query of the head, at every position t, becomes
q'_t = q_t · r(l, h, bin(t)) / ‖q_t‖: its direction is kept, its norm is the reference norm.
What remains of the head's attention is what its query *direction* (and the keys) select; the
natural variation of ‖q‖ around its positional trend is removed. The position trend itself is
kept (r depends on the bin), because position confounds ln ‖q‖ and entropy.

**Baselines on the same head and tokens**: mean ablation of the head's output (`ZReplace`:
`hook_z` of the head replaced by its mean over the selection tokens of the same position bin;
what the head contributes at all), and a norm-preserving rotation of its query by its natural
angular spread (`causal.QueryRotate` at the angle `causal.ROTATION_RULE` defines; how much an
equally "natural" change of direction matters).

**Several heads per pass** (`copy_effects`): the batch is repeated, and copy j (rows
j·B … (j+1)·B − 1) runs with its own intervention (`RowBlocks`), so one forward pass measures
several heads. Layers below the lowest intervened layer of a pass are not recomputed where the
bridge allows it (`skip_support`): their output is the unintervened residual stream entering
that layer, taken from the unintervened pass of the same sequences and injected with the
bridge's `start_at_layer`. `skip_support` checks on a probe that this gives the same logits as
the whole forward, else every pass runs whole.

Outcomes per copy and sequence: Δloss (mean next-token NLL with minus without), KL(p ‖ p_x) of
the next-token distribution (p unintervened, p_x intervened, mean over positions, ≥ 0), the
head's own entropy change and the mean |ΔH| over the heads of later layers. Intervals:
`effect_frame`, a percentile bootstrap that resamples documents (`causal.document_bootstrap`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from spectra_lens.capture import attached
from spectra_lens.causal import ROTATION_RULE, DirectionSpread, document_bootstrap
from spectra_lens.errors import SpectraError
from spectra_lens.layout import AttentionLayout, attention_layout, hook_name
from spectra_lens.present.display import progress_bar
from spectra_lens.validate import check_min_position, check_tokens

__all__ = [
    "REFERENCE_RULE",
    "MEAN_ABLATION_RULE",
    "Copy",
    "CopyEffects",
    "NormReplace",
    "ReferenceNorms",
    "RowBlocks",
    "ZReplace",
    "copy_effects",
    "effect_frame",
    "estimate_reference_norms",
    "position_bins",
    "skip_support",
]

log = logging.getLogger(__name__)

REFERENCE_RULE = (
    "reference norm r(layer, head, bin): exp of the mean of ln ||q_eff|| (the effective query, "
    "the vector entering the dot product) over the selection tokens of the head whose position "
    "lies in the same log-position bin (position 0 alone; then [2^k, 2^(k+1))), i.e. the head's "
    "geometric-mean query norm at that position range; the selection sequences come from "
    "documents disjoint from the measured ones"
)
MEAN_ABLATION_RULE = (
    "mean ablation: the head's hook_z (its attention-weighted values, the input of the output "
    "projection) replaced at every position by its mean over the selection tokens of the same "
    "log-position bin"
)
NORM_REPLACEMENT = "q'_t = q_t * r(layer, head, bin(t)) / ||q_t|| at every position t: direction kept, norm = r"


def _check_shape(x: Tensor, hook: str, expected: tuple, axes: str) -> None:
    if x.ndim != len(expected) or any(e is not None and e != g for e, g in zip(expected, x.shape)):
        want = tuple("?" if e is None else e for e in expected)
        raise SpectraError(f"{hook}: expected [{axes}] = {want}, got {tuple(x.shape)}")


def position_bins(seq_len: int) -> Tensor:
    """LongTensor [seq_len]: the log-position bin of every position (0 for position 0, k + 1
    for positions in [2^k, 2^(k+1)))."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise SpectraError(f"seq_len must be a positive integer, got {seq_len!r}")
    t = torch.arange(seq_len)
    out = torch.zeros(seq_len, dtype=torch.long)
    out[1:] = torch.floor(torch.log2(t[1:].double())).long() + 1
    return out


# --------------------------------------------------------------------------- reference norms


@dataclass(frozen=True, repr=False)
class ReferenceNorms:
    """What the selection pass measured, per head and log-position bin (`REFERENCE_RULE`).

    `log_norm` `[layer, head, bin]`: mean ln ‖q_eff‖; `z_mean` `[layer, head, bin, d_head]`:
    mean hook_z (the mean ablation's value); `counts` `[bin]`: selection tokens per bin (the
    same for every head); `spreads[(l, h)]`: the head's natural direction spread
    (`causal.DirectionSpread`, `causal.ROTATION_RULE`, positions ≥ `min_position`).
    """

    log_norm: Tensor
    z_mean: Tensor
    counts: Tensor
    spreads: dict
    seq_len: int
    min_position: int
    n_sequences: int
    documents: tuple | None = None  # the selection documents (None: not recorded)

    def _bins(self, seq_len: int) -> Tensor:
        bins = position_bins(seq_len)
        missing = sorted({int(b) for b in bins.unique() if b >= self.counts.numel() or self.counts[b] == 0})
        if missing:
            raise SpectraError(f"no selection tokens in position bins {missing}: the reference norms were "
                               f"estimated on {self.seq_len} positions, the sequences have {seq_len}")
        return bins

    def norms(self, layer: int, head: int, seq_len: int) -> Tensor:
        """Float64 [seq_len]: r(layer, head, bin(t)) for every position t."""
        return self.log_norm[layer, head, self._bins(seq_len)].exp()

    def z(self, layer: int, head: int, seq_len: int) -> Tensor:
        """Float64 [seq_len, d_head]: the mean-ablation value of every position."""
        return self.z_mean[layer, head, self._bins(seq_len)]

    def frame(self) -> pd.DataFrame:
        """One row per (layer, head, bin): position range, reference norm, tokens, and the head's
        rotation angle and SD of ln ‖q‖ (per head, repeated over its bins)."""
        n_l, n_h, n_b = self.log_norm.shape
        rows = []
        for l in range(n_l):
            for h in range(n_h):
                sp = self.spreads.get((l, h))
                for b in range(n_b):
                    if self.counts[b] == 0:
                        continue
                    lo = 0 if b == 0 else 2 ** (b - 1)
                    hi = 0 if b == 0 else min(2**b, self.seq_len) - 1
                    rows.append({"layer": l, "head": h, "bin": b, "position_low": lo, "position_high": hi,
                                 "reference_norm": float(self.log_norm[l, h, b].exp()),
                                 "n_tokens": int(self.counts[b]),
                                 "rotation_angle_rad": sp.median_angle if sp else math.nan,
                                 "sd_log_q_norm": sp.sd_log_norm if sp else math.nan})
        return pd.DataFrame(rows)

    def as_dict(self) -> dict:
        """The manifest's record of the reference: rules, sizes, selection documents."""
        return {"rule": REFERENCE_RULE, "norm_replacement": NORM_REPLACEMENT,
                "mean_ablation_rule": MEAN_ABLATION_RULE, "rotation_rule": ROTATION_RULE,
                "n_selection_sequences": self.n_sequences, "seq_len": self.seq_len,
                "min_position_of_rotation_spread": self.min_position,
                "tokens_per_bin": [int(c) for c in self.counts],
                "selection_documents": None if self.documents is None else [int(d) for d in self.documents]}

    def __repr__(self) -> str:
        n_l, n_h, n_b = self.log_norm.shape
        return f"ReferenceNorms(layers={n_l}, heads={n_h}, bins={n_b}, selection sequences={self.n_sequences})"


class _Done(Exception):
    """Raised by the selection pass's last hook: nothing after it is needed."""


def estimate_reference_norms(model, tokens: Tensor, documents=None, *, min_position: int = 1,
                             batch_size: int = 16, spreads: bool = True) -> ReferenceNorms:
    """Reference norms, mean-ablation values and direction spreads of every head from one
    capture pass over `tokens` (the selection sequences, `[batch, pos]`, fixed length, no
    padding). See `REFERENCE_RULE`; ln ‖q‖ and z are accumulated in float64. `spreads` also
    keeps the unit queries at positions ≥ `min_position` to compute each head's median angle
    to its mean direction exactly as `causal.query_direction_spread` does.
    """
    tokens = check_tokens(tokens)
    layout = attention_layout(model)
    n_l, n_h, d = layout.n_layers, layout.n_heads, layout.d_head
    T = tokens.shape[1]
    check_min_position(min_position, T)
    bins = position_bins(T)
    n_b = int(bins.max()) + 1
    z_name = {l: hook_name(l, "z") for l in range(n_l)}
    points = model.hook_dict
    if any(n not in points for n in z_name.values()):
        raise SpectraError("this bridge has no hook_z in every layer; mean ablation needs it")
    log_sum = torch.zeros(n_l, n_h, n_b, dtype=torch.float64)
    z_sum = torch.zeros(n_l, n_h, n_b, d, dtype=torch.float64)
    counts = torch.zeros(n_b, dtype=torch.float64)
    kept: dict[int, list[Tensor]] = {l: [] for l in range(n_l)}
    onehot = torch.nn.functional.one_hot(bins, n_b).double()  # [pos, bin]

    def q_hook(l):
        def fn(x, hook):
            _check_shape(x, layout.q_hook(l), (None, T, n_h, d), "batch pos head d_head")
            x = x.detach().double().cpu()
            log_sum[l] += torch.einsum("bph,pk->hk", x.norm(dim=-1).log(), onehot)
            if spreads:
                kept[l].append(x[:, min_position:].reshape(-1, n_h, d).float())
        return fn

    def z_hook(l):
        def fn(x, hook):
            _check_shape(x, z_name[l], (None, T, n_h, d), "batch pos head d_head")
            z_sum[l] += torch.einsum("bphd,pk->hkd", x.detach().double().cpu(), onehot)
            if l == n_l - 1:
                raise _Done
        return fn

    hooks = [(layout.q_hook(l), q_hook(l)) for l in range(n_l)] + [(z_name[l], z_hook(l)) for l in range(n_l)]
    device = next(model.parameters()).device
    with torch.no_grad():
        for block in tokens.split(batch_size):
            try:
                with attached(model, *hooks, layout=layout):
                    model(block.to(device), return_type=None)
            except _Done:
                pass
            else:
                raise SpectraError(f"the selection pass ended without reaching {z_name[n_l - 1]}")
            counts += onehot.sum(0) * block.shape[0]
    log_norm = log_sum / counts[None, None, :]
    z_mean = z_sum / counts[None, None, :, None]
    out: dict = {}
    if spreads:
        for l in range(n_l):
            q = torch.cat(kept[l]).double()  # [tokens, head, d]
            kept[l] = []
            for h in range(n_h):
                out[(l, h)] = DirectionSpread.of(l, h, q[:, h])
    docs = None if documents is None else tuple(int(x) for x in np.unique(np.asarray(documents)))
    return ReferenceNorms(log_norm, z_mean, counts.long(), out, T, min_position, int(tokens.shape[0]), docs)


# --------------------------------------------------------------------------- interventions


@dataclass(frozen=True)
class NormReplace:
    """The effective query of (layer, head) at position t becomes q_t · norms[t] / ‖q_t‖.

    `norms`: positive float `[pos]` (`ReferenceNorms.norms`), one per position of the pass.
    Computed in float64 and cast back, so ‖q'_t‖ = norms[t] and q'_t ∥ q_t up to the dtype's
    rounding. A zero query stays zero (it has no direction to keep).
    """

    layer: int
    head: int
    norms: Tensor

    def hooks(self, layout: AttentionLayout):
        layout.check_head(self.layer, self.head)
        r = torch.as_tensor(self.norms, dtype=torch.float64)
        if r.ndim != 1 or not torch.isfinite(r).all() or (r <= 0).any():
            raise SpectraError(f"norms must be a 1-D tensor of positive finite values, got {self.norms!r:.80}")
        name, head = layout.q_hook(self.layer), self.head

        def replace(x, hook) -> Tensor:
            _check_shape(x, name, (None, r.shape[0], layout.n_heads, layout.d_head), "batch pos head d_head")
            q = x[:, :, head].double()
            norm = q.norm(dim=-1, keepdim=True)
            factor = torch.where(norm > 0, r.to(q.device)[None, :, None] / norm.clamp_min(1e-300), 0.0)
            out = x.clone()
            out[:, :, head] = (q * factor).to(x.dtype)
            return out

        return [(name, replace)]


@dataclass(frozen=True)
class ZReplace:
    """hook_z of (layer, head) (the head's attention-weighted values, the input of its output
    projection) replaced by `value`: `[d_head]` at every position or `[pos, d_head]`."""

    layer: int
    head: int
    value: Tensor

    def hooks(self, layout: AttentionLayout):
        layout.check_head(self.layer, self.head)
        v = torch.as_tensor(self.value, dtype=torch.float64)
        if v.shape[-1] != layout.d_head or v.ndim not in (1, 2) or not torch.isfinite(v).all():
            raise SpectraError(f"value must be finite [d_head={layout.d_head}] or [pos, d_head], got "
                               f"shape {tuple(v.shape)}")
        name, head = hook_name(self.layer, "z"), self.head

        def replace(x, hook) -> Tensor:
            _check_shape(x, name, (None, None if v.ndim == 1 else v.shape[0], layout.n_heads, layout.d_head),
                         "batch pos head d_head")
            out = x.clone()
            out[:, :, head] = v.to(device=x.device, dtype=x.dtype).expand_as(x[:, :, head])
            return out

        return [(name, replace)]


@dataclass(frozen=True)
class RowBlocks:
    """Several interventions on one batch, each on its own block of rows: `items` holds
    `(intervention, start, stop)`; rows start … stop − 1 see that intervention only. Hooks on
    the same point are merged into one (one copy of the activation per point and pass)."""

    items: tuple

    def hooks(self, layout: AttentionLayout):
        by_name: dict[str, list] = {}
        for iv, start, stop in self.items:
            if not 0 <= start < stop:
                raise SpectraError(f"row block must satisfy 0 <= start < stop, got {start}, {stop}")
            for name, fn in iv.hooks(layout):
                by_name.setdefault(name, []).append((fn, start, stop))

        def merged(parts):
            def fn(x, hook):
                out = x.clone()
                for f, start, stop in parts:
                    if stop > x.shape[0]:
                        raise SpectraError(f"row block {start}:{stop} lies outside the batch of {x.shape[0]} rows")
                    out[start:stop] = f(x[start:stop], hook)
                return out
            return fn

        return [(name, merged(parts)) for name, parts in by_name.items()]


# --------------------------------------------------------------------------- skipping early layers

_SKIP: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _hidden(args, kwargs):
    if args and isinstance(args[0], Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return kwargs["hidden_states"]
    raise SpectraError("a block was called without hidden states")


@contextlib.contextmanager
def _skipped(model, start: int, formats: dict):
    """Blocks below `start` return their input untouched (their output is discarded: block
    `start` takes the injected residual), in the output format `formats[l]` ("tensor" or the
    length of a tuple whose other entries are None)."""
    comps = [model.blocks[l].original_component for l in range(start)]

    def stub(fmt):
        def forward(*args, **kwargs):
            h = _hidden(args, kwargs)
            return h if fmt == "tensor" else (h,) + (None,) * (fmt - 1)
        return forward

    try:
        for l, c in enumerate(comps):
            c.forward = stub(formats[l])
        yield
    finally:
        for c in comps:
            c.__dict__.pop("forward", None)


def _resid_names(n_layers: int) -> list[str]:
    return [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)]


def skip_support(model) -> tuple[bool, str]:
    """(whether `copy_effects` can skip the layers below a pass's first intervened layer, why
    not). Checked once per model on a probe: the logits from the residual entering layer k
    (injected with `start_at_layer`, blocks below k not run) must equal the whole forward's."""
    ok, reason, _ = _skip_state(model)
    return ok, reason


def _skip_state(model):
    try:
        return _SKIP[model]
    except (KeyError, TypeError):
        pass
    got = _probe_skip(model)
    with contextlib.suppress(TypeError):
        _SKIP[model] = got
    return got


def _probe_skip(model):
    layout = attention_layout(model)
    n = layout.n_layers
    names = _resid_names(n)
    if n < 2 or not hasattr(model, "blocks") or any(x not in model.hook_dict for x in names):
        return False, "no blocks.{l}.hook_resid_pre on this bridge", {}
    formats: dict[int, object] = {}

    def record(l):
        def fn(module, args, output):
            if isinstance(output, Tensor):
                formats[l] = "tensor"
            elif isinstance(output, tuple) and output and all(o is None for o in output[1:]):
                formats[l] = len(output)
            else:
                formats[l] = None
        return fn

    device = next(model.parameters()).device
    vocab = int(getattr(model.cfg, "d_vocab", 100) or 100)
    probe = torch.randint(min(vocab, 1000), (2, 8), generator=torch.Generator().manual_seed(0)).to(device)
    resid: dict[int, Tensor] = {}

    def grab(l):
        def fn(x, hook):
            resid[l] = x.detach().clone()
        return fn

    handles = [model.blocks[l].original_component.register_forward_hook(record(l)) for l in range(n)]
    try:
        with torch.no_grad(), attached(model, *[(names[l], grab(l)) for l in range(n)], layout=layout):
            full = model(probe, return_type="logits")
    finally:
        for h in handles:
            h.remove()
    if any(formats.get(l) is None for l in range(n)):
        return False, "a block returns more than its hidden states", {}
    scale = float(full.abs().max())
    for k in sorted({1, n // 2, n - 1}):
        with torch.no_grad(), _skipped(model, k, formats):
            got = model(resid[k], start_at_layer=k, return_type="logits")
        if got.shape != full.shape or not torch.allclose(got, full, atol=1e-5 * scale + 1e-6, rtol=0):
            return False, f"starting at layer {k} from the captured residual did not reproduce the logits", {}
    return True, "", formats


# --------------------------------------------------------------------------- several heads per pass


@dataclass(frozen=True)
class Copy:
    """One intervened copy of the batch: `key` names it in the results; (`layer`, `head`) is
    the intervened head (its own entropy change is reported; heads of layers > `layer` are
    "later"); `intervention` has `.hooks(layout)` and acts on the copy's rows only."""

    key: object
    layer: int
    head: int
    intervention: object


@dataclass(frozen=True, repr=False)
class CopyEffects:
    """Per copy and sequence (`[copy, sequence]`, copies in the order of `keys`): `delta_loss`,
    `kl` (KL(p ‖ p_x), unintervened ‖ intervened), `own_delta_entropy` (the intervened head),
    `later_abs_delta_entropy` (mean over every head of the later layers of |ΔH|, NaN in the last
    layer). `base_loss` `[sequence]`; `skipped`: whether early layers were skipped, `reason`."""

    keys: tuple
    delta_loss: Tensor
    kl: Tensor
    own_delta_entropy: Tensor
    later_abs_delta_entropy: Tensor
    base_loss: Tensor
    skipped: bool
    reason: str
    n_passes: int

    def __repr__(self) -> str:
        return (f"CopyEffects(copies={len(self.keys)}, sequences={self.kl.shape[1]}, passes={self.n_passes}, "
                f"skipped early layers={self.skipped})")


def _entropy_hooks(layout: AttentionLayout, layers: Iterable[int], store: dict, min_position: int):
    """Per-sequence mean entropy over query rows ≥ min_position of every head, `[batch, head]`."""
    out = []
    for l in layers:
        name = hook_name(l, "pattern")

        def fn(p, hook, l=l, name=name):
            _check_shape(p, name, (None, layout.n_heads, None, None), "batch head query_pos key_pos")
            p = p.detach()[:, :, min_position:].float()
            store[l] = -torch.special.xlogy(p, p).sum(-1).mean(-1).double().cpu()
        out.append((name, fn))
    return out


def _nll(logp: Tensor, tokens: Tensor) -> Tensor:
    return -logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1).double().mean(-1)


def _nll_kl(logits: Tensor, base_logp: Tensor, tokens: Tensor, rows: int = 4) -> tuple[Tensor, Tensor]:
    """(mean next-token NLL, mean over positions of KL(p_base || p)) per sequence, in float64,
    `rows` sequences at a time (the vocabulary axis is the large one)."""
    nll, kl = [], []
    for s in range(0, logits.shape[0], rows):
        logp = torch.log_softmax(logits[s : s + rows].double(), -1)
        base = base_logp[s : s + rows]
        nll.append(_nll(logp, tokens[s : s + rows]).cpu())
        # per position KL >= 0; float64 rounding can leave -1e-17 where nothing changed
        kl.append((base.exp() * (base - logp)).sum(-1).clamp_min(0).mean(-1).cpu())
        del logp
    return torch.cat(nll), torch.cat(kl)


def copy_effects(model, tokens: Tensor, copies: Sequence[Copy], *, min_position: int = 1, max_rows: int = 32,
                 skip_layers: bool | None = None, progress: bool = False) -> CopyEffects:
    """Every copy's outcomes on `tokens` (`[batch, pos]`, fixed length, no padding), several
    copies per forward pass (`max_rows` rows: copies of a block of at most `max_rows`
    sequences). Copies are run in the order of their layer, so a pass's copies share the
    layers it can skip (`skip_layers`: None = where `skip_support` allows, False = never).
    """
    tokens = check_tokens(tokens)
    layout = attention_layout(model)
    check_min_position(min_position, tokens.shape[1])
    if not isinstance(max_rows, int) or max_rows < 1:
        raise SpectraError(f"max_rows must be a positive integer, got {max_rows!r}")
    copies = list(copies)
    if not copies:
        raise SpectraError("copy_effects needs at least one copy, got none")
    for c in copies:
        layout.check_head(c.layer, c.head)
    ok, reason, formats = _skip_state(model) if skip_layers is not False else (False, "not asked", {})
    skip = ok and skip_layers is not False
    n_l, n_seq = layout.n_layers, tokens.shape[0]
    device = next(model.parameters()).device
    sb = min(n_seq, max_rows)
    per_pass = max(1, max_rows // sb)
    order = sorted(range(len(copies)), key=lambda i: (copies[i].layer, i))
    chunks = [order[i : i + per_pass] for i in range(0, len(order), per_pass)]
    starts = list(range(0, n_seq, sb))
    shape = (len(copies), n_seq)
    d_loss, kl, own, later = (torch.full(shape, math.nan, dtype=torch.float64) for _ in range(4))
    base_loss = torch.empty(n_seq, dtype=torch.float64)
    bar = progress_bar(total=len(starts) * (1 + len(chunks)), unit="pass", enabled=progress,
                       desc=f"{len(copies)} interventions")
    n_passes = 0
    with torch.no_grad():
        for s0 in starts:
            block = tokens[s0 : s0 + sb].to(device)
            b = block.shape[0]
            ent0: dict[int, Tensor] = {}
            resid: dict[int, Tensor] = {}

            def grab(l, store=resid):
                def fn(x, hook):
                    store[l] = x.detach().clone()
                return fn

            hooks = _entropy_hooks(layout, range(n_l), ent0, min_position)
            if skip:
                hooks += [(n, grab(l)) for l, n in enumerate(_resid_names(n_l))]
            with attached(model, *hooks, layout=layout):
                logits = model(block, return_type="logits")
            base_logp = torch.log_softmax(logits.double(), -1)
            del logits
            nll0 = _nll(base_logp, block).cpu()
            base_loss[s0 : s0 + b] = nll0
            base_ent = torch.stack([ent0[l] for l in range(n_l)], 1)  # [b, layer, head]
            n_passes += 1
            bar.update(1)
            for chunk in chunks:
                first = min(copies[i].layer for i in chunk)
                k = len(chunk)
                rows = RowBlocks(tuple((copies[i].intervention, j * b, (j + 1) * b) for j, i in enumerate(chunk)))
                ent: dict[int, Tensor] = {}
                caps = _entropy_hooks(layout, range(first, n_l), ent, min_position)
                if skip and first > 0:
                    inp = resid[first].repeat(k, 1, 1)
                    with _skipped(model, first, formats), attached(model, rows, *caps, layout=layout):
                        logits = model(inp, start_at_layer=first, return_type="logits")
                else:
                    with attached(model, rows, *caps, layout=layout):
                        logits = model(block.repeat(k, 1), return_type="logits")
                n_passes += 1
                for j, i in enumerate(chunk):
                    c = copies[i]
                    sl = slice(j * b, (j + 1) * b)
                    nll, kl[i, s0 : s0 + b] = _nll_kl(logits[sl], base_logp, block)
                    d_loss[i, s0 : s0 + b] = nll - nll0
                    e = torch.stack([ent[l][sl] for l in range(first, n_l)], 1)  # [b, layers >= first, head]
                    own[i, s0 : s0 + b] = e[:, c.layer - first, c.head] - base_ent[:, c.layer, c.head]
                    if c.layer + 1 < n_l:
                        dh = e[:, c.layer + 1 - first :] - base_ent[:, c.layer + 1 :]
                        later[i, s0 : s0 + b] = dh.abs().mean((1, 2))
                del logits
                bar.update(1)
            del base_logp
            resid.clear()
    bar.close()
    return CopyEffects(tuple(c.key for c in copies), d_loss, kl, own, later, base_loss, skip,
                       reason if not skip else "", n_passes)


OUTCOMES = {
    "kl": "mean over positions of KL(p || p_x) of the next-token distribution, p unintervened, "
          "p_x intervened (nats, >= 0)",
    "delta_loss": "mean next-token NLL (nats) with the intervention minus without",
    "own_delta_entropy": "the intervened head's own mean entropy change (nats)",
    "later_abs_delta_entropy": "mean over every head of the later layers of |mean entropy change| (nats); "
                               "NaN for heads of the last layer",
}


def effect_frame(effects: CopyEffects, documents=None, *, prefix: str = "", ci: float = 0.95,
                 n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per copy (in `effects.keys` order): every outcome of `OUTCOMES` as `{prefix}{name}`
    with `_ci_low` / `_ci_high`, a percentile bootstrap of the mean over sequences that
    resamples documents (`documents`: one id per sequence; None: each sequence its own)."""
    cols: dict[str, object] = {}
    for name in OUTCOMES:
        v = getattr(effects, name).T.numpy()  # [sequence, copy]
        finite = np.isfinite(v).all(0)
        mean = np.full(v.shape[1], np.nan)
        low, high = mean.copy(), mean.copy()
        if finite.any():
            m, lo, hi = document_bootstrap(v[:, finite], documents, ci=ci, n_boot=n_boot, seed=seed)
            mean[finite], low[finite], high[finite] = m, lo, hi
        cols[f"{prefix}{name}"], cols[f"{prefix}{name}_ci_low"], cols[f"{prefix}{name}_ci_high"] = mean, low, high
    return pd.DataFrame(cols)

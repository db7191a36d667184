"""Query-scale sweeps, as two questions and the analytic gain.

**Each head's own α-curve** (`head_curves`): every head's attention metrics when only that
head's query is scaled by α. Scaling the effective query of one head by α turns its logits s into
α·s wherever the logits are bilinear in q and k (`AttentionLayout.q_bilinear`), so its pattern
becomes

    p(α) = softmax(α·s)  (= p^α / Σ p^α, `metrics.rescale_pattern`).

That is the fast path: one unscaled forward pass, capture hooks (`capture.SweepCapture`) on
`hook_attn_scores` (where `layout.scores_faithful`; else log `hook_pattern`, which is s up to a
per-row constant) and `hook_pattern`, and, inside each hook, the metrics of softmax(α·s) for
every head and every α of the grid (`kernels.alpha.alpha_metrics`), reduced to per-sequence means at
once. Where the logits are not bilinear (soft-capping, ALiBi, scaling undone by a norm) the
exact mode runs: the real forward pass with `interventions.QueryScale` and the α grid batched
(`interventions.repeat_for_alphas`). `method="auto"` picks per layer and records the choice (`method`
= "fast" | "exact", `reason` from `layout.q_reason`); "fast" and "exact" force one mode.
A head's own curve follows from the mathematics (dH/d ln α = −α² Var_p(s) ≤ 0): it checks the
hooks and measures the gain's size, it is not evidence that the model uses query norm.

**One intervention's consequences** (`intervention_effects`): one intervention, given as a
function of its value (`interventions.Scan`: `QueryScale.scan(layer, head)`, `KeyScale.scan`,
`LogitScale.scan`, `QueryRotate.scan`), at every value of the grid in real forward passes, and
what follows from it: the metrics of every head (the scaled head's own and every later head's),
the next-token loss and KL(p_1 ‖ p_α) (unscaled ‖ scaled) of the output distribution. Several
scans run in step, one forward pass of each at a time, and can hand each pass's attention
patterns to a reducer (`on_patterns`) instead of keeping them.

**The analytic gain** (`analytic_gain`): dH/d ln α at α = 1 = −Var_p(s), from one pass.

All head metrics are per-sequence means over query positions ≥ `min_position` (position 0 sees
only itself); `stats.t_interval` gives intervals over sequences. k_eff definitions:
`metrics.K_EFF_DEFINITIONS`.
"""

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import no_type_check

import torch
from jaxtyping import Float, Int
from torch import Tensor

from spectra_lens import metrics as M
from spectra_lens.capture import SweepCapture, tokens_and_mask
from spectra_lens.errors import SpectraError
from spectra_lens.interventions import QueryScale, Scan, repeat_for_alphas
from spectra_lens.kernels.blocked import ALPHA_CHUNK_ELEMENTS
from spectra_lens.layout import AttentionLayout, attention_layout
from spectra_lens.present.display import progress_bar
from spectra_lens.sweep_results import (
    ExactSweep,
    HeadMetrics,
    HeadSweep,
    PassPatterns,
    _stack_metrics,
)
from spectra_lens.validate import (
    HeadRef,
    check_alphas,
    check_int,
    check_min_position,
    check_tokens,
)

__all__ = [
    "ExactSweep",
    "HeadMetrics",
    "HeadSweep",
    "analytic_gain",
    "head_curves",
    "PassPatterns",
    "intervention_effects",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- validation


def _check_layers(layout: AttentionLayout, layers: Iterable[int] | None) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(layout.n_layers))
    out = tuple(layers)
    if not out:
        raise SpectraError("layers must name at least one layer, got none")
    for l in out:
        layout.check_head(l, 0)
    if len(set(out)) != len(out):
        raise SpectraError(f"layers must be distinct, got {list(out)}")
    return tuple(sorted(out))


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _batches(tokens: Tensor, batch_size: int | None, mask: Tensor | None = None
             ) -> list[tuple[Tensor, Tensor | None]]:
    """(tokens, mask or None) per batch of at most `batch_size` sequences."""
    size = tokens.shape[0] if batch_size is None else check_int("batch_size", batch_size)
    masks = [None] * -(-tokens.shape[0] // size) if mask is None else list(mask.split(size))
    return list(zip(tokens.split(size), masks))


# --------------------------------------------------------------------------- the fast path


def _fast_and_gain(model, layout, tokens, alphas, *, sweep_layers, gain_layers, min_position,
                   batch_size, chunk_elements, progress, mask=None):
    """({layer: {metric: [alpha, batch, head]}}, {layer: gain [batch, head]}) from unscaled passes."""
    device = _device(model)
    metrics: dict[int, dict[str, list[Tensor]]] = {l: {n: [] for n in M.SWEEP_METRICS} for l in sweep_layers}
    gain: dict[int, list[Tensor]] = {l: [] for l in gain_layers}
    batches = _batches(tokens, batch_size, mask)
    bar = progress_bar(total=len(batches), desc="α-curves (fast path)", unit="batch", enabled=progress)
    for batch, batch_mask in batches:
        cap = SweepCapture(layout, layers=sweep_layers, alphas=alphas, gain_layers=gain_layers,
                            min_position=min_position, chunk_elements=chunk_elements,
                            attention_mask=batch_mask)
        cap.run(model, batch.to(device))
        for l in sweep_layers:
            for n in M.SWEEP_METRICS:
                metrics[l][n].append(cap.metrics[l][n])
        for l in gain_layers:
            gain[l].append(cap.gain[l])
        bar.update(1)
    bar.close()
    return (
        {l: {n: torch.cat(v, dim=1) for n, v in d.items()} for l, d in metrics.items()},
        {l: torch.cat(v, dim=0) for l, v in gain.items()},
    )


def _fast_curves(
    model,
    tokens: Int[Tensor, "batch pos"],
    alphas: Sequence[float],
    *,
    layers: Iterable[int] | None = None,
    min_position: int = 1,
    batch_size: int | None = None,
    chunk_elements: int = ALPHA_CHUNK_ELEMENTS,
    progress: bool = False,
    attention_mask: Tensor | None = None,
) -> HeadSweep:
    """Every head of `layers` at every α via p(α) = softmax(α·s), from unscaled forward passes.

    Refuses (SpectraError) a layer whose logits are not bilinear in the query
    (`layout.q_bilinear`), where softmax(α·s) is not what query scaling does; `head_curves`
    falls back to the exact mode there.
    """
    tokens = check_tokens(tokens)
    alphas = check_alphas(alphas)
    layout = attention_layout(model)
    layers = _check_layers(layout, layers)
    check_min_position(min_position, tokens.shape[1])
    refused = [l for l in layers if not layout.fast_path_ok(l)]
    if refused:
        raise SpectraError(
            f"the fast path softmax(α·s) does not hold in layers {refused}: "
            f"{layout.q_reason[refused[0]]}; use head_curves(method='auto') or method='exact' there"
        )
    metrics, gain = _fast_and_gain(
        model, layout, tokens, alphas, sweep_layers=layers, gain_layers=layers,
        min_position=min_position, batch_size=batch_size, chunk_elements=chunk_elements,
        progress=progress, mask=attention_mask,
    )
    return HeadSweep(
        alphas=alphas,
        metrics=_stack_metrics(layers, metrics, dim=2),
        local_gain=torch.stack([gain[l] for l in layers], dim=1),
        method=("fast",) * len(layers),
        reason=(None,) * len(layers),
        min_position=min_position,
    )


# --------------------------------------------------------------------------- exact mode


def _plan(n_batch: int, n_alpha: int, max_rows: int) -> tuple[int, int]:
    """(sequences per block, alphas per chunk) so that one forward holds <= max_rows rows."""
    check_int("max_rows", max_rows)
    seq_block = min(n_batch, max_rows)
    return seq_block, max(1, min(n_alpha, max_rows // seq_block))


def _exact_layers(model, layout, tokens, alphas, *, layers, min_position, max_rows, progress,
                  mask=None):
    """{layer: {metric: [alpha, batch, head]}}: all heads of a layer scaled at once, per layer.

    Scaling head h's query changes only head h's logits in its own layer, so one pass per layer
    (and α chunk), stopped after that layer, measures every head of it.
    """
    device = _device(model)
    n_alpha, n_heads = len(alphas), layout.n_heads
    seq_block, chunk = _plan(tokens.shape[0], n_alpha, max_rows)
    starts = range(0, tokens.shape[0], seq_block)
    alpha_chunks = [alphas[i : i + chunk] for i in range(0, n_alpha, chunk)]
    bar = progress_bar(total=len(layers) * len(starts) * len(alpha_chunks), unit="pass",
                       desc="α-curves (exact)", enabled=progress)
    out: dict[int, dict[str, Tensor]] = {}
    for l in layers:
        per_block = []
        for s in starts:
            block = tokens[s : s + seq_block].to(device)
            block_mask = None if mask is None else mask[s : s + seq_block]
            per_chunk = []
            for a in alpha_chunks:
                rows, row_alpha = repeat_for_alphas(block, a)
                cap = SweepCapture(layout, layers=[l], min_position=min_position,
                                   attention_mask=None if mask is None else block_mask.repeat(len(a), 1))
                cap.run(model, rows, interventions=[QueryScale(l, h, row_alpha) for h in range(n_heads)])
                per_chunk.append({n: v.view(len(a), block.shape[0], n_heads) for n, v in cap.metrics[l].items()})
                bar.update(1)
            per_block.append({n: torch.cat([c[n] for c in per_chunk], dim=0) for n in M.SWEEP_METRICS})
        out[l] = {n: torch.cat([b[n] for b in per_block], dim=1) for n in M.SWEEP_METRICS}
    bar.close()
    return out


def _exact_curves(
    model,
    tokens: Int[Tensor, "batch pos"],
    alphas: Sequence[float],
    *,
    layers: Iterable[int] | None = None,
    min_position: int = 1,
    max_rows: int = 32,
    progress: bool = False,
    attention_mask: Tensor | None = None,
) -> HeadSweep:
    """Every head of `layers` at every α, each measured in real forward passes with QueryScale.

    Valid in every layer (soft-capping, ALiBi, ...); costs ⌈α·batch / max_rows⌉ forward passes
    per layer, each stopped after that layer.
    """
    tokens = check_tokens(tokens)
    alphas = check_alphas(alphas)
    layout = attention_layout(model)
    layers = _check_layers(layout, layers)
    check_min_position(min_position, tokens.shape[1])
    metrics = _exact_layers(model, layout, tokens, alphas, layers=layers,
                            min_position=min_position, max_rows=max_rows, progress=progress,
                            mask=attention_mask)
    gain = analytic_gain(model, tokens, layers=layers, min_position=min_position, batch_size=max_rows,
                         attention_mask=attention_mask)
    return HeadSweep(
        alphas=alphas,
        metrics=_stack_metrics(layers, metrics, dim=2),
        local_gain=gain,
        method=("exact",) * len(layers),
        reason=tuple(layout.q_reason[l] or "exact mode requested" for l in layers),
        min_position=min_position,
    )


def head_curves(
    model,
    tokens: Int[Tensor, "batch pos"] | str | list[str],
    alphas: Sequence[float],
    *,
    method: str = "auto",
    layers: Iterable[int] | None = None,
    min_position: int = 1,
    batch_size: int | None = None,
    max_rows: int = 32,
    chunk_elements: int = ALPHA_CHUNK_ELEMENTS,
    progress: bool = False,
    attention_mask: Tensor | None = None,
    pad_id: int | None = None,
) -> HeadSweep:
    """Each head's own metrics at every α of the grid, when only that head's query is scaled.

    `method`: "auto" (the fast path softmax(α·s) in layers whose logits are bilinear in q, the
    exact forward pass elsewhere), "fast" (refuses non-bilinear layers) or "exact" (real forward
    passes with `QueryScale` in every layer; ⌈α·batch / max_rows⌉ passes per layer). `batch_size`
    bounds the sequences per fast-path pass, `max_rows` the rows per exact pass. The result's
    `method` / `reason` say which layer got which and why.

    Padded batches: `attention_mask` (1 = real token) or `pad_id` (see
    `capture.attention_mask_for`); padding is left out of every mean. Texts are tokenized with the
    model's padding and their mask.
    """
    tokens, mask = tokens_and_mask(model, tokens, attention_mask=attention_mask, pad_id=pad_id)
    if method == "auto":
        return _auto_curves(model, tokens, alphas, layers=layers, min_position=min_position,
                            batch_size=batch_size, max_rows=max_rows,
                            chunk_elements=chunk_elements, progress=progress, attention_mask=mask)
    if method == "fast":
        return _fast_curves(model, tokens, alphas, layers=layers, min_position=min_position,
                            batch_size=batch_size, chunk_elements=chunk_elements,
                            progress=progress, attention_mask=mask)
    if method == "exact":
        return _exact_curves(model, tokens, alphas, layers=layers, min_position=min_position,
                             max_rows=max_rows, progress=progress, attention_mask=mask)
    raise SpectraError(f"method must be 'auto', 'fast' or 'exact', got {method!r}")


def _auto_curves(
    model,
    tokens: Int[Tensor, "batch pos"],
    alphas: Sequence[float],
    *,
    layers: Iterable[int] | None = None,
    min_position: int = 1,
    batch_size: int | None = None,
    max_rows: int = 32,
    chunk_elements: int = ALPHA_CHUNK_ELEMENTS,
    progress: bool = False,
    attention_mask: Tensor | None = None,
) -> HeadSweep:
    """Every head at every α: the fast path where the layer is bilinear in q, exact elsewhere.

    `method` / `reason` of the result say which layer got which and why.
    """
    tokens = check_tokens(tokens)
    alphas = check_alphas(alphas)
    layout = attention_layout(model)
    layers = _check_layers(layout, layers)
    check_min_position(min_position, tokens.shape[1])
    fast = [l for l in layers if layout.fast_path_ok(l)]
    exact = [l for l in layers if not layout.fast_path_ok(l)]
    if exact:
        log.info("fast path refused in layers %s (%s); using the exact mode there",
                 exact, layout.q_reason[exact[0]])
    metrics, gain = _fast_and_gain(
        model, layout, tokens, alphas, sweep_layers=fast, gain_layers=layers,
        min_position=min_position, batch_size=batch_size, chunk_elements=chunk_elements,
        progress=progress, mask=attention_mask,
    )
    if exact:
        metrics |= _exact_layers(model, layout, tokens, alphas, layers=exact,
                                 min_position=min_position, max_rows=max_rows, progress=progress,
                                 mask=attention_mask)
    return HeadSweep(
        alphas=alphas,
        metrics=_stack_metrics(layers, metrics, dim=2),
        local_gain=torch.stack([gain[l] for l in layers], dim=1),
        method=tuple("fast" if layout.fast_path_ok(l) else "exact" for l in layers),
        reason=tuple(None if layout.fast_path_ok(l) else layout.q_reason[l] for l in layers),
        min_position=min_position,
    )


def analytic_gain(
    model,
    tokens: Int[Tensor, "batch pos"] | str | list[str],
    *,
    layers: Iterable[int] | None = None,
    min_position: int = 1,
    batch_size: int | None = None,
    attention_mask: Tensor | None = None,
    pad_id: int | None = None,
) -> Float[Tensor, "batch layer head"]:
    """dH/d ln α at α = 1 = −Var_p(s), per-sequence mean over positions ≥ min_position
    (real tokens only, with `attention_mask` or `pad_id`; see `capture.attention_mask_for`).

    One unscaled forward pass (stopped after the last layer asked for). It is the local gain
    under query scaling only where the layer is bilinear in q (`layout.q_bilinear`); elsewhere it
    is the gain under a temperature on the final logits (`interventions.LogitScale`). `tokens`: ids or
    text (`capture.tokens_and_mask`).
    """
    tokens, mask = tokens_and_mask(model, tokens, attention_mask=attention_mask, pad_id=pad_id)
    layout = attention_layout(model)
    layers = _check_layers(layout, layers)
    check_min_position(min_position, tokens.shape[1])
    _, gain = _fast_and_gain(
        model, layout, tokens, (1.0,), sweep_layers=(), gain_layers=layers,
        min_position=min_position, batch_size=batch_size, chunk_elements=ALPHA_CHUNK_ELEMENTS,
        progress=False, mask=mask,
    )
    return torch.stack([gain[l] for l in layers], dim=1)


def _label(interventions) -> str:
    """Short name of interventions for a progress bar: "QueryScale L12H0", "KeyScale L12 KV1"."""
    def one(iv) -> str:
        if getattr(iv, "head", None) is not None:
            return f"{type(iv).__name__} {HeadRef(iv.layer, iv.head)}"
        return f"{type(iv).__name__} L{iv.layer} KV{iv.kv_head}"

    return " + ".join(one(iv) for iv in interventions) or "no intervention"


def _output_effects(logits: Tensor, base_logp: Tensor, tokens: Tensor, mask: Tensor | None = None
                    ) -> tuple[Tensor, Tensor]:
    """(mean next-token NLL, mean KL(p_base ‖ p)) per sequence of one block, in float32; with
    `mask`, over real positions only (the NLL over real tokens predicted from real tokens)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    # kl_div(input, target) = Σ target · (log target − input): KL(p_base ‖ p), unscaled ‖ scaled
    kl = torch.nn.functional.kl_div(logp, base_logp, log_target=True, reduction="none").sum(-1)
    return _next_token_nll(logp, tokens, mask), _masked_mean(kl, mask)


def _next_token_nll(logp: Tensor, tokens: Tensor, mask: Tensor | None) -> Tensor:
    nll = -logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return _masked_mean(nll, None if mask is None else mask[:, :-1] & mask[:, 1:])


def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the last axis; over the True entries of `mask` when given."""
    if mask is None:
        return x.mean(-1)
    m = mask.to(x.device)
    return torch.where(m, x, 0.0).sum(-1) / m.sum(-1).clamp_min(1)


@no_type_check  # validates its input itself (SpectraError), as capture.capture_metrics
def intervention_effects(
    model,
    tokens: Int[Tensor, "batch pos"] | str | list[str],
    alphas: Sequence[float],
    scans: Scan | Mapping[str, Scan],
    *,
    layers: Iterable[int] | None = None,
    patterns_for: Iterable[tuple[int, int]] = (),
    on_patterns: Callable[[dict[str, PassPatterns]], None] | None = None,
    min_position: int = 1,
    max_rows: int = 32,
    progress: bool = False,
    attention_mask: Tensor | None = None,
    pad_id: int | None = None,
) -> ExactSweep | dict[str, ExactSweep]:
    """An intervention at every α of the grid in real forward passes: metrics of every head of
    `layers`, next-token loss and KL(p_1 ‖ p_α) (unscaled ‖ scaled). Padding (`attention_mask` or
    `pad_id`, see `capture.attention_mask_for`) is left out of every mean.

    `scans` is a `Scan` (`QueryScale.scan(layer, head)`, `KeyScale.scan(layer, kv_head)`,
    `LogitScale.scan(...)`, `QueryRotate.scan(...)`: the intervention as a function of its value),
    giving an `ExactSweep`; or `{name: Scan}`, giving `{name: ExactSweep}` on the same tokens and
    grid, run pass by pass in step. α values are batched (copy j of the batch runs with α_j) in
    chunks of at most `max_rows` rows, so the logits held at once are `max_rows × pos × vocab`
    floats, and the KL and loss are computed one batch block at a time. A grid value equal to the
    scan's identity (α = 1; angle 0 for QueryRotate) reuses the unscaled pass
    (`causal.sham_check` runs the hook at α = 1 for real).

    The full patterns of the heads in `patterns_for` are kept (`ExactSweep.patterns`,
    `[alpha, batch, query_pos, key_pos]` each), unless `on_patterns` is given: then after the
    i-th forward pass of every scan, `on_patterns({name: PassPatterns})` (name: the scan's label
    for a single `Scan`) sees that pass's patterns of each side by side (same block of sequences,
    same α values), and they are dropped: memory holds one pass's patterns per scan, never a
    sweep's.
    """
    single = isinstance(scans, Scan)
    named = {scans.label: scans} if single else scans
    if not isinstance(named, Mapping) or not named:
        raise SpectraError(f"scans must be a Scan (e.g. QueryScale.scan(layer, head)) or a non-empty "
                           f"{{name: Scan}}, got {scans!r}")
    runs = {name: _intervention_passes(
        model, tokens, alphas, scan, layers=layers, patterns_for=patterns_for,
        min_position=min_position, max_rows=max_rows, progress=progress,
        attention_mask=attention_mask, pad_id=pad_id, keep_patterns=on_patterns is None)
        for name, scan in named.items()}
    sweeps: dict[str, ExactSweep] = {}
    while not sweeps:
        step: dict[str, PassPatterns] = {}
        for name, run in runs.items():
            try:
                step[name] = next(run)
            except StopIteration as done:
                sweeps[name] = done.value
        if step and sweeps:  # every run has the same plan (tokens, grid, max_rows): they end together
            raise SpectraError(f"scans fell out of step: {sorted(sweeps)} ended before {sorted(step)}")
        if step:
            first = next(iter(step.values()))
            for name, got in step.items():
                if (got.start, sorted(got.scaled)) != (first.start, sorted(first.scaled)):
                    raise SpectraError(f"scans fell out of step: {name} ran {got!r}, others {first!r}")
            if on_patterns is not None:
                on_patterns(step)
        del step  # this pass's patterns go before the next pass runs
    return next(iter(sweeps.values())) if single else sweeps


def _intervention_passes(model, tokens, alphas, scan, *, layers, patterns_for, min_position,
                         max_rows, progress, attention_mask, pad_id, keep_patterns):
    """The exact sweep of `intervention_effects` as a generator: yields a `PassPatterns` after
    every forward pass and returns the `ExactSweep` (with patterns only when `keep_patterns`)."""
    tokens, mask = tokens_and_mask(model, tokens, attention_mask=attention_mask, pad_id=pad_id)
    alphas = check_alphas(alphas)
    layout = attention_layout(model)
    layers = _check_layers(layout, layers)
    check_min_position(min_position, tokens.shape[1])
    if not isinstance(scan, Scan):
        raise SpectraError(f"scans must be a Scan (e.g. QueryScale.scan(layer, head)) or a non-empty "
                           f"{{name: Scan}}, got {{..: {scan!r}}}")
    identity = scan.identity
    first = list(scan.at(identity))
    for iv in first:
        iv.hooks(layout)  # validates its layer / head against this model now
    patterns_for = tuple((int(l), int(h)) for l, h in patterns_for)
    for l, h in patterns_for:
        layout.check_head(l, h)
    device = _device(model)
    n_batch = tokens.shape[0]
    n_alpha = len(alphas)
    seq_block, chunk = _plan(n_batch, n_alpha, max_rows)
    todo = [i for i in range(n_alpha) if alphas[i] != identity]
    chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    starts = list(range(0, n_batch, seq_block))
    bar = progress_bar(total=len(starts) * (1 + len(chunks)), unit="pass", enabled=progress,
                       desc=f"{_label(first)} at {n_alpha} α")

    def capture(m):
        return SweepCapture(layout, layers=layers, gain_layers=layers, patterns_for=patterns_for,
                            min_position=min_position, attention_mask=m)

    blocks = []  # per sequence block: (unscaled metrics, gain, base nll, {α index: results})
    for s in starts:
        block = tokens[s : s + seq_block].to(device)
        block_mask = None if mask is None else mask[s : s + seq_block].to(device)
        b = block.shape[0]
        cap = capture(block_mask)
        base_logp = torch.log_softmax(cap.run(model, block, logits=True).float(), dim=-1)
        base_nll = _next_token_nll(base_logp, block, block_mask).cpu()
        kept = cap.patterns if keep_patterns else None
        base = (cap.metrics, cap.gain, base_nll, kept)
        bar.update(1)
        same = [i for i in range(n_alpha) if alphas[i] == identity]
        got: dict[int, tuple] = {i: (cap.metrics, base_nll, torch.zeros(b), kept) for i in same}
        yield PassPatterns(start=s, base=cap.patterns, scaled={i: cap.patterns for i in same})
        for idx in chunks:
            rows, row_alpha = repeat_for_alphas(block, [alphas[i] for i in idx])
            cap_a = capture(None if block_mask is None else block_mask.repeat(len(idx), 1))
            logits = cap_a.run(model, rows, interventions=list(scan.at(row_alpha)), logits=True)
            pats = {}
            for j, i in enumerate(idx):
                sl = slice(j * b, (j + 1) * b)
                nll, kl = _output_effects(logits[sl], base_logp, block, block_mask)
                pats[i] = {k: v[sl] for k, v in cap_a.patterns.items()}
                got[i] = ({l: {n: v[sl] for n, v in d.items()} for l, d in cap_a.metrics.items()},
                          nll.cpu(), kl.cpu(), pats[i] if keep_patterns else None)
            del logits
            bar.update(1)
            yield PassPatterns(start=s, base=cap.patterns, scaled=pats)
            del pats, cap_a  # this pass's patterns are not held while the next one runs
        blocks.append((base, got))
        del base_logp
    bar.close()

    def per_layer(pick):  # {layer: {metric: [batch, head]}} for one α (or the unscaled pass)
        return {l: {n: torch.cat([pick(bl)[l][n] for bl in blocks], dim=0) for n in M.SWEEP_METRICS}
                for l in layers}

    scaled_layers = [per_layer(lambda bl, i=i: bl[1][i][0]) for i in range(n_alpha)]
    return ExactSweep(
        alphas=alphas,
        intervention=scan.label,
        scaled=HeadMetrics(layers=layers, **{
            n: torch.stack([torch.stack([d[l][n] for l in layers], dim=1) for d in scaled_layers])
            for n in M.SWEEP_METRICS}),
        unscaled=_stack_metrics(layers, per_layer(lambda bl: bl[0][0]), dim=1),
        loss=torch.stack([torch.cat([bl[1][i][1] for bl in blocks]) for i in range(n_alpha)]),
        base_loss=torch.cat([bl[0][2] for bl in blocks]),
        kl=torch.stack([torch.cat([bl[1][i][2] for bl in blocks]) for i in range(n_alpha)]),
        local_gain=torch.stack([torch.cat([bl[0][1][l] for bl in blocks]) for l in layers], dim=1),
        min_position=min_position,
        patterns={k: torch.stack([torch.cat([bl[1][i][3][k] for bl in blocks]) for i in range(n_alpha)])
                  for k in patterns_for} if keep_patterns else {},
        base_patterns={k: torch.cat([bl[0][3][k] for bl in blocks]) for k in patterns_for} if keep_patterns else {},
    )

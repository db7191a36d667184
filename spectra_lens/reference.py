"""The reference query norm of every head: the norm of the exact norm counterfactual.

For head (l, h) and log-position bin b (`metrics.log_position_bin`, octaves of t + 1):

    r[l, h, b] = exp( mean of ln ‖q_eff‖ over the selection tokens of bin b ),

the geometric-mean norm of the head's effective query (the vector that enters the dot product,
`layout.q_hook`) at positions t ≥ min_position of the *selection documents*
(`selection_documents`: a seeded random quarter of the documents, disjoint from the documents the
counterfactual is measured on). A token at position t with query q then gets α = r[l, h, b(t)] / ‖q‖:
its query with the same direction and the reference norm, and its counterfactual entropy
H_cf = H(softmax(α·s)) (`metrics.counterfactual_entropy`; in a layer whose logits are bilinear
in q this is the entropy of a real forward pass with that query, tested).
"""

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from spectra_lens import metrics as M
from spectra_lens.errors import SpectraError
from spectra_lens.interventions import check_hook_shape
from spectra_lens.io import read_npz, write_npz
from spectra_lens.layout import AttentionLayout

__all__ = ["REFERENCE_DEFINITION", "SELECTION_FRACTION", "QueryNormCapture", "ReferenceNorm",
           "estimate_reference_norm", "selection_documents"]

#: The share of the documents that estimate the reference norm (at least one where >= 2 exist).
SELECTION_FRACTION = 0.25
REFERENCE_DEFINITION = (
    "r[l, h, b] = exp(mean of ln ||q_eff|| of head (l, h) over the tokens at positions t >= "
    "min_position with floor(log2(t + 1)) = b of the selection documents); the counterfactual "
    "query of a token keeps its direction and has norm r (alpha = r / ||q||), H_cf = "
    "H(softmax(alpha * s)) over the visible keys"
)
_FORMAT, _VERSION = "spectra_lens.reference_norm", 1


def selection_documents(documents, *, seed: int,
                        fraction: float = SELECTION_FRACTION) -> np.ndarray:
    """The selection documents (sorted ids): max(1, ⌊fraction · G⌋) of the G distinct ids, drawn
    by a permutation seeded with (seed, 1); none where G < 2 (nothing would be left to measure)."""
    ids = np.unique(np.asarray(list(documents), dtype=np.int64))
    if ids.size < 2:
        return ids[:0]
    k = max(1, int(fraction * ids.size))
    return np.sort(np.random.default_rng([seed, 1]).permutation(ids)[:k])


@dataclass(frozen=True, repr=False)
class ReferenceNorm:
    """r[l, h, b] of every captured layer, head and log-position bin (`REFERENCE_DEFINITION`).

    `log_norm[i, h, b]` is the mean ln ‖q‖ of layer `layers[i]` (NaN for a bin without selection
    tokens), `n_tokens` the tokens behind it, `documents` the selection documents.
    """

    layers: tuple[int, ...]
    log_norm: np.ndarray  # [layer, head, bin]
    n_tokens: np.ndarray  # [layer, head, bin]
    documents: tuple[int, ...]
    min_position: int
    meta: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"ReferenceNorm(layers={len(self.layers)}, heads={self.log_norm.shape[1]}, "
                f"bins={self.log_norm.shape[2]}, selection documents={len(self.documents)})")

    @property
    def norm(self) -> np.ndarray:
        """r = exp(log_norm) [layer, head, bin]."""
        return np.exp(self.log_norm)

    def alpha(self, layer: int, q_norm: Tensor, positions: Tensor) -> Tensor:
        """α = r[layer, h, b(t)] / ‖q‖ for `q_norm` [batch, head, pos] at real `positions`
        [batch, pos] (or [pos]); NaN where the bin has no reference or t < min_position."""
        if layer not in self.layers:
            raise SpectraError(f"the reference norm holds layers {self.layers}, not {layer}")
        pos = torch.as_tensor(positions, device=q_norm.device).long()
        pos = pos.expand(q_norm.shape[0], q_norm.shape[2]) if pos.ndim == 1 else pos
        n_bins = self.log_norm.shape[2]
        b = M.log_position_bin(pos.clamp_min(0))
        ok = (pos >= self.min_position) & (b < n_bins)
        r = torch.as_tensor(self.norm[self.layers.index(layer)], dtype=torch.float64,
                            device=q_norm.device)  # [head, bin]
        ref = r[:, b.clamp_max(n_bins - 1)].permute(1, 0, 2)  # [batch, head, pos]
        ref = torch.where(ok[:, None, :], ref, torch.nan)
        return ref / q_norm.double()

    def manifest(self) -> dict:
        """What a run's manifest records of it."""
        return {"definition": REFERENCE_DEFINITION, "bins": "floor(log2(position + 1))",
                "n_bins": int(self.log_norm.shape[2]), "min_position": self.min_position,
                "selection_documents": [int(d) for d in self.documents],
                "n_selection_tokens_per_head": int(self.n_tokens[0, 0].sum()) if self.n_tokens.size else 0,
                **self.meta}

    def save(self, path) -> None:
        write_npz(path, {"format": _FORMAT, "version": _VERSION, "layers": list(self.layers),
                         "documents": [int(d) for d in self.documents],
                         "min_position": self.min_position, "meta": self.meta},
                  log_norm=self.log_norm, n_tokens=self.n_tokens)

    @classmethod
    def load(cls, path) -> "ReferenceNorm":
        header, arrays = read_npz(path, format=_FORMAT, version=_VERSION, names=("log_norm", "n_tokens"))
        return cls(tuple(header["layers"]), arrays["log_norm"], arrays["n_tokens"],
                   tuple(header["documents"]), int(header["min_position"]), header.get("meta") or {})


class QueryNormCapture:
    """Hooks on every layer's effective query that add up ln ‖q‖ per (layer, head, log-position
    bin) at positions >= min_position; `run` ends the pass at the last layer's query hook."""

    def __init__(self, layout: AttentionLayout, *, n_bins: int, min_position: int = 1):
        self.layout = layout
        self.layers = tuple(range(layout.n_layers))
        self.min_position = min_position
        self.sums = np.zeros((layout.n_layers, layout.n_heads, n_bins))
        self.counts = np.zeros((layout.n_layers, layout.n_heads, n_bins))
        self._stop_after: int | None = None

    def hooks(self, layout: AttentionLayout | None = None):
        return [(self.layout.q_hook(l), self._hook(l)) for l in self.layers]

    def _hook(self, l: int):
        from spectra_lens.capture import _PassDone

        name, L = self.layout.q_hook(l), self.layout

        def fn(q, hook):
            check_hook_shape(q, name, (None, None, L.n_heads, L.d_head), "batch pos head d_head")
            logn = torch.log(M.vector_norm(q.detach())).double().cpu()  # [batch, pos, head]
            pos = torch.arange(q.shape[1])
            keep = pos >= self.min_position
            b = M.log_position_bin(pos)[keep]
            if int(b.max()) >= self.sums.shape[2]:
                raise SpectraError(f"{name}: positions up to {q.shape[1] - 1}; the reference has "
                                   f"{self.sums.shape[2]} log-position bins")
            v = logn[:, keep].sum(0)  # [pos, head]
            for bb in b.unique().tolist():
                at = b == bb
                self.sums[l, :, bb] += v[at].sum(0).numpy()
                self.counts[l, :, bb] += int(at.sum()) * q.shape[0]
            if l == self._stop_after:
                raise _PassDone

        return fn


def estimate_reference_norm(model, batches: Iterable[Tensor], documents, *,
                            n_bins: int, min_position: int = 1,
                            layout: AttentionLayout | None = None,
                            attention: str = "eager", progress: bool = False) -> ReferenceNorm:
    """`ReferenceNorm` from the token `batches` [batch, pos] of the selection `documents`: one
    forward pass per batch, ended at the last layer's query hook (no MLP after it). `attention`
    "blocked" computes the earlier layers' attention in query blocks (`blocked_capture`), so no
    [head, T, T] pattern is held: the pass of a long sequence then needs the memory of the blocked
    capture, not of the model's eager attention. `progress`: a bar over the sequences (a list of
    batches gives its total)."""
    import contextlib

    from spectra_lens.capture import _run_capture
    from spectra_lens.layout import attention_layout
    from spectra_lens.present.display import progress_bar

    layout = layout or attention_layout(model)
    if attention not in ("eager", "blocked"):
        raise SpectraError(f"attention must be 'eager' or 'blocked', got {attention!r}")
    cap = QueryNormCapture(layout, n_bins=n_bins, min_position=min_position)
    device = next(model.parameters()).device
    if attention == "blocked":
        from spectra_lens.blocked_capture import blocked_attention

        context = blocked_attention(model, layout=layout)
    else:
        context = contextlib.nullcontext()
    total = sum(len(t) for t in batches) if isinstance(batches, list | tuple) else None
    bar = progress_bar(total=total, desc="reference norm", unit="seq", enabled=progress)
    with context:
        for tokens in batches:
            _run_capture(model, tokens.to(device), cap, layout.n_layers - 1, layout=layout)
            bar.update(len(tokens))
    bar.close()
    with np.errstate(invalid="ignore", divide="ignore"):
        log_norm = np.where(cap.counts > 0, cap.sums / cap.counts, np.nan)
    return ReferenceNorm(cap.layers, log_norm, cap.counts, tuple(int(d) for d in documents),
                         min_position)

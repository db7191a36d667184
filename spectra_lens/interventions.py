"""Interventions on the real forward pass: hooks that edit TransformerLens hook points.

* `QueryScale`, `KeyScale` and `LogitScale` scale one head's effective query, one kv head's key,
  or one head's final logits by α; `QueryRotate` turns a head's query by an angle, keeping its
  norm. Each value is a float, or one value per batch row (batched α: repeat the batch with
  `repeat_for_alphas`, give each copy its own α, one forward pass). Their effects reach later
  layers and the output.
* `Scan`: an intervention over a grid of values, as a function of the value (`QueryScale.scan`,
  `KeyScale.scan`, `LogitScale.scan`, `QueryRotate.scan`, or your own): what
  `sweep.intervention_effects` runs at every value of its grid.
* `check_hook_shape` and `row_factor`: the checks every hook here (and the captures of
  `spectra_lens.capture`) applies to what a hook point hands it.

Attach them with `capture.attached(model, ...)`.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import no_type_check

import torch
from jaxtyping import Float, Int
from torch import Tensor

from spectra_lens.errors import SpectraError
from spectra_lens.layout import AttentionLayout, hook_name
from spectra_lens.validate import check_alpha, check_alphas, check_tokens

__all__ = [
    "HookFn",
    "KeyScale",
    "LogitScale",
    "QueryRotate",
    "QueryScale",
    "Scan",
    "check_hook_shape",
    "repeat_for_alphas",
    "row_factor",
]

HookFn = tuple[str, Callable]


def check_hook_shape(x: Tensor, hook: str, expected: tuple[int | None, ...], axes: str) -> None:
    """SpectraError unless `x` at hook point `hook` has the shape `expected` (None: any size)
    along the named `axes`."""
    ok = x.ndim == len(expected) and all(e is None or e == g for e, g in zip(expected, x.shape))
    if not ok:
        want = tuple("?" if e is None else e for e in expected)
        raise SpectraError(f"{hook}: expected [{axes}] = {want}, got {tuple(x.shape)}")


def row_factor(alpha: float | Tensor, batch: int, hook: str, like: Tensor) -> Tensor | float:
    """`alpha` as a hook applies it: a float as is, or one value per batch row (checked against
    `batch`) on the device and in the dtype of `like`."""
    if isinstance(alpha, float):
        return alpha
    if alpha.shape[0] != batch:
        raise SpectraError(f"{hook}: one alpha per batch row expected ({batch}), got {alpha.shape[0]}")
    return alpha.to(device=like.device, dtype=like.dtype)


# User-facing entry points validate their input themselves (SpectraError); `no_type_check`
# keeps the test suite's jaxtyping/beartype hook from pre-empting that with a TypeCheckError.
@no_type_check
def repeat_for_alphas(
    tokens: Int[Tensor, "batch pos"], alphas: Sequence[float] | Tensor
) -> tuple[Int[Tensor, "alpha_batch pos"], Float[Tensor, " alpha_batch"]]:
    """Batched α: copy i of the batch (rows i·B … (i+1)·B − 1) runs with α = alphas[i]."""
    tokens = check_tokens(tokens)
    check_alphas(alphas)  # the α-grid rule; copy i keeps alphas[i] (the order given, not sorted)
    a = torch.as_tensor(alphas, dtype=torch.float32).flatten()
    return tokens.repeat(a.numel(), 1), a.repeat_interleave(tokens.shape[0]).to(tokens.device)


# --------------------------------------------------------------------------- one intervention over a grid


@dataclass(frozen=True)
class Scan:
    """An intervention as a function of its value: `at(value)` gives the objects with `.hooks`
    to attach at that value (a float, or a 1-D tensor with one value per batch row); `identity`
    is the value at which the model is unchanged (1 for a scaling, 0 for a rotation); `label`
    names it in results (e.g. "QueryScale(layer=1, head=0, positions=None, alpha=grid)").

    `QueryScale.scan(layer, head)` and the like build the usual ones;
    `Scan("both", lambda a: [QueryScale(1, 0, a), KeyScale(1, 0, a)])` scales two at once.
    """

    label: str
    at: Callable[[float | Tensor], Sequence]
    identity: float = 1.0

    def __repr__(self) -> str:
        return f"Scan({self.label})"


# --------------------------------------------------------------------------- scaling hooks


@dataclass(frozen=True)
class QueryScale:
    """q_eff[layer, head] ← α · q_eff: scale the effective query (after QK-norm and rotary).

    Rotary is linear, so scaling before it is the same as after. With `positions`, only those
    query positions are scaled.
    """

    layer: int
    head: int
    alpha: float | Tensor
    positions: tuple[int, ...] | None = None

    @staticmethod
    def scan(layer: int, head: int, *, positions: tuple[int, ...] | None = None) -> "Scan":
        """The query scaling over a grid of α (α = 1 is the unchanged model)."""
        return Scan(f"QueryScale(layer={layer}, head={head}, positions={positions}, alpha=grid)",
                    lambda a: [QueryScale(layer, head, a, positions=positions)])

    def hooks(self, layout: AttentionLayout) -> list[HookFn]:
        layout.check_head(self.layer, self.head)
        alpha = check_alpha(self.alpha)
        name = layout.q_hook(self.layer)
        head, positions = self.head, self.positions

        def scale(x: Float[Tensor, "batch pos head d_head"], hook) -> Tensor:
            check_hook_shape(x, name, (None, None, layout.n_heads, layout.d_head), "batch pos head d_head")
            factor = torch.ones(x.shape[0], x.shape[1], x.shape[2], 1, dtype=x.dtype, device=x.device)
            a = row_factor(alpha, x.shape[0], name, x)
            a = a[:, None] if isinstance(a, Tensor) else a
            if positions is None:
                factor[:, :, head, 0] = a
            else:
                pos = torch.as_tensor(positions, device=x.device)
                if (pos < 0).any() or (pos >= x.shape[1]).any():
                    raise SpectraError(f"positions must be in [0, {x.shape[1]}), got {list(positions)}")
                factor[:, pos, head, 0] = a if isinstance(a, float) else a.expand(-1, len(pos))
            return x * factor

        return [(name, scale)]


@dataclass(frozen=True)
class KeyScale:
    """k_eff[layer, kv_head] ← α · k_eff: scales the logits of every query head in its group."""

    layer: int
    kv_head: int
    alpha: float | Tensor

    @staticmethod
    def scan(layer: int, kv_head: int) -> "Scan":
        """The key scaling over a grid of α (α = 1 is the unchanged model)."""
        return Scan(f"KeyScale(layer={layer}, kv_head={kv_head}, alpha=grid)", lambda a: [KeyScale(layer, kv_head, a)])

    def affected_heads(self, layout: AttentionLayout) -> tuple[int, ...]:
        """The query heads that read this kv head (h // (n_heads // n_kv_heads) == kv_head)."""
        return layout.heads_of_kv(self.kv_head)

    def hooks(self, layout: AttentionLayout) -> list[HookFn]:
        layout.check_head(self.layer, 0)
        layout.heads_of_kv(self.kv_head)
        alpha = check_alpha(self.alpha)
        name = layout.k_hook(self.layer)
        kv = self.kv_head

        def scale(x: Float[Tensor, "batch pos kv_head d_head"], hook) -> Tensor:
            check_hook_shape(x, name, (None, None, layout.n_kv_heads, layout.d_head), "batch pos kv_head d_head")
            factor = torch.ones(x.shape[0], 1, x.shape[2], 1, dtype=x.dtype, device=x.device)
            a = row_factor(alpha, x.shape[0], name, x)
            factor[:, 0, kv, 0] = a
            return x * factor

        return [(name, scale)]


@dataclass(frozen=True)
class LogitScale:
    """A temperature on one head's final logits: p ← softmax(α·s) = p^α / Σ p^α.

    Applied to `hook_pattern`, so it acts after any ALiBi bias or soft-capping; needs a bridge
    whose pattern hook feeds the forward pass (`layout.pattern_editable`).
    """

    layer: int
    head: int
    alpha: float | Tensor

    @staticmethod
    def scan(layer: int, head: int) -> "Scan":
        """The logit temperature over a grid of α (α = 1 is the unchanged model)."""
        return Scan(f"LogitScale(layer={layer}, head={head}, alpha=grid)", lambda a: [LogitScale(layer, head, a)])

    def hooks(self, layout: AttentionLayout) -> list[HookFn]:
        layout.check_head(self.layer, self.head)
        if not layout.pattern_editable:
            raise SpectraError("this bridge's hook_pattern is observe-only; LogitScale cannot act")
        alpha = check_alpha(self.alpha)
        name = hook_name(self.layer, "pattern")
        head = self.head

        def scale(p: Float[Tensor, "batch head query_pos key_pos"], hook) -> Tensor:
            check_hook_shape(p, name, (None, layout.n_heads, None, None), "batch head query_pos key_pos")
            a = row_factor(alpha, p.shape[0], name, p)
            a = a[:, None, None] if isinstance(a, Tensor) else a
            out = p.clone()
            logp = torch.log(p[:, head].float())
            out[:, head] = torch.softmax(a * logp, dim=-1).to(p.dtype)
            return out

        return [(name, scale)]


@dataclass(frozen=True)
class QueryRotate:
    """Rotate the effective query of (layer, head) by `angle` radians, keeping its norm.

    Each query vector q (every batch row and position, or only `positions`) turns by `angle`
    in the plane of q and a random unit direction u orthogonal to q (drawn with `seed`, one per
    position and row; the same for every angle of a grid):
    q' = cos(angle)·q + sin(angle)·‖q‖·u, so ‖q'‖ = ‖q‖ and angle(q, q') = angle. Computed in
    float64 and cast back. `angle` is a float in [0, π] or one value per batch row (batched, as
    `alpha` of QueryScale). `QueryRotate.scan(...)` runs it over a grid of angles (identity 0).
    """

    layer: int
    head: int
    angle: float | Tensor
    seed: int = 0
    positions: tuple[int, ...] | None = None

    @staticmethod
    def scan(layer: int, head: int, *, seed: int = 0, positions: tuple[int, ...] | None = None) -> "Scan":
        """The rotation over a grid of angles (angle 0 is the unchanged model)."""
        return Scan(f"QueryRotate(layer={layer}, head={head}, seed={seed}, positions={positions}, angle=grid)",
                    lambda a: [QueryRotate(layer, head, a, seed=seed, positions=positions)], identity=0.0)

    def hooks(self, layout: AttentionLayout):
        layout.check_head(self.layer, self.head)
        angle = self.angle
        if isinstance(angle, Tensor):
            if angle.ndim != 1 or not torch.isfinite(angle).all() or (angle < 0).any() or (angle > math.pi).any():
                raise SpectraError(f"angle tensor must be 1-D with values in [0, pi], got {angle.tolist()}")
        elif isinstance(angle, bool) or not isinstance(angle, (int, float)) or not 0 <= angle <= math.pi:
            raise SpectraError(f"angle must be a number in [0, pi] (radians), got {angle!r}")
        else:
            angle = float(angle)
        name = layout.q_hook(self.layer)
        head, positions, seed = self.head, self.positions, self.seed

        def rotate(x: Float[Tensor, "batch pos head d_head"], hook) -> Tensor:
            check_hook_shape(x, name, (None, None, layout.n_heads, layout.d_head), "batch pos head d_head")
            pos = torch.arange(x.shape[1]) if positions is None else torch.as_tensor(positions)
            if (pos < 0).any() or (pos >= x.shape[1]).any():
                raise SpectraError(f"positions must be in [0, {x.shape[1]}), got {list(pos.tolist())}")
            q = x[:, pos.to(x.device), head].double()  # [batch, n_pos, d]
            gen = torch.Generator().manual_seed(seed)
            # one random direction per (position, row) of the *unrepeated* batch would differ
            # between batch layouts; draw per position and reuse across rows instead.
            r = torch.randn(x.shape[1], layout.d_head, generator=gen, dtype=torch.float64)[pos]
            r = r.to(q.device).expand_as(q)
            norm = q.norm(dim=-1, keepdim=True)
            unit = q / norm.clamp_min(1e-300)
            u = r - (r * unit).sum(-1, keepdim=True) * unit
            u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-300)
            a = row_factor(angle, x.shape[0], name, q)
            a = torch.as_tensor(a, dtype=torch.float64, device=q.device)
            a = a[:, None, None] if a.ndim == 1 else a
            rotated = torch.cos(a) * q + torch.sin(a) * norm * u
            out = x.clone()
            out[:, pos.to(x.device), head] = rotated.to(x.dtype)
            return out

        return [(name, rotate)]

"""Input checks shared by every entry point: each raises `SpectraError` saying what was expected
and what was given. One definition per rule, so the same input is accepted or refused the same
way everywhere (capture, sweeps, corpora, shards, configs)."""

import math
import re
from typing import Any, NamedTuple

import torch
from jaxtyping import Int
from torch import Tensor

from spectra_lens.errors import SpectraError

__all__ = [
    "HeadRef", "check_alpha", "check_alphas", "check_context", "check_int", "check_min_position",
    "check_tokens", "check_vocab",
]


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """`value` must be an int (not a bool) >= `minimum`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SpectraError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


def check_tokens(tokens: Any) -> Int[Tensor, "batch pos"]:
    """tokens must be a non-empty integer tensor [batch, pos] of non-negative ids; returned as
    int64 (a new tensor only when the dtype differs)."""
    if not isinstance(tokens, Tensor):
        raise SpectraError(f"tokens must be an integer torch.Tensor [batch, pos], got {type(tokens).__name__}")
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise SpectraError(f"tokens must have shape [batch, pos], got {tuple(tokens.shape)} (both must be >= 1)")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise SpectraError(f"tokens must be an integer torch.Tensor [batch, pos], got Tensor of dtype {tokens.dtype}")
    if int(tokens.min()) < 0:
        raise SpectraError(f"token ids must be non-negative; got minimum {int(tokens.min())}")
    return tokens.long()


# α multiplies float32 activations: below float32's smallest normal number it loses precision
# and below ~1.4e-45 it becomes 0 (a uniform pattern, not a small scale); above its max, inf.
ALPHA_RANGE: tuple[float, float] = (float(torch.finfo(torch.float32).tiny),
                                    float(torch.finfo(torch.float32).max))


def _alpha_out_of_range(values: list[float], what: str) -> None:
    lo, hi = ALPHA_RANGE
    bad = [a for a in values if not lo <= a <= hi]
    if bad:
        raise SpectraError(
            f"{what} must lie in [{lo:.3g}, {hi:.3g}], the normal range of float32 in which α "
            f"is applied (smaller values round to 0, a uniform pattern), got {bad}"
        )


def check_alpha(alpha: Any, *, what: str = "alpha") -> float | Tensor:
    """alpha must be a finite number > 0 inside `ALPHA_RANGE`, or a 1-D tensor of them (one per
    batch row)."""
    if isinstance(alpha, Tensor):
        if alpha.ndim != 1 or alpha.numel() == 0:
            raise SpectraError(f"{what} tensor must be 1-D and non-empty, got shape {tuple(alpha.shape)}")
        if not (torch.isfinite(alpha).all() and (alpha > 0).all()):
            raise SpectraError(f"{what} must be finite and > 0, got {alpha.tolist()}")
        _alpha_out_of_range(alpha.double().tolist(), what)
        return alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise SpectraError(f"{what} must be a number or a 1-D tensor, got {type(alpha).__name__}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise SpectraError(f"{what} must be finite and > 0, got {alpha!r}")
    _alpha_out_of_range([float(alpha)], what)
    return float(alpha)


def check_alphas(alphas: object, *, at_least: int = 1) -> tuple[float, ...]:
    """The α grid (any iterable of numbers or a 1-D tensor), sorted ascending: finite,
    > 0, distinct, at least `at_least` values (a slope on ln α needs 2, a fit with a residual 3)."""
    if isinstance(alphas, (int, float)):
        raise SpectraError(f"alphas must be a sequence of numbers, got the single number {alphas!r}")
    try:
        items = list(alphas.tolist() if isinstance(alphas, Tensor) else alphas)
    except TypeError as e:
        raise SpectraError(f"alphas must be a sequence of numbers, got {alphas!r}") from e
    bad = [a for a in items if isinstance(a, bool) or not isinstance(a, (int, float))]
    if bad:
        raise SpectraError(f"every alpha must be a number, got {bad} in {items}")
    values = [float(a) for a in items]
    if len(values) < at_least:
        raise SpectraError(f"alphas must hold at least {at_least} value{'s' * (at_least > 1)}, "
                           f"got {values or 'an empty grid'}")
    bad = [a for a in values if not (math.isfinite(a) and a > 0)]
    if bad:
        raise SpectraError(
            f"every alpha must be finite and > 0 (we scale by α and fit on ln α), got {bad}")
    _alpha_out_of_range(values, "every alpha")
    if len(set(values)) != len(values):
        dup = sorted({a for a in values if values.count(a) > 1})
        raise SpectraError(f"alphas must be distinct, got duplicates {dup}")
    return tuple(sorted(values))


def check_min_position(min_position: Any, seq_len: int) -> int:
    """Query positions >= min_position are averaged: it must be an int in [0, seq_len - 1) so that
    at least two positions (and so a variance across positions) remain."""
    check_int("min_position", min_position, minimum=0)
    if min_position >= seq_len - 1:
        raise SpectraError(
            f"min_position ({min_position}) must be < seq_len - 1 ({seq_len - 1}): at least two "
            f"query positions must be left to average"
        )
    return min_position


def check_vocab(tokens: Tensor, vocab: int, what: str = "tokens") -> None:
    """Every token id must lie in [0, vocab), the model's vocabulary (`cfg.d_vocab`)."""
    if tokens.numel() and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
        raise SpectraError(
            f"{what} hold token ids in [{int(tokens.min())}, {int(tokens.max())}]; expected ids in "
            f"[0, {vocab}) for this model's vocabulary: tokenizer mismatch?"
        )


def check_context(model, n_positions: int) -> None:
    """Sequences must fit the model's context (`cfg.n_ctx`): positions beyond it fail with a bare
    IndexError on learned position embeddings and silently extrapolate on rotary ones."""
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if isinstance(n_ctx, int) and n_positions > n_ctx:
        raise SpectraError(
            f"sequences of {n_positions} tokens exceed the model's context of {n_ctx} tokens; "
            f"expected at most {n_ctx} (pass a smaller --seq-len)"
        )


_HEAD = re.compile(r"^\s*L(\d+)\s*_?\s*H(\d+)\s*$", re.IGNORECASE)


class HeadRef(NamedTuple):
    """One attention head: (layer, query head), printed "L{layer}H{head}" everywhere (flags,
    tables, file names); `file_tag` is the original study's file-name spelling "L{layer}_H{head}"."""

    layer: int
    head: int

    @classmethod
    def parse(cls, text: Any) -> "HeadRef":
        """'L15H8' (also 'L15_H8', 'l15 h8') -> HeadRef(15, 8); a (layer, head) pair passes through."""
        if isinstance(text, tuple) and len(text) == 2:
            return cls(check_int("layer", text[0], minimum=0), check_int("head", text[1], minimum=0))
        m = _HEAD.match(str(text))
        if not m:
            raise SpectraError(f"expected a head like 'L15H8' (layer 15, head 8), got {text!r}")
        return cls(int(m[1]), int(m[2]))

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}"

    @property
    def file_tag(self) -> str:
        return f"L{self.layer}_H{self.head}"

"""Text generation under an intervention: continuations with and without scalings, side by side.

    spectra-lens generate --scale L15H8=2.0 [--scale ...] [--kind q|k|logit] "prompt"

(the command itself is `spectra_lens.experiments.generate`)

`generate(model, prompt, interventions)` decodes two continuations of one prompt in lockstep:
the plain model (row "base") and the model with the scalings attached (row "scaled"). Both rows
share one batch; a scaling's α becomes a per-row factor (1 for the base row), so the base row is
the unhooked model.

Decoding keeps a key/value cache (`KVDecoder`): the prompt runs once, then each step runs the
bridge on the one new token with Hugging Face's cache of the earlier keys and values. Every hook
fires on every new token, at the same points as in a full forward pass: the query of the new
position, its key and value (appended to the cache after the key hooks, so a KeyScale'd key is
cached scaled, as an uncached pass would recompute it), and its row of scores and pattern over
all earlier keys. Greedy decoding is token-for-token the uncached path (tests: every tiny model
family, with QueryScale / KeyScale / LogitScale attached). TransformerLens 4.3's bridge
attention looks for the cache under its older keyword names (`past_key_values`, `layer_past`)
while transformers 5 passes it as `cache`, so without help its attention ignores the cache and
a decode step sees only its own token; `KVDecoder` hands the cache to each attention module
under the name it reads, and checks after every step that the cache holds every position.
With `use_cache=False` (or a QueryScale restricted to `positions`, which index the whole
sequence) every step is a forward pass of the whole sequence.

* greedy: each row takes argmax of its next-token logits;
* sampled: Gumbel-max with one noise draw per step shared by both rows (common random numbers,
  seeded), so the two rows pick the same token wherever their distributions agree enough, and a
  divergence is caused by the scaling, not by the random draw. With no effect (α = 1) the two
  rows are identical token for token.

Afterwards one teacher-forced pass scores each continuation under both models: the per-token
log-probability difference `log p_scaled(t) − log p_base(t)` with the same prefix, and the first
generated position where the two continuations differ (`diverge_at`).
"""

import dataclasses
import inspect
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from spectra_lens.capture import attached
from spectra_lens.errors import SpectraError
from spectra_lens.interventions import KeyScale, LogitScale, QueryScale
from spectra_lens.layout import attention_layout
from spectra_lens.validate import HeadRef, check_alpha, check_int, check_vocab

__all__ = [
    "Continuation",
    "KVDecoder",
    "GenerationDiff",
    "compare_generations",
    "generate",
    "parse_scale",
    "scalings",
]

log = logging.getLogger(__name__)

MODES = ("greedy", "sample")
KINDS = ("q", "k", "logit")

def parse_scale(text: str) -> tuple[int, int, float]:
    """'L15H8=2.0' -> (15, 8, 2.0)."""
    head, sep, value = str(text).partition("=")
    if not sep:
        raise SpectraError(f"expected a scaling like 'L15H8=2.0' (head=α), got {text!r}")
    layer, h = HeadRef.parse(head)
    try:
        alpha = float(value)
    except ValueError:
        raise SpectraError(f"α of {text!r} must be a number, got {value!r}") from None
    return layer, h, check_alpha(alpha, what=f"α of {text.strip()}")


def scalings(specs: Sequence[tuple[int, int, float]], layout, *, kind: str = "q") -> list:
    """Scaling objects for (layer, head, α) triples: `kind` "q" scales the head's effective
    query (`QueryScale`), "k" the key of the kv head it reads (`KeyScale`: every query head of
    that group is affected), "logit" a temperature on its final logits (`LogitScale`)."""
    if kind not in KINDS:
        raise SpectraError(f"kind must be one of {KINDS}, got {kind!r}")
    out = []
    for layer, head, alpha in specs:
        layout.check_head(layer, head)
        if kind == "q":
            out.append(QueryScale(layer, head, alpha))
        elif kind == "k":
            out.append(KeyScale(layer, layout.kv_head(head), alpha))
        else:
            out.append(LogitScale(layer, head, alpha))
    return out


@dataclass(frozen=True, repr=False)
class Continuation:
    """Generated tokens of one row and their log-probabilities under both models.

    `logprob_base[i]` / `logprob_scaled[i]`: log p(tokens[i] | prompt + tokens[:i]) under the
    plain and the scaled model (nats), teacher-forced on this continuation.
    """

    tokens: tuple[int, ...]
    pieces: tuple[str, ...]  # each token decoded on its own ("" without a tokenizer: ids shown)
    logprob_base: np.ndarray
    logprob_scaled: np.ndarray
    stopped_at_eos: bool

    @property
    def delta_logprob(self) -> np.ndarray:
        """log p_scaled − log p_base of each token of this continuation."""
        return self.logprob_scaled - self.logprob_base

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def __repr__(self) -> str:
        return f"Continuation({len(self.tokens)} tokens, {self.text[:60]!r})"


@dataclass(frozen=True, repr=False)
class GenerationDiff:
    """One prompt continued by the plain model (`base`) and under `interventions` (`scaled`)."""

    prompt_tokens: tuple[int, ...]
    prompt: str
    interventions: tuple[str, ...]
    mode: str  # "greedy" | "sample"
    seed: int | None
    temperature: float
    top_k: int | None
    base: Continuation
    scaled: Continuation

    @property
    def diverge_at(self) -> int | None:
        """Index (in generated tokens) of the first token where the continuations differ; None
        when they are identical."""
        a, b = self.base.tokens, self.scaled.tokens
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return i
        return None if len(a) == len(b) else min(len(a), len(b))

    def frame(self) -> pd.DataFrame:
        """One row per generated position: both tokens, `same_so_far` (the continuations have not
        diverged up to and including this step), and each token's log-probability under the plain
        and the scaled model with their difference (`{base,scaled}_delta_logprob`)."""
        n = max(len(self.base.tokens), len(self.scaled.tokens))
        cols: dict[str, list] = {"mode": [self.mode] * n, "step": list(range(n))}
        for name, c in (("base", self.base), ("scaled", self.scaled)):
            pad = n - len(c.tokens)
            cols[f"{name}_token"] = list(c.tokens) + [None] * pad
            cols[f"{name}_text"] = list(c.pieces) + [None] * pad
            for what, v in (("logprob_base", c.logprob_base), ("logprob_scaled", c.logprob_scaled),
                            ("delta_logprob", c.delta_logprob)):
                cols[f"{name}_{what}"] = list(map(float, v)) + [math.nan] * pad
        d = self.diverge_at
        frame = pd.DataFrame(cols)
        frame.insert(2, "same_so_far", [d is None or i < d for i in range(n)])
        return frame

    def __repr__(self) -> str:
        d = self.diverge_at
        return (f"GenerationDiff({self.mode}, {', '.join(self.interventions) or 'no scaling'}, "
                f"{len(self.base.tokens)}/{len(self.scaled.tokens)} tokens, "
                f"diverge_at={'never' if d is None else d})")

    def _repr_html_(self) -> str:
        from html import escape

        def row(c: Continuation) -> str:
            d = self.diverge_at
            cells = []
            for i, (piece, dl) in enumerate(zip(c.pieces, c.delta_logprob)):
                style = "background:#fde2e1" if d is not None and i >= d else ""
                cells.append(f'<span title="Δ log p = {dl:+.3f}" style="{style}">{escape(piece)}</span>')
            return "".join(cells)

        return (f"<b>{escape(repr(self))}</b><table><tr><th>prompt</th><td>{escape(self.prompt)}</td></tr>"
                f"<tr><th>plain</th><td>{row(self.base)}</td></tr>"
                f"<tr><th>scaled</th><td>{row(self.scaled)}</td></tr></table>")


def _prompt_tokens(model, prompt) -> Tensor:
    if isinstance(prompt, str):
        if getattr(model, "tokenizer", None) is None:
            raise SpectraError("this model has no tokenizer: pass the prompt as token ids")
        return model.to_tokens(prompt)[0].cpu()
    t = torch.as_tensor(prompt)
    if t.ndim == 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 1 or t.numel() == 0 or t.dtype.is_floating_point:
        raise SpectraError(f"prompt must be text or a non-empty 1-D list of token ids, got {prompt!r:.80}")
    return t.long().cpu()


def _pieces(model, tokens: Sequence[int]) -> tuple[str, ...]:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return tuple(f"[{t}]" for t in tokens)
    return tuple(tok.decode([t]) for t in tokens)


def _eos_id(model) -> int | None:
    tok = getattr(model, "tokenizer", None)
    if tok is not None and tok.eos_token_id is not None:
        return int(tok.eos_token_id)
    eos = getattr(model.cfg, "eos_token_id", None)
    return int(eos) if isinstance(eos, int) else None


class KVDecoder:
    """Incremental forward passes of a bridge with Hugging Face's key/value cache, hooks kept.

    `logits = dec.step(tokens)`: the first call takes the prompt `[batch, pos]`, each later
    call the `[batch, 1]` tokens chosen last; it returns the next-token logits `[batch, vocab]`
    (float32). Hooks attached around the calls fire on each call's new positions (see module).
    With `use_cache=False`, or where the cache does not fill as it should (checked after every
    call: it must hold every position so far), each call runs the whole sequence instead.
    Use as a context manager: the cache hand-over hooks are removed on exit.
    """

    def __init__(self, model, *, use_cache: bool = True):
        self.model = model
        self.seqs: Tensor | None = None
        self.cached = use_cache and self._supported(model)
        self._cache = None
        self._handles: list = []

    @staticmethod
    def _supported(model) -> bool:
        hf = getattr(model, "original_model", None)
        blocks = getattr(model, "blocks", None)
        return (hf is not None and blocks is not None and len(blocks) > 0
                and all(hasattr(b, "attn") for b in blocks)
                and not getattr(getattr(hf, "config", None), "is_encoder_decoder", False))

    def __enter__(self) -> "KVDecoder":
        if self.cached:
            from transformers import DynamicCache

            hf = self.model.original_model
            self._cache = DynamicCache(config=hf.config)
            params = inspect.signature(hf.forward).parameters
            self._kwarg = "cache" if "cache" in params else "past_key_values"

            def hand_over(module, args, kwargs):
                # The bridge's attention reads the cache as `past_key_values` (or `layer_past`).
                if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
                    return args, {**kwargs, "past_key_values": kwargs["cache"]}
                return None

            self._handles = [b.attn.register_forward_pre_hook(hand_over, with_kwargs=True)
                             for b in self.model.blocks]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._cache = None

    def step(self, tokens: Tensor) -> Tensor:
        first = self.seqs is None
        self.seqs = tokens if first else torch.cat([self.seqs, tokens], dim=1)
        if not self.cached:
            return self.model(self.seqs, return_type="logits")[:, -1].float()
        with warnings.catch_warnings():
            # Bridges whose attention hands the call on to Hugging Face's module (OPT) get the
            # cache under both names; transformers says it uses `cache`, which is the same object.
            warnings.filterwarnings("ignore", message=".*Both `past_key_values` and `cache` are set")
            logits = self.model(tokens, return_type="logits", use_cache=True,
                                **{self._kwarg: self._cache})[:, -1].float()
        held = int(self._cache.get_seq_length())
        if held != self.seqs.shape[1]:
            if not first:  # a cache that filled on the prompt and then stopped: never silent
                raise SpectraError(
                    f"the key/value cache holds {held} positions after {self.seqs.shape[1]}; "
                    f"generate with use_cache=False"
                )
            # This bridge's attention does not fill the cache: the prompt's logits are those of
            # a full pass (nothing was cached yet), and every later step runs the full sequence.
            log.warning("this bridge's attention does not fill the key/value cache; generating "
                        "without it (every token a full forward pass)")
            self.__exit__()
            self.cached = False
        return logits


def _per_row(items, n_rows: int) -> list:
    """Each scaling with its α as a per-row factor: 1 in even rows (plain), α in odd rows."""
    odd = torch.arange(n_rows) % 2 == 1
    return [dataclasses.replace(it, alpha=torch.where(odd, float(it.alpha), 1.0)) for it in items]


def _check_items(interventions) -> list:
    items = list(interventions)
    for item in items:
        if not (dataclasses.is_dataclass(item) and any(f.name == "alpha" for f in dataclasses.fields(item))):
            raise SpectraError(
                f"interventions must be scaling dataclasses with an `alpha` field (QueryScale, "
                f"KeyScale, LogitScale), got {item!r}"
            )
        if isinstance(item.alpha, Tensor):
            raise SpectraError(f"give each scaling one α (a number) for generation, got {item!r}")
        check_alpha(item.alpha)
    return items


def compare_generations(
    model,
    prompt,
    interventions: Sequence = (),
    *,
    modes: Sequence[str] = MODES,
    max_new_tokens: int = 20,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    stop_at_eos: bool = True,
    use_cache: bool = True,
    progress: bool = False,
) -> dict[str, GenerationDiff]:
    """{mode: GenerationDiff} for "greedy" and/or "sample", decoded together in one batch.

    `interventions` are scaling objects (QueryScale, KeyScale, LogitScale) with one α each; with
    none, both rows are the plain model. Sampling uses softmax(logits / temperature), restricted
    to the `top_k` most likely tokens when given, with Gumbel noise from `seed` shared by the
    plain and the scaled row of each step. `use_cache`: decode with the key/value cache (see
    module; False: a full forward pass per token, the reference it equals). `progress`: a bar
    over the generated tokens.
    """
    items = _check_items(interventions)
    modes = tuple(modes)
    if not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        raise SpectraError(f"modes must be distinct values of {MODES}, got {modes}")
    check_int("max_new_tokens", max_new_tokens)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise SpectraError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise SpectraError(f"top_k must be a positive int or None, got {top_k!r}")
    layout = attention_layout(model)
    for item in items:
        item.hooks(layout)  # validates the head against this model now, not mid-generation
    prompt_ids = _prompt_tokens(model, prompt)
    check_vocab(prompt_ids, int(model.cfg.d_vocab), "the prompt's tokens")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if isinstance(n_ctx, int) and prompt_ids.numel() + max_new_tokens > n_ctx:
        raise SpectraError(
            f"prompt ({prompt_ids.numel()} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context of {n_ctx} tokens"
        )
    device = next(model.parameters()).device
    n_rows = 2 * len(modes)  # per mode: the plain row, then the scaled row
    hooks = _per_row(items, n_rows)
    seqs = prompt_ids.to(device).repeat(n_rows, 1)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    eos = _eos_id(model) if stop_at_eos else None
    done = torch.zeros(n_rows, dtype=torch.bool)
    n_prompt = prompt_ids.numel()
    # QueryScale positions index the whole sequence: a cached step holds only the new one.
    use_cache = use_cache and not any(getattr(it, "positions", None) is not None for it in items)
    from spectra_lens.present.display import progress_bar

    bar = progress_bar(total=max_new_tokens, desc="generate", unit="token", enabled=progress)
    with torch.no_grad(), attached(model, *hooks, layout=layout), \
            KVDecoder(model, use_cache=use_cache) as decoder, bar:
        new = seqs
        for _ in range(max_new_tokens):
            logits = decoder.step(new).cpu()
            nxt = torch.empty(n_rows, dtype=torch.long)
            for m_i, mode in enumerate(modes):
                r = slice(2 * m_i, 2 * m_i + 2)
                if mode == "greedy":
                    nxt[r] = logits[r].argmax(-1)
                else:
                    z = logits[r] / temperature
                    if top_k is not None and top_k < z.shape[-1]:
                        kth = z.topk(top_k, dim=-1).values[:, -1:]
                        z = z.masked_fill(z < kth, -math.inf)
                    u = torch.rand(z.shape[-1], generator=gen).clamp_(1e-20, 1.0)
                    nxt[r] = (z - torch.log(-torch.log(u))).argmax(-1)
            if eos is not None:
                done |= nxt == eos
            new = nxt[:, None].to(device)
            seqs = torch.cat([seqs, new], dim=1)
            bar.update(1)
            if eos is not None and bool(done.all()):
                break
    cont = seqs[:, n_prompt:].cpu()
    lengths = []
    for r in range(n_rows):
        t = cont[r].tolist()
        if eos is not None and eos in t:
            t = t[: t.index(eos) + 1]
        lengths.append(len(t))
    # Teacher-forced scores: each continuation under the plain (α = 1) and the scaled model.
    scored = seqs.repeat_interleave(2, dim=0)  # row 2r: plain model on row r, 2r + 1: scaled
    with torch.no_grad(), attached(model, *_per_row(items, 2 * n_rows), layout=layout):
        logp = torch.log_softmax(model(scored, return_type="logits").float(), dim=-1).cpu()
    targets = seqs.cpu()[:, n_prompt:]
    out: dict[str, GenerationDiff] = {}
    names = tuple(_describe(it) for it in items)
    for m_i, mode in enumerate(modes):
        conts = []
        for r in (2 * m_i, 2 * m_i + 1):
            n = lengths[r]
            tok = targets[r, :n]
            lp = logp[2 * r : 2 * r + 2, n_prompt - 1 : n_prompt - 1 + n]
            lp = lp.gather(-1, tok[None, :, None].expand(2, -1, 1)).squeeze(-1).double().numpy()
            ids = tuple(int(t) for t in tok)
            conts.append(Continuation(ids, _pieces(model, ids), lp[0], lp[1],
                                      stopped_at_eos=eos is not None and bool(ids) and ids[-1] == eos))
        out[mode] = GenerationDiff(
            prompt_tokens=tuple(int(t) for t in prompt_ids), prompt="".join(_pieces(model, prompt_ids.tolist()))
            if not isinstance(prompt, str) else prompt,
            interventions=names, mode=mode, seed=int(seed) if mode == "sample" else None,
            temperature=float(temperature) if mode == "sample" else 0.0,
            top_k=top_k if mode == "sample" else None, base=conts[0], scaled=conts[1],
        )
    return out


def generate(model, prompt, interventions: Sequence = (), *, mode: str = "greedy", **kwargs) -> GenerationDiff:
    """`compare_generations` for one mode ("greedy" or "sample")."""
    return compare_generations(model, prompt, interventions, modes=(mode,), **kwargs)[mode]


def _describe(item) -> str:
    fields = [f"{f.name}={getattr(item, f.name)}" for f in dataclasses.fields(item)
              if getattr(item, f.name) is not None]
    return f"{type(item).__name__}({', '.join(fields)})"

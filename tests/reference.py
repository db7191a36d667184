"""Reference implementations for the tests: they share no code with spectra_lens.

Everything here is written from the definitions, in float64 NumPy with plain Python loops
over rows, or from plain Hugging Face forward passes (no TransformerLens, no hooks of the
library). The only thing taken from the library is the tiny model itself
(`spectra_lens.testing.tiny_hf_model`), so that both sides run the same weights.

A head's query is scaled by editing the weights of its query projection: the projection is
linear and rotary embeddings are rotations applied after it, so scaling the projection's rows
(and bias) of one head scales that head's effective query by α, and so its logits by α, in
every family in `WEIGHT_EDIT_FAMILIES` (none of them has a norm after the projection).
"""

import contextlib
import math

import numpy as np
import torch

# Families whose query/key projections can be scaled per head by editing weights.
WEIGHT_EDIT_FAMILIES = ("gpt2", "llama_gqa", "neox", "opt")


# --------------------------------------------------------------------------- one attention row


def softmax(scores, alpha: float = 1.0) -> np.ndarray:
    """p_j = exp(α s_j − max) / Σ_k exp(α s_k − max) over a 1-D array of visible scores."""
    z = alpha * np.asarray(scores, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def row_entropy(p) -> float:
    """H = −Σ p_j ln p_j with 0 ln 0 = 0."""
    return -sum(float(x) * math.log(float(x)) for x in p if x > 0)


def row_top_mass_count(p, mass: float = 0.9, tol: float = 1e-6) -> int:
    """The fewest keys whose largest attention weights sum to at least `mass` (− tol)."""
    total = 0.0
    for k, x in enumerate(sorted((float(v) for v in p), reverse=True), start=1):
        total += x
        if total >= mass - tol:
            return k
    return len(p)


def row_metrics(p) -> dict[str, float]:
    """Every per-row attention metric of one row over its visible keys (p sums to 1)."""
    p = [float(x) for x in p]
    h = row_entropy(p)
    n = len(p)
    return {
        "entropy": h,
        "entropy_norm": h / math.log(n) if n > 1 else math.nan,
        "max_attn": max(p),
        "k_eff_exp": math.exp(h),
        "k_eff_pr": 1.0 / sum(x * x for x in p),
        "k_eff_top90": float(row_top_mass_count(p)),
        "sink_mass": p[0],
    }


def row_variance(p, s) -> float:
    """Var_p(s) = Σ p_j (s_j − Σ_k p_k s_k)²."""
    mean = sum(float(a) * float(b) for a, b in zip(p, s))
    return sum(float(a) * (float(b) - mean) ** 2 for a, b in zip(p, s))


def row_local_gain(scores, alpha: float = 1.0) -> float:
    """dH/d ln α of p = softmax(α s): −α² Var_p(s)."""
    p = softmax(scores, alpha)
    return -(alpha**2) * row_variance(p, scores)


SWEEP_METRICS = ("entropy", "max_attn", "k_eff_exp", "k_eff_pr", "k_eff_top90")


# --------------------------------------------------------------------------- plain HF passes


def _head_dim(config) -> int:
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    return hidden // heads


def _n_heads(config) -> int:
    return getattr(config, "num_attention_heads", None) or config.n_head


def _qkv_rows(family: str, config, part: int, head: int) -> list[int]:
    """Rows of a fused QKV output of (part 0 = q, 1 = k) for one head."""
    d, n = _head_dim(config), _n_heads(config)
    if family == "gpt2":  # [q | k | v], each [head, d]
        start = part * n * d + head * d
    else:  # neox: [head, (q, k, v), d]
        start = head * 3 * d + part * d
    return list(range(start, start + d))


@torch.no_grad()
def scale_query(hf, family: str, layer: int, head: int, alpha: float) -> None:
    """In place: multiply the query projection of (layer, head) by α (weights and bias)."""
    _scale_projection(hf, family, layer, head, alpha, part=0)


@torch.no_grad()
def scale_key(hf, family: str, layer: int, kv_head: int, alpha: float) -> None:
    """In place: multiply the key projection of (layer, kv_head) by α (weights and bias)."""
    _scale_projection(hf, family, layer, kv_head, alpha, part=1)


def _scale_projection(hf, family, layer, head, alpha, *, part):
    config, d = hf.config, _head_dim(hf.config)
    if family == "gpt2":
        conv = hf.transformer.h[layer].attn.c_attn  # Conv1D: weight [in, out]
        cols = _qkv_rows(family, config, part, head)
        conv.weight[:, cols] *= alpha
        conv.bias[cols] *= alpha
    elif family == "neox":
        lin = hf.gpt_neox.layers[layer].attention.query_key_value
        rows = _qkv_rows(family, config, part, head)
        lin.weight[rows] *= alpha
        lin.bias[rows] *= alpha
    elif family in ("llama_gqa", "opt"):
        attn = (hf.model.layers[layer].self_attn if family == "llama_gqa"
                else hf.model.decoder.layers[layer].self_attn)
        lin = attn.q_proj if part == 0 else attn.k_proj
        lin.weight[head * d:(head + 1) * d] *= alpha
        if lin.bias is not None:
            lin.bias[head * d:(head + 1) * d] *= alpha
    else:
        raise ValueError(f"no weight edit for family {family!r}")


@contextlib.contextmanager
def query_scaled_at(hf, family: str, layer: int, head: int, alpha, positions):
    """Within the block: the query projection output of (layer, head) multiplied by α at the
    query `positions` only (α a float, or one value per batch row), with a plain torch forward
    hook on the HF module. Rotary acts per position after the projection, so this scales the
    effective query of those positions."""
    config, d = hf.config, _head_dim(hf.config)
    if family == "gpt2":
        module = hf.transformer.h[layer].attn.c_attn
        cols = _qkv_rows(family, config, 0, head)
    elif family == "llama_gqa":
        module = hf.model.layers[layer].self_attn.q_proj
        cols = list(range(head * d, (head + 1) * d))
    else:
        raise ValueError(f"no query hook for family {family!r}")

    def scale(mod, args, out):
        a = torch.as_tensor(alpha, dtype=out.dtype).reshape(-1, 1)  # [batch or 1, 1]
        out = out.clone()
        for t in positions:
            out[:, t, cols] = out[:, t, cols] * a
        return out

    handle = module.register_forward_hook(scale)
    try:
        yield hf
    finally:
        handle.remove()


@torch.no_grad()
def forward(hf, tokens: torch.Tensor):
    """(logits float64 [b, pos, vocab], attentions: list of float64 [b, head, q, k]) of hf."""
    out = hf(tokens, output_attentions=True)
    return out.logits.double(), [a.double() for a in out.attentions]


@torch.no_grad()
def projections(hf, family: str, tokens: torch.Tensor):
    """Per layer, the query and key projection outputs [b, pos, head, d] ([b, pos, kv_head, d]),
    read with plain torch forward hooks on the HF modules (before rotary, which keeps norms)."""
    config, d = hf.config, _head_dim(hf.config)
    n = _n_heads(config)
    store: dict = {}
    handles = []
    if family == "gpt2":
        for l, block in enumerate(hf.transformer.h):
            def grab(mod, args, out, l=l):
                b, pos, _ = out.shape
                store[l] = (out[..., : n * d].reshape(b, pos, n, d).double(),
                            out[..., n * d: 2 * n * d].reshape(b, pos, n, d).double())
            handles.append(block.attn.c_attn.register_forward_hook(grab))
    elif family == "llama_gqa":
        n_kv = config.num_key_value_heads
        for l, layer in enumerate(hf.model.layers):
            def grab_q(mod, args, out, l=l):
                store.setdefault(l, [None, None])[0] = out.reshape(*out.shape[:2], n, d).double()

            def grab_k(mod, args, out, l=l):
                store.setdefault(l, [None, None])[1] = out.reshape(*out.shape[:2], n_kv, d).double()
            handles.append(layer.self_attn.q_proj.register_forward_hook(grab_q))
            handles.append(layer.self_attn.k_proj.register_forward_hook(grab_k))
    else:
        raise ValueError(f"no projection reader for family {family!r}")
    try:
        hf(tokens)
    finally:
        for h in handles:
            h.remove()
    return {l: tuple(v) for l, v in store.items()}


def kv_head_of(head: int, n_heads: int, n_kv_heads: int) -> int:
    """The kv head that query head `head` reads: heads are grouped in consecutive blocks."""
    group = n_heads // n_kv_heads
    return head // group


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> np.ndarray:
    """Per sequence: mean over positions t < T−1 of −ln p(token_{t+1} | ≤ t)."""
    out = []
    for b in range(tokens.shape[0]):
        total = 0.0
        for t in range(tokens.shape[1] - 1):
            row = logits[b, t]
            log_z = float(torch.logsumexp(row, 0))
            total += log_z - float(row[int(tokens[b, t + 1])])
        out.append(total / (tokens.shape[1] - 1))
    return np.array(out)


def kl_per_sequence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> np.ndarray:
    """Per sequence: mean over every position of KL(p ‖ q) = Σ_v p_v (ln p_v − ln q_v)."""
    lp = torch.log_softmax(logits_p.double(), -1)
    lq = torch.log_softmax(logits_q.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean(-1).numpy()


def head_means(pattern: torch.Tensor, min_position: int = 1) -> dict[str, np.ndarray]:
    """Per sequence, the mean over query positions ≥ min_position of each sweep metric of one
    head's causal pattern [b, q, k] (the visible keys of row t are 0..t)."""
    b, n_q, _ = pattern.shape
    out = {m: np.zeros(b) for m in SWEEP_METRICS}
    for i in range(b):
        rows = [row_metrics(pattern[i, t, : t + 1].tolist()) for t in range(min_position, n_q)]
        for m in SWEEP_METRICS:
            out[m][i] = np.mean([r[m] for r in rows])
    return out


def t_interval(values, ci: float = 0.95):
    """(mean, low, high) of mean ± t_{n−1,(1+ci)/2} · sd/√n over the first axis."""
    from scipy.stats import t

    x = np.asarray(values, dtype=np.float64)
    n = x.shape[0]
    mean = x.mean(0)
    half = t.ppf((1 + ci) / 2, n - 1) * x.std(0, ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


def document_bootstrap(values, documents=None, ci: float = 0.95, n_boot: int = 2000, seed: int = 0):
    """(mean, low, high): percentile bootstrap resampling documents with replacement, each bringing
    all its sequences; the statistic is the mean over the resampled sequences. One replicate at a
    time (the library draws all replicates at once from the same generator)."""
    x = np.asarray(values, dtype=np.float64)
    n = x.shape[0]
    docs = np.arange(n) if documents is None else np.asarray(documents)
    ids = list(dict.fromkeys(sorted(docs.tolist())))
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        counts = rng.multinomial(len(ids), np.full(len(ids), 1.0 / len(ids)))
        rows = [i for d, c in zip(ids, counts) for i in np.flatnonzero(docs == d) for _ in range(c)]
        reps.append(x[rows].mean(0))
    tail = (1 - ci) / 2 * 100
    low, high = np.percentile(np.stack(reps), [tail, 100 - tail], axis=0)
    return x.mean(0), np.clip(low, x.min(0), x.max(0)), np.clip(high, x.min(0), x.max(0))

"""Tiny random-init models of several architecture families, built offline from configs, and a
tiny model with a planted circuit (a previous-token head and an induction head, weights set by
hand).

They exist so that tests, benchmarks and examples can exercise every code path of spectra_lens
(grouped keys, QK-norm, soft-capping, ALiBi, ...) in seconds and without a network, and check
that measured head types and interventions find what was planted.
"""


from pathlib import Path

import numpy as np
import torch
import transformers

from spectra_lens.errors import SpectraError

__all__ = [
    "effective_q",
    "FAMILIES",
    "PLANTED_INDUCTION_HEAD",
    "PLANTED_PREV_TOKEN_HEAD",
    "planted_circuit_hf_model",
    "planted_circuit_model",
    "TEST_WORDS",
    "tiny_hf_model",
    "tiny_model",
    "word_corpus",
    "word_tokenizer",
]

TEST_WORDS = tuple(f"w{i}" for i in range(60))  # the vocabulary of `word_tokenizer`

_COMMON = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)

# family -> (config class name, architecture name, config kwargs). Each entry is the smallest
# config that still has the family's distinguishing attention feature.
_SPECS: dict[str, tuple[str, str, dict]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0)),
    "neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
             dict(_COMMON, intermediate_size=128, max_position_embeddings=128, rotary_pct=0.5)),
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM",
                  dict(_COMMON, num_key_value_heads=2, intermediate_size=128,
                       max_position_embeddings=128)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(_COMMON, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                   max_position_embeddings=128)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(_COMMON, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                    max_position_embeddings=128, sliding_window=64)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(_COMMON, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                    max_position_embeddings=128, sliding_window=64,
                    attn_logit_softcapping=5.0, final_logit_softcapping=30.0)),
    "bloom": ("BloomConfig", "BloomForCausalLM",
              dict(vocab_size=97, hidden_size=64, n_layer=2, n_head=4)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 ffn_dim=128, max_position_embeddings=128, word_embed_proj_dim=64)),
}

FAMILIES: tuple[str, ...] = tuple(_SPECS)


def tiny_hf_model(family: str, *, seed: int = 0) -> transformers.PreTrainedModel:
    """A random-init Hugging Face causal LM of `family`, in float32 with eager attention."""
    if family not in _SPECS:
        raise SpectraError(f"unknown tiny model family {family!r}; expected one of {FAMILIES}")
    config_cls, _, kwargs = _SPECS[family]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Random init gives near-uniform attention; larger q/k weights give the peaked, varied
    # patterns that make entropy tests meaningful.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and any(t in name for t in ("q_proj", "k_proj", "c_attn", "query_key_value")):
                p.mul_(4.0)
    return model.eval()


def tiny_model(family: str, *, seed: int = 0):
    """A TransformerBridge around `tiny_hf_model(family, seed=seed)`, built offline."""
    from spectra_lens.models import bridge_from_hf

    return bridge_from_hf(tiny_hf_model(family, seed=seed))


# --------------------------------------------------------------------------- a planted circuit

PLANTED_PREV_TOKEN_HEAD = (0, 0)  # (layer, head)
PLANTED_INDUCTION_HEAD = (1, 1)


def planted_circuit_hf_model(*, prev_token_scale: float = 1.0, induction_scale: float = 1.0,
                             seed: int = 0) -> transformers.PreTrainedModel:
    """A 2-layer GPT-2 whose weights are set by hand: head L0H0 attends to the previous token,
    head L1H1 is an induction head; every other head has zero weights (uniform attention, no
    output) and the MLPs are zero.

    The residual stream (d_model 256) has fixed subspaces: a token code (random zero-mean unit
    vectors, dims 0-31), a position code (16 sinusoid pairs and their negation, dims 64-127: zero
    mean and constant norm, so LayerNorm only rescales) and a previous-token slot (dims 128-159).
    L0H0's query is the position code rotated back by one step, its key the position code, so
    q_i·k_j peaks at j = i − 1; it copies the previous token's code into the slot. L1H1's query is
    the current token's code and its key the slot, so it attends to the token after an earlier
    occurrence of the current token, and writes that token's code back into the token subspace,
    which the tied unembedding reads: on a repeated sequence the model predicts the repeat.
    `prev_token_scale` / `induction_scale` multiply the two heads' query weights (sharpness).
    """
    import math

    V, D, H, n_pos, F = 97, 256, 4, 128, 16
    dh = D // H
    tok, pos, prev = slice(0, 32), slice(64, 96), slice(128, 160)
    config = transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=H, n_positions=n_pos,
                                     n_inner=4, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0)
        e = torch.randn(V, 32, generator=g)
        e = e - e.mean(1, keepdim=True)
        model.transformer.wte.weight[:, tok] = e / e.norm(dim=1, keepdim=True)
        w = 1.5 ** -torch.arange(F, dtype=torch.float32)  # angular frequencies 1 … 0.002
        angle = torch.arange(n_pos)[:, None] * w
        code = torch.stack([angle.cos(), angle.sin()], -1).reshape(n_pos, 2 * F) / math.sqrt(F)
        model.transformer.wpe.weight[:, pos] = code
        model.transformer.wpe.weight[:, 96:128] = -code
        # GPT-2's Conv1D: [q | k | v] = x @ c_attn.weight, out = z @ c_proj.weight.
        rot = torch.zeros(2 * F, 2 * F)  # (cos a, sin a) -> (cos(a - w), sin(a - w))
        for f in range(F):
            c, s = math.cos(w[f]), math.sin(w[f])
            rot[2 * f : 2 * f + 2, 2 * f : 2 * f + 2] = torch.tensor([[c, s], [-s, c]])
        a0, o0 = model.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].attn.c_proj.weight
        a0[pos, 0 : 2 * F] = rot.T * 80.0 * prev_token_scale
        a0[pos, D : D + 2 * F] = torch.eye(2 * F)
        a0[tok, 2 * D : 2 * D + 32] = torch.eye(32)
        o0[0:32, prev] = torch.eye(32)
        a1, o1 = model.transformer.h[1].attn.c_attn.weight, model.transformer.h[1].attn.c_proj.weight
        a1[tok, dh : dh + 32] = torch.eye(32) * 6.0 * induction_scale
        a1[prev, D + dh : D + dh + 32] = torch.eye(32)
        a1[tok, 2 * D + dh : 2 * D + dh + 32] = torch.eye(32)
        o1[dh : dh + 32, tok] = torch.eye(32) * 6.0
    return model


def planted_circuit_model(**kwargs):
    """A TransformerBridge around `planted_circuit_hf_model(**kwargs)`, built offline."""
    from spectra_lens.models import bridge_from_hf

    return bridge_from_hf(planted_circuit_hf_model(**kwargs))


def word_tokenizer(*, pad: bool = False) -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `TEST_WORDS`, offline: <unk>=0, <bos>=1, <eos>=2,
    then <pad>=3 when `pad`, then the words in order (ids below every tiny model's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    special = ["<unk>", "<bos>", "<eos>"] + (["<pad>"] if pad else [])
    vocab = {w: i for i, w in enumerate(special + list(TEST_WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        **({"pad_token": "<pad>"} if pad else {}))


def word_corpus(directory, n_documents: int, n_words: int, *, name: str = "doc{i}.txt",
                seed: int = 0) -> str:
    """`n_documents` text files of `n_words` random `TEST_WORDS` each, written into `directory`
    (file names from `name`); returns their glob, as `--corpus` takes it."""
    rng = np.random.default_rng(seed)
    directory = Path(directory)
    for i in range(n_documents):
        (directory / name.format(i=i)).write_text(" ".join(rng.choice(TEST_WORDS, n_words)))
    return str(directory / "*.txt")


def effective_q(model, layout, tokens, layer: int, *items) -> torch.Tensor:
    """Layer `layer`'s effective query [batch, pos, head, d_head] (the tensor its `q_hook`
    sees, after whatever of `items` acts before it), from a pass that stops after the layer."""
    from spectra_lens.capture import attached

    got = {}

    def grab(x, hook):
        got["q"] = x.detach().clone()

    with torch.no_grad(), attached(model, *items, (layout.q_hook(layer), grab), layout=layout):
        model(tokens, return_type=None, stop_at_layer=layer + 1)
    return got["q"]

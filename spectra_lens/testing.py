"""Tiny random-init models of several architecture families, built offline from configs.

They exist so that tests, benchmarks and examples can exercise every code path of spectra_lens
(grouped keys, QK-norm, soft-capping, ALiBi, ...) in seconds and without a network.
"""


import torch
import transformers

from spectra_lens.errors import SpectraError

__all__ = ["FAMILIES", "tiny_hf_model", "tiny_model"]

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

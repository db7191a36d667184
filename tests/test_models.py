"""spectra_lens.models: loading (offline) and the attention layout derived from the bridge."""

import copy
import dataclasses
import math
import socket
import time

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedTokenizerFast

from spectra_lens.errors import SpectraError
from spectra_lens.layout import attention_layout, hook_name, probe_tolerance
from spectra_lens.models import bridge_from_hf, load_model, resolve_device, resolve_dtype
from spectra_lens.testing import FAMILIES, tiny_hf_model

ROTARY_EFFECTIVE = ("llama_gqa", "qwen3", "gemma3", "gemma2")  # families exposing hook_rot_q
GROUPED = ("llama_gqa", "qwen3", "gemma3", "gemma2")  # n_kv_heads = 2 < n_heads = 4
NOT_BILINEAR = {"gemma2": "soft-capped", "bloom": "ALiBi"}


def _word_tokenizer(vocab_size: int = 97) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer built offline: '<unk>' = 0, 'wN' = N."""
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """(directory, reference HF model): a tiny llama_gqa model and its tokenizer saved to disk."""
    path = tmp_path_factory.mktemp("tiny_llama")
    hf = tiny_hf_model("llama_gqa")
    hf.save_pretrained(path)
    _word_tokenizer().save_pretrained(path)
    return path, hf


# --------------------------------------------------------------------------- loading


def test_load_model_wraps_an_in_memory_hf_model(no_network, tokens):
    hf = tiny_hf_model("gpt2")
    reference = copy.deepcopy(hf)  # the bridge replaces submodules in place
    bridge = load_model(hf)
    assert isinstance(bridge, TransformerBridge)
    assert load_model(bridge) is bridge
    with torch.no_grad():
        torch.testing.assert_close(
            bridge(tokens, return_type="logits"), reference(tokens).logits, atol=1e-5, rtol=1e-5
        )


def test_load_model_from_a_local_directory_without_network(no_network, tiny_dir, tokens):
    path, reference = tiny_dir
    bridge = load_model(str(path))
    assert isinstance(bridge, TransformerBridge)
    with torch.no_grad():
        torch.testing.assert_close(
            bridge(tokens, return_type="logits"), reference(tokens).logits, atol=1e-5, rtol=1e-5
        )
    assert bridge.tokenizer("w5 w17 w96")["input_ids"] == [5, 17, 96]
    layout = attention_layout(bridge)
    assert (layout.n_heads, layout.n_kv_heads, layout.q_kind) == (4, 2, "rot_q")


def test_load_model_dtype(no_network, tiny_dir):
    path, _ = tiny_dir
    bridge = load_model(path, dtype="bfloat16", device="cpu")
    assert next(bridge.parameters()).dtype == torch.bfloat16


def test_unknown_hub_id_fails_fast_when_offline(no_network):
    name = "spectra-lens-tests/no-such-model"
    start = time.perf_counter()
    with pytest.raises(SpectraError) as info:
        load_model(name)
    assert time.perf_counter() - start < 5.0
    message = str(info.value)
    assert name in message and "HF_HUB_OFFLINE" in message


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dtype="float8"),
         r"dtype must be one of \['bfloat16', 'float16', 'float32'\], got 'float8'"),
        (dict(dtype=torch.int64), r"dtype must be one of .*, got torch.int64"),
        (dict(device="gpu:0"), r"device must be like 'cpu' or 'cuda:0', got 'gpu:0'"),
    ],
)
def test_bad_dtype_or_device_raise(no_network, tiny_dir, kwargs, match):
    path, _ = tiny_dir
    with pytest.raises(SpectraError, match=match):
        load_model(path, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_raises():
    with pytest.raises(SpectraError, match="'cuda' was asked for but CUDA is not available"):
        resolve_device("cuda")


def test_resolve_defaults():
    assert resolve_dtype(None) == torch.float32
    assert resolve_dtype("float16") == torch.float16
    assert resolve_dtype(torch.bfloat16) == torch.bfloat16
    assert resolve_device("cpu") == torch.device("cpu")


def test_bad_model_specs(no_network, tmp_path):
    with pytest.raises(SpectraError, match="no such directory"):
        load_model("./no/such/dir")
    with pytest.raises(SpectraError, match="with config.json"):
        load_model(tmp_path)  # an existing directory that is not a model
    with pytest.raises(SpectraError, match="expected a Hugging Face PreTrainedModel, got Linear"):
        bridge_from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(SpectraError, match="unknown tiny model family 'nope'"):
        tiny_hf_model("nope")


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_of_every_family(tiny, family):
    model, layout = tiny(family)
    assert attention_layout(model) is layout  # derived once, cached
    assert (layout.n_layers, layout.n_heads, layout.d_head) == (2, 4, 16)
    assert layout.n_kv_heads == (2 if family in GROUPED else 4)
    # neox is rotary too, but TL 4.3 exposes no hook_rot_q there; rotary is linear, so scaling
    # hook_q (before it) is the same scaling, and the probe confirms it is bilinear.
    prefix = "rot_" if family in ROTARY_EFFECTIVE else ""
    assert (layout.q_kind, layout.k_kind) == (prefix + "q", prefix + "k")
    for l in range(layout.n_layers):
        assert layout.q_hook(l) == hook_name(l, layout.q_kind)
        assert hook_name(l, layout.q_kind) == f"blocks.{l}.attn.hook_{layout.q_kind}"
    if family in ("gpt2", "llama_gqa", "qwen3"):  # plain 1/sqrt(d_head)
        assert layout.score_scale == (pytest.approx(1 / math.sqrt(16)),) * 2
    if family == "gemma3":  # query_pre_attn_scalar = 256
        assert layout.score_scale == (pytest.approx(1 / 16),) * 2
    # TransformerLens 4.3 facts about OPT: hook_attn_scores is not the logits, hook_pattern is
    # observe-only. The layout must say so rather than let a capture trust them.
    assert layout.scores_faithful == (family != "opt")
    assert layout.pattern_editable == (family != "opt")


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_flags_non_bilinear_families_with_a_reason(tiny, family):
    _, layout = tiny(family)
    pairs = ((layout.q_bilinear, layout.q_reason), (layout.k_bilinear, layout.k_reason))
    for bilinear, reasons in pairs:
        assert len(bilinear) == len(reasons) == layout.n_layers
        if family in NOT_BILINEAR:
            assert not any(bilinear)
            assert all(isinstance(r, str) and NOT_BILINEAR[family] in r for r in reasons)
        else:
            assert all(bilinear)
            assert all(r is None for r in reasons)
    assert [layout.fast_path_ok(l) for l in range(layout.n_layers)] == list(layout.q_bilinear)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layout_of_a_sharp_model(dtype):
    """A half-precision pattern is rounded: with sharp attention it differs from the softmax of
    its own scores, and from the bilinearity probe's prediction, by more than 1e-4. The probes
    compare to the dtype's precision (`probe_tolerance`), so such a model is faithful and bilinear
    as in float32 (with a 1e-4 tolerance every layer was called neither)."""
    hf = tiny_hf_model("llama_gqa")
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight *= 8
    layout = attention_layout(bridge_from_hf(hf.to(dtype)))
    assert layout.scores_faithful
    assert all(layout.q_bilinear) and all(layout.k_bilinear)
    assert layout.score_scale == (pytest.approx(0.25, rel=1e-2),) * 2
    assert probe_tolerance(torch.float32) == probe_tolerance(torch.float64) == 1e-4
    assert probe_tolerance(dtype) == torch.finfo(dtype).eps


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_layout_flags_equal_float32(tiny, family):
    """The half-precision tolerance keeps what the probes detect: OPT's unfaithful scores, the
    non-bilinear families, QK-norm."""
    _, ref = tiny(family)
    got = attention_layout(bridge_from_hf(tiny_hf_model(family).to(torch.bfloat16)))
    for field in ("q_kind", "k_kind", "scores_faithful", "q_bilinear", "k_bilinear", "q_reason",
                  "k_reason", "pattern_editable"):
        assert getattr(got, field) == getattr(ref, field), field


def test_layout_costs_two_short_passes():
    """The layout is derived from two forward passes of a few tokens (the second batched over
    the layers and ending at the last layer's pattern), not one pass per layer or probe."""
    model = bridge_from_hf(tiny_hf_model("llama_gqa"))
    shapes = []
    handle = model.blocks[0].register_forward_pre_hook(lambda m, args, kwargs: shapes.append(
        tuple((args[0] if args else kwargs["hidden_states"]).shape[:2])), with_kwargs=True)
    try:
        attention_layout(model)
    finally:
        handle.remove()
    assert shapes == [(2, 6), (3, 6)]  # 2 copies; 1 + n_layers rows


def test_probe_finds_qk_norm_alibi_and_a_single_kv_head():
    """What the batched probe itself detects, before any config fact overrides it: a scaling
    before QK-norm is undone (Qwen3's hook_q), ALiBi's bias breaks bilinearity (Bloom), and with
    one kv head the key is probed in rows of its own."""
    from spectra_lens.layout import _observe, _probe_scaling, _probe_tokens

    for family, (q_kind, k_kind), want in (("qwen3", ("q", "k"), "is undone before the logits"),
                                           ("bloom", ("q", "k"), "not bilinear in")):
        model = bridge_from_hf(tiny_hf_model(family))
        tokens = _probe_tokens(model, model.cfg, "cpu")
        names = [hook_name(l, k) for l in range(2) for k in ("q", "k", "pattern")]
        seen, _ = _observe(model, names, tokens)
        kv_idx = torch.arange(4) // (4 // (model.cfg.n_key_value_heads or 4))
        for ok, reasons in _probe_scaling(model, tokens, seen, q_kind, k_kind, 2, 4, kv_idx):
            assert ok == [False, False] and all(want in r for r in reasons), (family, reasons)
    hf = tiny_hf_model("llama_gqa")
    config = copy.deepcopy(hf.config)
    config.num_key_value_heads = 1
    import transformers

    torch.manual_seed(0)
    mqa = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    layout = attention_layout(bridge_from_hf(mqa))
    assert layout.n_kv_heads == 1 and all(layout.q_bilinear) and all(layout.k_bilinear)


def test_kv_head_map_is_repeat_interleave(tiny):
    _, layout = tiny("llama_gqa")
    assert (layout.n_heads, layout.n_kv_heads, layout.group_size) == (4, 2, 2)
    assert [layout.kv_head(h) for h in range(4)] == [0, 0, 1, 1]
    assert layout.kv_index().tolist() == [0, 0, 1, 1]
    assert layout.heads_of_kv(0) == (0, 1)
    assert layout.heads_of_kv(1) == (2, 3)
    with pytest.raises(SpectraError, match=r"kv head must be in \[0, 2\), got 2"):
        layout.heads_of_kv(2)
    with pytest.raises(SpectraError, match=r"head must be an int in \[0, 4\), got 4"):
        layout.kv_head(4)
    # SmolLM2's shape: 9 query heads over 3 kv heads; the h % n_kv map would be wrong.
    smol = dataclasses.replace(layout, n_heads=9, n_kv_heads=3)
    assert smol.kv_index().tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert smol.kv_index().tolist() != [h % 3 for h in range(9)]
    assert smol.heads_of_kv(2) == (6, 7, 8)


def test_kv_head_map_without_grouping(tiny):
    _, layout = tiny("gpt2")
    assert layout.group_size == 1
    assert layout.kv_index().tolist() == [0, 1, 2, 3]
    assert layout.heads_of_kv(3) == (3,)

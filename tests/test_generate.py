"""Generation under scaling: the plain row is the plain model, α = 1 changes nothing, and a large
α on a head that matters (a planted induction head) changes the continuation."""

import copy

import pytest
import torch

from spectra_lens.capture import attached, count_hooks
from spectra_lens.errors import SpectraError
from spectra_lens.generate import (
    KVDecoder,
    compare_generations,
    generate,
    parse_scale,
    scalings,
)
from spectra_lens.interventions import KeyScale, LogitScale, QueryScale
from spectra_lens.layout import hook_name
from spectra_lens.models import bridge_from_hf
from spectra_lens.testing import (
    FAMILIES,
    PLANTED_INDUCTION_HEAD,
    planted_circuit_model,
    tiny_hf_model,
)
from spectra_lens.validate import HeadRef


@pytest.fixture(scope="module")
def weak_induction():
    """The planted circuit with its induction head's query scaled down (diffuse at α = 1)."""
    return planted_circuit_model(induction_scale=0.05)


def _repeat_prompt(seed=3, n=12, shown=3):
    r = torch.randint(1, 97, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.tensor([5]), r, r[:shown]]), r


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
def test_no_scalings_is_the_plain_models_greedy_output(family):
    hf = tiny_hf_model(family)
    model = bridge_from_hf(copy.deepcopy(hf))  # the bridge edits its HF model in place
    prompt = torch.randint(1, 97, (7,), generator=torch.Generator().manual_seed(0))
    got = generate(model, prompt, [], max_new_tokens=12, stop_at_eos=False)
    with torch.no_grad():
        ref = hf.generate(prompt[None], max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    assert list(got.base.tokens) == ref
    assert got.scaled.tokens == got.base.tokens and got.diverge_at is None
    assert (got.base.delta_logprob == 0).all()
    assert count_hooks(model) == 0


@pytest.mark.parametrize("kind", ["q", "k", "logit"])
def test_alpha_one_equals_the_unhooked_model(tiny, kind):
    model, layout = tiny("llama_gqa")
    prompt = torch.randint(1, 97, (6,), generator=torch.Generator().manual_seed(1))
    plain = compare_generations(model, prompt, [], max_new_tokens=8, seed=7, stop_at_eos=False)
    items = scalings([(0, 1, 1.0), (1, 3, 1.0)], layout, kind=kind)
    got = compare_generations(model, prompt, items, max_new_tokens=8, seed=7, stop_at_eos=False)
    for mode in ("greedy", "sample"):
        assert got[mode].scaled.tokens == plain[mode].base.tokens == got[mode].base.tokens
        assert got[mode].diverge_at is None
        assert abs(got[mode].scaled.delta_logprob).max() < 1e-5
    assert count_hooks(model) == 0


def test_large_alpha_on_a_planted_induction_head_changes_the_continuation(weak_induction):
    prompt, r = _repeat_prompt()
    expected = tuple(int(t) for t in r[3:9])  # the repeat continues
    layer, head = PLANTED_INDUCTION_HEAD
    plain = generate(weak_induction, prompt, [QueryScale(layer, head, 1.0)], max_new_tokens=6,
                     stop_at_eos=False)
    sharp = generate(weak_induction, prompt, [QueryScale(layer, head, 30.0)], max_new_tokens=6,
                     stop_at_eos=False)
    assert plain.scaled.tokens == plain.base.tokens != expected
    assert sharp.scaled.tokens == expected and sharp.base.tokens == plain.base.tokens
    d = sharp.diverge_at
    assert d is not None and sharp.base.tokens[:d] == expected[:d]
    # the scaled model prefers its own token where they diverge, the plain model its own
    assert sharp.scaled.delta_logprob[d] > 0 > sharp.base.delta_logprob[d]
    frame = sharp.frame()
    assert list(frame["same_so_far"]) == [i < d for i in range(6)]
    # a control head (zero weights: uniform attention, no output) changes nothing
    other = generate(weak_induction, prompt, [QueryScale(layer, 0, 30.0)], max_new_tokens=6,
                     stop_at_eos=False)
    assert other.diverge_at is None


def test_sampling_is_seeded_and_shares_its_noise(weak_induction):
    prompt, _ = _repeat_prompt()
    a = compare_generations(weak_induction, prompt, [], modes=("sample",), max_new_tokens=8, seed=1,
                            stop_at_eos=False)["sample"]
    b = compare_generations(weak_induction, prompt, [], modes=("sample",), max_new_tokens=8, seed=1,
                            stop_at_eos=False)["sample"]
    assert a.base.tokens == b.base.tokens == a.scaled.tokens
    top1 = compare_generations(weak_induction, prompt, [], modes=("sample",), max_new_tokens=8,
                               seed=2, top_k=1, stop_at_eos=False)["sample"]
    greedy = generate(weak_induction, prompt, [], max_new_tokens=8, stop_at_eos=False)
    assert top1.base.tokens == greedy.base.tokens  # top_k = 1 is greedy


def test_eos_ends_a_continuation(tiny):
    model, _ = tiny("gpt2")  # eos_token_id = 0 in the tiny GPT-2 config
    prompt = torch.tensor([3, 4, 5])
    full = generate(model, prompt, [], max_new_tokens=30, stop_at_eos=False)
    got = generate(model, prompt, [], max_new_tokens=30)
    if 0 in full.base.tokens:
        cut = full.base.tokens.index(0) + 1
        assert got.base.tokens == full.base.tokens[:cut] and got.base.stopped_at_eos
    else:
        assert got.base.tokens == full.base.tokens and not got.base.stopped_at_eos


def test_parsing_and_errors(tiny):
    model, layout = tiny("llama_gqa")
    assert HeadRef.parse("L15H8") == (15, 8) and HeadRef.parse("l0h3") == (0, 3)
    assert parse_scale("L1H2=0.5") == (1, 2, 0.5)
    for bad in ("15:8=2", "L1H2", "L1H2=x", "L1H2=-1", "L1H2=0"):
        with pytest.raises(SpectraError):
            parse_scale(bad)
    k = scalings([(1, 3, 2.0)], layout, kind="k")[0]
    assert isinstance(k, KeyScale) and k.kv_head == layout.kv_head(3)
    assert isinstance(scalings([(1, 3, 2.0)], layout, kind="logit")[0], LogitScale)
    with pytest.raises(SpectraError, match="kind"):
        scalings([(1, 3, 2.0)], layout, kind="v")
    with pytest.raises(SpectraError, match="head must be"):
        generate(model, [1, 2], [QueryScale(0, 9, 2.0)])
    with pytest.raises(SpectraError, match="context"):
        generate(model, [1, 2], [], max_new_tokens=500)
    with pytest.raises(SpectraError, match="tokenizer"):
        generate(model, "text", [])
    with pytest.raises(SpectraError, match="one α"):
        generate(model, [1, 2], [QueryScale(0, 1, torch.tensor([1.0, 2.0]))])
    assert count_hooks(model) == 0


# --------------------------------------------------------------------------- key/value cache


def _no_cache_hooks(model) -> bool:
    return all(not b.attn._forward_pre_hooks for b in model.blocks)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_the_uncached_path_under_every_scaling(tiny, family):
    """Greedy and sampled continuations with the key/value cache are token for token those of a
    full forward pass per token, with a query, a key and a logit scaling active; the teacher-forced
    log-probabilities agree too."""
    model, layout = tiny(family)
    prompt = torch.randint(1, 97, (7,), generator=torch.Generator().manual_seed(2))
    kinds = ["q", "k"] + (["logit"] if layout.pattern_editable else [])
    for kind in kinds:
        items = scalings([(1, 1, 3.0), (0, 2, 0.5)], layout, kind=kind)
        cached = compare_generations(model, prompt, items, max_new_tokens=10, seed=4, stop_at_eos=False)
        full = compare_generations(model, prompt, items, max_new_tokens=10, seed=4, stop_at_eos=False,
                                   use_cache=False)
        for mode in ("greedy", "sample"):
            a, b = cached[mode], full[mode]
            assert (a.base.tokens, a.scaled.tokens) == (b.base.tokens, b.scaled.tokens), (kind, mode)
            assert abs(a.scaled.delta_logprob - b.scaled.delta_logprob).max() < 1e-5
    assert count_hooks(model) == 0 and _no_cache_hooks(model)


def test_every_hook_fires_on_every_new_token(tiny):
    """Each cached step runs the hooks on the new position: its query, and its pattern row over
    every earlier key (the prompt's positions included)."""
    model, layout = tiny("llama_gqa")
    seen = {"pattern": [], "q": []}

    def rec(kind):
        def fn(x, hook):
            seen[kind].append(tuple(x.shape))

        return fn

    prompt = torch.randint(1, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), attached(model, (hook_name(1, "pattern"), rec("pattern")),
                                   (layout.q_hook(1), rec("q")), layout=layout), KVDecoder(model) as dec:
        logits = dec.step(prompt)
        for _ in range(3):
            logits = dec.step(logits.argmax(-1)[:, None])
    assert dec.cached
    assert seen["pattern"] == [(2, 4, 5, 5), (2, 4, 1, 6), (2, 4, 1, 7), (2, 4, 1, 8)]
    assert seen["q"] == [(2, 5, 4, 16)] + [(2, 1, 4, 16)] * 3
    with torch.no_grad():
        full = model(dec.seqs, return_type="logits")[:, -1]  # the same 8 positions, one pass
    assert torch.allclose(logits, full, atol=1e-5)
    assert _no_cache_hooks(model)


class _NoHandOver(KVDecoder):
    """A decoder whose cache never reaches the bridge's attention (as TransformerLens 4.3 alone)."""

    def __enter__(self):
        super().__enter__()
        for h in self._handles:
            h.remove()
        return self


def test_a_cache_that_does_not_fill_falls_back_to_full_passes(tiny, caplog):
    model, _ = tiny("llama_gqa")
    prompt = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(5))
    got = []
    with torch.no_grad(), _NoHandOver(model) as dec:
        logits = dec.step(prompt)
        for _ in range(4):
            nxt = logits.argmax(-1)[:, None]
            got.append(int(nxt))
            logits = dec.step(nxt)
    assert not dec.cached and "does not fill the key/value cache" in caplog.text
    ref = generate(model, prompt[0], [], max_new_tokens=4, stop_at_eos=False, use_cache=False)
    assert tuple(got) == ref.base.tokens


def test_query_positions_decode_without_the_cache(tiny):
    """QueryScale `positions` index the whole sequence; generation then runs full passes and still
    scales exactly the positions asked for."""
    model, _ = tiny("llama_gqa")
    prompt = torch.randint(1, 97, (6,), generator=torch.Generator().manual_seed(6))
    item = QueryScale(1, 1, 4.0, positions=(2, 3))
    got = generate(model, prompt, [item], max_new_tokens=5, stop_at_eos=False)
    ref = generate(model, prompt, [item], max_new_tokens=5, stop_at_eos=False, use_cache=False)
    assert got.scaled.tokens == ref.scaled.tokens and got.base.tokens == ref.base.tokens


def test_cached_decoding_past_the_sliding_window(tiny):
    """Gemma's sliding-window layers (window 64 in the tiny config) keep equal continuations when
    the sequence grows past the window."""
    model, _ = tiny("gemma3")
    prompt = torch.randint(1, 97, (60,), generator=torch.Generator().manual_seed(0))
    got = generate(model, prompt, [QueryScale(0, 1, 3.0)], max_new_tokens=12, stop_at_eos=False)
    ref = generate(model, prompt, [QueryScale(0, 1, 3.0)], max_new_tokens=12, stop_at_eos=False,
                   use_cache=False)
    assert (got.base.tokens, got.scaled.tokens) == (ref.base.tokens, ref.scaled.tokens)

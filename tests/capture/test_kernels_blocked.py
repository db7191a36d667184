"""The blocked capture kernel (`kernels.blocked.row_metrics`) against the single-metric definitions and
against `hook_pattern`, at lengths where its query blocks, key extents and top-mass chunks all
come into play, in float32 and half precision, and with both of its backends."""

import pytest
import torch
import transformers
from torch.testing import assert_close

from spectra_lens import metrics as M
from spectra_lens.capture import capture_metrics
from spectra_lens.kernels import blocked as KB
from spectra_lens.layout import hook_name
from spectra_lens.models import bridge_from_hf


def _reference(p: torch.Tensor, s: torch.Tensor | None, top_mass=0.9) -> dict[str, torch.Tensor]:
    """Each metric from the single-metric functions on the whole tensor (the definitions)."""
    if s is None:
        visible, logits = p > 0, M.logits_from_pattern(p)
    else:
        visible, logits = M.visible_from_scores(s), s.float()
    H = M.entropy(p)
    return {
        "entropy": H,
        "entropy_norm": M.normalized_entropy(H, M.n_visible(visible)),
        "max_attn": M.max_attention(p),
        "k_eff_exp": M.k_eff_exp(H),
        "k_eff_pr": M.k_eff_participation(p),
        "k_eff_top90": M.k_eff_top_mass(p, mass=top_mass),
        "sink_mass": M.sink_mass(p),
        "local_gain": M.local_gain_under(p, logits, visible),
    }


def _scores(batch, heads, n, *, seed=0, dtype=torch.float32, spread=3.0):
    """Causal scores with a sink and heads of different sharpness; masked = finfo.min."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, heads, n, n, generator=g) * spread
    s[..., 0] += 4.0
    s = s * torch.linspace(0.2, 3.0, heads).view(1, heads, 1, 1)
    s = s.to(dtype).masked_fill(~M.causal_mask(n), torch.finfo(dtype).min)
    return s, torch.softmax(s.float(), dim=-1).to(dtype)


def _check(got, want, *, tol=1e-5):
    assert set(got) == set(want)
    for name in want:
        rtol = 1e-5 if name in ("k_eff_exp", "k_eff_pr") else 0
        atol = 1e-4 if name in ("k_eff_exp", "k_eff_pr") else tol
        assert_close(got[name], want[name], atol=atol, rtol=rtol, equal_nan=True, msg=name)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("n", [1, 7, 130, 600])
def test_row_metrics_equal_the_definitions(backend, n):
    s, p = _scores(2, 3, n)
    # small blocks: many query blocks, each over its own causal key extent
    got = KB.row_metrics(p, s, block_elements=4096, backend=backend)
    _check(got, _reference(p, s))
    got = KB.row_metrics(p, None, block_elements=4096, backend=backend)
    _check(got, _reference(p, None))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_row_metrics_with_a_non_causal_mask_and_top_mass_edges(backend):
    n = 90
    s, _ = _scores(1, 2, n, seed=1)
    s = s.float()
    s[..., 5, 60:70] = 1.0  # visible keys after the query: the block must widen to all keys
    s[..., 40:, 3:9] = torch.finfo(torch.float32).min  # hidden keys inside the causal part
    p = torch.softmax(s, dim=-1)
    for mass in (0.5, 0.9, 0.99, 1.0):
        got = KB.row_metrics(p, s, top_mass=mass, block_elements=1000, backend=backend)
        _check(got, _reference(p, s, top_mass=mass))
    lean = KB.row_metrics(p, s, top_mass=None, backend=backend)
    assert torch.isnan(lean["k_eff_top90"]).all()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_row_metrics_of_half_precision_inputs_are_float32_of_the_same_values(dtype, backend):
    s, p = _scores(2, 3, 200, dtype=dtype)
    got = KB.row_metrics(p, s, block_elements=8192, backend=backend)
    assert all(v.dtype == torch.float32 for v in got.values())
    _check(got, _reference(p, s))  # the definitions upcast the same half-precision values


def _long_llama(n_positions: int):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, max_position_embeddings=n_positions)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, w in hf.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                w.mul_(4.0)
    return bridge_from_hf(hf.eval())


def test_capture_equals_hook_pattern_at_a_long_context():
    """1,024 tokens: dozens of query blocks, rows whose top-90% mass needs hundreds of keys."""
    n = 1024
    model = _long_llama(n)
    tokens = torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    tm = capture_metrics(model, tokens)
    for l in range(2):
        p, s = cache[hook_name(l, "pattern")], cache[hook_name(l, "attn_scores")]
        want = _reference(p, s)
        got = {name: getattr(tm, name)[:, l] for name in want}
        _check(got, want)
        assert (want["k_eff_top90"] > 64).any()  # the chunked sums beyond the first chunk ran


def test_row_metrics_refuses_a_top_mass_outside_0_1_and_an_unknown_backend():
    from spectra_lens.errors import SpectraError

    p = torch.softmax(torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(SpectraError, match=r"top_mass must be in \(0, 1\] or None, got"):
            KB.row_metrics(p, None, top_mass=bad)
    assert KB.row_metrics(p, None, top_mass=1.0)["k_eff_top90"].shape == (2, 4)  # 1 is allowed
    with pytest.raises(SpectraError, match="backend must be 'torch', or 'numpy' for CPU tensors; got 'numba'"):
        KB.row_metrics(p, None, backend="numba")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_row_metrics_without_scores_take_the_keys_with_p_above_0_as_visible(backend):
    """No scores: the visible keys are p > 0 and the logits log p (causal rows by hand)."""
    s = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(1))
    s = s.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, dim=-1)
    got = KB.row_metrics(p, None, backend=backend)
    logp = torch.where(p > 0, p.log(), torch.zeros(()))
    H = -(p * logp).sum(-1)
    assert_close(got["entropy"], H, atol=1e-6, rtol=1e-5)
    # normalized by log(number of visible keys): t + 1 at query t
    assert_close(got["entropy_norm"][:, 1:], H[:, 1:] / torch.arange(2, 7).log(), atol=1e-6, rtol=1e-5)
    mean = (p * logp).sum(-1, keepdim=True)  # −Var_p(log p), log p = s − lse: the gain under s
    assert_close(got["local_gain"], -(p * (logp - mean) ** 2).sum(-1), atol=1e-5, rtol=1e-4)

"""The blocked attention path (no T×T pattern) against the eager `hook_pattern` capture.

Tolerances: 1e-5 per metric, in nats for the entropies and the local gain, in probability for
the masses, in log units (nats) for the k_eff and the norms (ln ‖q‖ is what the studies use);
k_eff_top90 counts are equal; logits of real
tokens to 1e-5. Small `block_elements` force many query blocks per layer.
"""

import numpy as np
import pytest
import torch

from spectra_lens import metrics as M
from spectra_lens.blocked_capture import BlockedCapture, blocked_attention, capture_metrics_blocked
from spectra_lens.capture import METRIC_NAMES, attached, capture_metrics, count_hooks
from spectra_lens.errors import SpectraError
from spectra_lens.interventions import KeyScale, LogitScale, QueryScale
from spectra_lens.kernels.attention_blocks import attention_blocks
from spectra_lens.kernels.fused import capture_row_metrics
from spectra_lens.layout import hook_name
from spectra_lens.testing import FAMILIES

BLOCKED_FAMILIES = tuple(f for f in FAMILIES if f != "bloom")  # BLOOM's ALiBi is refused
TOL = 1e-5


def assert_same_metrics(got, want, tol=TOL):
    for name in METRIC_NAMES:
        a, b = getattr(got, name), getattr(want, name)
        assert torch.equal(a.isnan(), b.isnan()), name
        if name in ("k_eff_top90", "k_eff_top90_nosink"):
            assert torch.equal(a.nan_to_num(-1), b.nan_to_num(-1)), name
            continue
        if name.startswith("k_eff") or name in ("q_norm", "k_norm"):  # in log units (nats)
            a, b = a.log(), b.log()
        diff = (a - b).abs().nan_to_num(0.0).max().item()
        assert diff <= tol, f"{name}: max difference {diff:.3g} > {tol}"


def eager_logits(model, tokens, interventions=(), mask=None):
    extra = {} if mask is None else {"attention_mask": mask.long()}
    with torch.no_grad(), attached(model, *interventions):
        return model(tokens, return_type="logits", **extra)


def clean(model):
    return count_hooks(model) == 0 and all("forward" not in vars(b.attn) for b in model.blocks)


@pytest.fixture(scope="module")
def long_tokens():
    return torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(7))


# --------------------------------------------------------------------------- the kernel alone


def _reference(q, k, v, scale, visible, softcap=None, slopes=None, sink=None):
    """Full-pattern attention and `metrics.capture_row_metrics` of it (the sink of row i of the
    batch at key sink[i], as the eager capture reads it under padding)."""
    b, n, h, d = q.shape
    g = h // k.shape[2]
    kk, vv = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if slopes is not None:
        s = s + slopes[:, None, None] * torch.arange(n, dtype=torch.float32)
    s = s.masked_fill(~visible, torch.finfo(torch.float32).min)
    p = torch.softmax(s, -1)
    z = torch.einsum("bhqk,bkhd->bqhd", p, vv)
    got = capture_row_metrics(p, s, M.vector_norm(q).transpose(1, 2))
    if sink is not None:
        got["sink_mass"] = p.gather(-1, sink.view(b, 1, 1, 1).expand(b, h, n, 1)).squeeze(-1)
    return z, got


@pytest.mark.parametrize("case", ["gqa", "softcap", "alibi", "window", "padded"])
def test_kernel_equals_full_pattern(case):
    torch.manual_seed(0)
    b, n, h, n_kv, d = 2, 37, 6, 2, 8
    q, k, v = torch.randn(b, n, h, d) * 2, torch.randn(b, n, n_kv, d) * 2, torch.randn(b, n, n_kv, d)
    causal = M.causal_mask(n)
    visible = causal.expand(b, 1, n, n)
    kw = {}
    if case == "softcap":
        kw["softcap"] = 3.0
    if case == "alibi":
        kw["alibi_slopes"] = torch.linspace(0.1, 0.9, h)
    if case == "window":
        kw["sliding_window"] = 5
        visible = visible & ~M.causal_mask(n).tril(-5)
    sink = None
    if case == "padded":  # row 1 left-padded by 4
        real = torch.ones(b, n, dtype=torch.bool)
        real[1, :4] = False
        visible = causal & real[:, None, None, :]
        kw["mask"] = visible
        sink = real.int().argmax(1)
    z_ref, ref = _reference(q, k, v, 0.3, visible, kw.get("softcap"), kw.get("alibi_slopes"), sink)
    for block in (50, 700, 10**9):  # one row per block, several, all rows at once
        z, got = attention_blocks(q, k, v, scale=0.3, block_elements=block, sink_index=sink, **kw)
        rows = slice(None) if case != "padded" else (torch.arange(n) >= 4)
        zz, zr = (z[1, rows], z_ref[1, rows]) if case == "padded" else (z, z_ref)
        assert (zz - zr).abs().max() <= TOL
        for name, want in ref.items():
            a, w = got[name], want
            if case == "padded":  # the padded row's real queries (its padding queries are dropped)
                a, w = a[1][:, rows], w[1][:, rows]
            assert torch.equal(a.isnan(), w.isnan()), name
            assert (a - w).abs().nan_to_num(0).max() <= TOL * max(1.0, float(w.abs().nan_to_num(0).max())), name


def test_kernel_sink_index_reads_the_first_real_key():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 9, 2, 4), torch.randn(1, 9, 2, 4), torch.randn(1, 9, 2, 4)
    real = torch.ones(1, 9, dtype=torch.bool)
    real[0, :3] = False
    visible = M.causal_mask(9) & real[:, None, None, :]
    _, got = attention_blocks(q, k, v, scale=0.5, mask=visible, sink_index=torch.tensor([3]), block_elements=20)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.5
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)
    assert (got["sink_mass"][0, :, 3:] - p[0, :, 3:, 3]).abs().max() <= TOL


def test_kernel_refuses_bad_input_in_one_line():
    q = torch.randn(1, 4, 3, 2)
    with pytest.raises(SpectraError, match="not a multiple") as e:
        attention_blocks(q, torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), scale=1.0, layer=3)
    assert "\n" not in str(e.value) and "layer 3" in str(e.value)
    later = torch.ones(1, 1, 4, 4, dtype=torch.bool)  # not causal
    with pytest.raises(SpectraError, match="later key"):
        attention_blocks(q, torch.randn(1, 4, 3, 2), torch.randn(1, 4, 3, 2), scale=1.0, mask=later,
                         block_elements=1)


# --------------------------------------------------------------------------- the bridge


@pytest.mark.parametrize("family", BLOCKED_FAMILIES)
def test_blocked_equals_eager(tiny, family, long_tokens):
    model, layout = tiny(family)
    got, logits = capture_metrics_blocked(model, long_tokens, block_elements=700, logits=True)
    assert_same_metrics(got, capture_metrics(model, long_tokens))
    assert (logits - eager_logits(model, long_tokens)).abs().max() <= TOL
    assert clean(model)


@pytest.mark.parametrize("family", BLOCKED_FAMILIES)
def test_blocked_query_scale_changes_the_real_pass(tiny, family, long_tokens):
    model, layout = tiny(family)
    scale = (QueryScale(0, 1, 2.5),)
    got, logits = capture_metrics_blocked(model, long_tokens, interventions=scale, block_elements=700, logits=True)
    assert_same_metrics(got, capture_metrics(model, long_tokens, interventions=scale))
    want = eager_logits(model, long_tokens, scale)
    assert (logits - want).abs().max() <= TOL
    # the intervention acted: the scaled head and the output moved
    plain, plain_logits = capture_metrics_blocked(model, long_tokens, block_elements=700, logits=True)
    assert (plain.entropy[:, 0, 1] - got.entropy[:, 0, 1]).abs().max() > 1e-3
    assert (plain_logits - logits).abs().max() > 1e-4


@pytest.mark.parametrize("family", BLOCKED_FAMILIES)
def test_blocked_padded_batch(tiny, family, long_tokens):
    model, layout = tiny(family)
    mask = torch.ones_like(long_tokens, dtype=torch.bool)
    mask[1, :9] = False  # left padding
    got, logits = capture_metrics_blocked(model, long_tokens, attention_mask=mask, block_elements=700,
                                          logits=True)
    assert_same_metrics(got, capture_metrics(model, long_tokens, attention_mask=mask))
    assert got.entropy[1, :, :, :9].isnan().all() and not got.entropy[1, :, :, 9:].isnan().any()
    assert (logits - eager_logits(model, long_tokens, mask=mask))[mask].abs().max() <= TOL


@pytest.mark.parametrize("family", BLOCKED_FAMILIES)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_blocked_norm_counterfactual_equals_eager(tiny, family, long_tokens, padded):
    """entropy_cf (H(softmax(s · r/‖q‖)) per row) of the blocked path is the eager capture's, NaN
    in the same rows (layers not bilinear in q, t < min_position, padding)."""
    from spectra_lens.reference import estimate_reference_norm

    model, layout = tiny(family)
    n_bins = int(M.log_position_bin(torch.tensor(long_tokens.shape[1] - 1))) + 1
    ref = estimate_reference_norm(model, [long_tokens], (0,), n_bins=n_bins, layout=layout)
    mask = None
    if padded:
        mask = torch.ones_like(long_tokens, dtype=torch.bool)
        mask[1, :9] = False
    got = capture_metrics_blocked(model, long_tokens, attention_mask=mask, block_elements=700,
                                  reference=ref)
    want = capture_metrics(model, long_tokens, attention_mask=mask, reference=ref)
    a, b = got.entropy_cf, want.entropy_cf
    assert a is not None and b is not None
    assert torch.equal(a.isnan(), b.isnan())
    assert (~a.isnan()).any() or not any(layout.q_bilinear)
    assert (a - b).abs().nan_to_num(0.0).max().item() <= TOL
    assert clean(model)


def test_blocked_key_scale(tiny, long_tokens):
    model, layout = tiny("llama_gqa")
    scale = (KeyScale(1, 1, 0.6),)
    got, logits = capture_metrics_blocked(model, long_tokens, interventions=scale, block_elements=700, logits=True)
    assert_same_metrics(got, capture_metrics(model, long_tokens, interventions=scale))
    assert (logits - eager_logits(model, long_tokens, scale)).abs().max() <= TOL


def test_blocked_never_forms_the_pattern(tiny, long_tokens):
    model, layout = tiny("llama_gqa")
    fired = []
    spies = [(hook_name(l, kind), lambda x, hook: fired.append(hook.name))
             for l in range(layout.n_layers) for kind in ("pattern", "attn_scores")]
    cap = BlockedCapture(layout)
    with torch.no_grad(), attached(model, *spies), blocked_attention(model, capture=cap):
        model(long_tokens, return_type="logits")
    assert fired == []
    assert count_hooks(model) == 0
    # given to the blocked path itself, a hook on the pattern is refused (it would never fire)
    with pytest.raises(SpectraError, match="never forms"):
        with blocked_attention(model, interventions=spies[:1]):
            pass
    assert clean(model)
    with torch.no_grad(), attached(model, *spies):  # the spies themselves work
        model(long_tokens, return_type="logits")
    assert fired


def test_blocked_refuses_alibi_and_pattern_interventions(tiny, long_tokens):
    model, _ = tiny("bloom")
    with pytest.raises(SpectraError, match="layer 0 .*ALiBi") as e:
        capture_metrics_blocked(model, long_tokens)
    assert "\n" not in str(e.value)
    assert clean(model)
    model, _ = tiny("llama_gqa")
    with pytest.raises(SpectraError, match="never forms"):
        capture_metrics_blocked(model, long_tokens, interventions=(LogitScale(0, 0, 2.0),))
    assert clean(model)


def test_blocked_layers_subset_and_no_top_mass(tiny, long_tokens):
    model, _ = tiny("qwen3")
    got = capture_metrics_blocked(model, long_tokens, layers=[1], top_mass=None, block_elements=700)
    want = capture_metrics(model, long_tokens, layers=[1], top_mass=None)
    assert got.layers == (1,)
    assert_same_metrics(got, want)
    assert got.k_eff_top90.isnan().all()


def test_default_model_blocked_equals_eager():
    """One block per layer: the eager numbers. Query blocks of 7 rows: layer 0 (same inputs) to
    1e-5; deeper layers drift with the float32 rounding of the attention output, which the model
    amplifies: on this model a 1e-7 relative perturbation of the first block's input moves the
    eager metrics by up to 1.4e-5 (measured), so every layer is held to 5e-5 there."""
    from spectra_lens.models import load_model

    model = load_model()
    text = "The attention of a transformer spreads over the keys it can see. " * 6
    tokens = model.tokenizer(text, return_tensors="pt")["input_ids"][:, :64]
    for interventions in ((), (QueryScale(3, 2, 1.8),)):
        want = capture_metrics(model, tokens, interventions=interventions)
        want_logits = eager_logits(model, tokens, interventions)
        got, logits = capture_metrics_blocked(model, tokens, interventions=interventions, logits=True)
        assert_same_metrics(got, want)
        assert (logits - want_logits).abs().max() <= TOL
        got, logits = capture_metrics_blocked(model, tokens, interventions=interventions,
                                              block_elements=9 * 64 * 7, logits=True)
        assert_same_metrics(got, want, tol=5e-5)
        first = capture_metrics_blocked(model, tokens, interventions=interventions, layers=[0],
                                        block_elements=9 * 64 * 7)
        assert_same_metrics(first, capture_metrics(model, tokens, interventions=interventions, layers=[0]))
        assert (logits - want_logits).abs().max() <= 1e-4
    assert clean(model)


# --------------------------------------------------------------------------- on CUDA

@pytest.mark.parametrize("family", BLOCKED_FAMILIES)
@pytest.mark.parametrize("case", ["plain", "query_scale", "padded"])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_blocked_equals_eager(family, case):
    """On the GPU, the blocked capture equals the eager hook_pattern capture (1e-5 nats; norms
    and k_eff in log units) and the logits, with a query scale, and with a left-padded batch."""
    from spectra_lens.models import bridge_from_hf
    from spectra_lens.testing import tiny_hf_model

    model = bridge_from_hf(tiny_hf_model(family).to("cuda"))
    tokens = torch.randint(1, 97, (2, 96), generator=torch.Generator().manual_seed(7)).cuda()
    scale = (QueryScale(0, 1, 2.5),) if case == "query_scale" else ()
    mask = None
    if case == "padded":
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[1, :9] = False
    got, logits = capture_metrics_blocked(model, tokens, interventions=scale, attention_mask=mask,
                                          block_elements=2000, logits=True)
    assert got.entropy.device.type == "cuda"
    assert_same_metrics(got, capture_metrics(model, tokens, interventions=scale, attention_mask=mask))
    want = eager_logits(model, tokens, scale, mask=mask)
    keep = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask
    assert (logits - want)[keep].abs().max() <= TOL
    assert clean(model)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_default_model_blocked_equals_eager_and_holds_no_pattern():
    """The default model on the GPU: blocked equals eager at 512 tokens (5e-5, as on the CPU for
    query blocks smaller than the sequence), and a 4096-token blocked capture allocates less
    than one layer's [head, T, T] float32 pattern above the weights."""
    from spectra_lens.models import load_model

    model = load_model(device="cuda")
    text = "The attention of a transformer spreads over the keys it can see. " * 400
    ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
    tokens = ids[:, :512].cuda()
    for interventions in ((), (QueryScale(3, 2, 1.8),)):
        want = capture_metrics(model, tokens, interventions=interventions)
        got, logits = capture_metrics_blocked(model, tokens, interventions=interventions, logits=True)
        assert_same_metrics(got, want, tol=5e-5)
        assert (logits - eager_logits(model, tokens, interventions)).abs().max() <= 1e-4
    long = ids[:, :4096].cuda()
    assert long.shape[1] == 4096
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    capture_metrics_blocked(model, long, top_mass=None)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    one_pattern = model.cfg.n_heads * 4096 * 4096 * 4
    assert extra < one_pattern, f"{extra / 2**20:.0f} MiB above the weights"
    assert clean(model)


@pytest.mark.parametrize("family", BLOCKED_FAMILIES)
def test_reference_norm_from_a_blocked_pass_equals_the_eager_one(tiny, family, long_tokens):
    """The reference-norm pass of a long run computes attention in query blocks: the same r."""
    from spectra_lens.reference import estimate_reference_norm

    model, layout = tiny(family)
    n_bins = int(M.log_position_bin(torch.tensor(long_tokens.shape[1] - 1))) + 1
    eager = estimate_reference_norm(model, [long_tokens], (0,), n_bins=n_bins, layout=layout)
    blocked = estimate_reference_norm(model, [long_tokens[:1], long_tokens[1:]], (0,), n_bins=n_bins,
                                      layout=layout, attention="blocked")
    np.testing.assert_array_equal(blocked.n_tokens, eager.n_tokens)
    np.testing.assert_allclose(blocked.log_norm, eager.log_norm, rtol=0, atol=1e-5, equal_nan=True)
    assert clean(model)

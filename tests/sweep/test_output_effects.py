"""Output effects of an intervention against two plain Hugging Face forward passes.

`intervention_effects` scales a head's query (or a kv head's key) with the library's hooks on
the TransformerBridge. The reference runs the same tiny model as a plain HF model twice: once
as is, once with the head's query (key) projection multiplied by α in the weights
(`reference.scale_query`), and computes the loss, the KL divergence of the next-token
distribution and the later heads' metrics from those two passes with `reference`'s float64
code. Nothing of the library's computation is shared.

The tiny models are made more sensitive to attention (value/output and unembedding weights
multiplied up, the same on both sides) so that one head moves the next-token distribution by
KL ≈ 0.002–0.2 nats: there KL(p_α ‖ p_1) and KL(p_1 ‖ p_α) differ by 1–10 %, far above the
float32 error of the library (~1e-5 relative), so the test tells the two directions apart.
"""

import numpy as np
import pytest
import reference as R
import torch

from spectra_lens.capture import attached
from spectra_lens.errors import SpectraError
from spectra_lens.interventions import KeyScale, QueryScale
from spectra_lens.models import bridge_from_hf
from spectra_lens.sweep import intervention_effects
from spectra_lens.testing import tiny_hf_model

ALPHAS = (0.25, 3.0, 8.0)  # none is 1: the α = 1 column is zero by construction
# (family, layer, head) scaled in each family: an early layer, so that a later layer exists.
CASES = [("gpt2", 0, 1), ("llama_gqa", 0, 2), ("neox", 0, 3), ("opt", 0, 0)]
RTOL = 2e-4  # library (float32) vs reference (float64); the KL directions differ by > 1e-2


def _sensitive_hf(family: str):
    """The tiny HF model with attention outputs ×5 and the unembedding ×8 (see module doc)."""
    hf = tiny_hf_model(family)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if any(t in name for t in ("attn.c_proj", "o_proj", "v_proj", "attention.dense",
                                       "self_attn.out_proj")):
                p.mul_(5.0)
        hf.get_output_embeddings().weight.mul_(8.0)
    return hf


@pytest.fixture(scope="module")
def toks():
    return torch.randint(1, 97, (3, 12), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def effects(toks):
    """effects(family) -> (library result, reference base pass, {α: reference scaled pass}),
    computed once per family on first use."""
    cache = {}

    def get(family):
        if family not in cache:
            layer, head = next((l, h) for f, l, h in CASES if f == family)
            model = bridge_from_hf(_sensitive_hf(family))
            got = intervention_effects(model, toks, ALPHAS, QueryScale.scan(layer, head))
            base = R.forward(_sensitive_hf(family), toks)
            scaled = {}
            for a in ALPHAS:
                hf = _sensitive_hf(family)
                R.scale_query(hf, family, layer, head, a)
                scaled[a] = R.forward(hf, toks)
            cache[family] = (got, base, scaled)
        return cache[family]

    return get


@pytest.mark.parametrize("family,layer,head", CASES)
def test_delta_loss_equals_two_plain_forward_passes(effects, toks, family, layer, head):
    got, (base_logits, _), scaled = effects(family)
    base_loss = R.next_token_loss(base_logits, toks)
    np.testing.assert_allclose(got.base_loss.numpy(), base_loss, rtol=1e-5)
    for i, a in enumerate(got.alphas):
        want = R.next_token_loss(scaled[a][0], toks) - base_loss
        assert np.abs(want).max() > 1e-3, "the reference effect must be measurable"
        np.testing.assert_allclose(got.delta_loss[i].numpy(), want, rtol=RTOL, atol=2e-6)


@pytest.mark.parametrize("family,layer,head", CASES)
def test_kl_equals_two_plain_forward_passes_in_the_stated_direction(effects, family, layer, head):
    """kl = KL(p_1 ‖ p_α) (unscaled ‖ scaled) as documented; the other direction differs by more
    than the tolerance."""
    got, (base_logits, _), scaled = effects(family)
    for i, a in enumerate(got.alphas):
        want = R.kl_per_sequence(base_logits, scaled[a][0])  # KL(p_1 ‖ p_α)
        other = R.kl_per_sequence(scaled[a][0], base_logits)  # KL(p_α ‖ p_1)
        np.testing.assert_allclose(got.kl[i].numpy(), want, rtol=RTOL, atol=1e-8)
        if a == max(ALPHAS):
            assert np.abs(other - want).max() > 10 * RTOL * np.abs(want).max(), (
                "the test must be able to tell the two KL directions apart")


@pytest.mark.parametrize("family,layer,head", CASES)
def test_scaled_head_and_later_heads_metrics_equal_plain_forward_passes(effects, family, layer, head):
    """Every head of every layer at every α: the scaled head itself, its layer's other heads
    (unchanged) and the later layer's heads (changed through the residual stream)."""
    got, (_, base_att), scaled = effects(family)
    n_layers, n_heads = len(base_att), base_att[0].shape[1]
    moved = 0.0
    for l in range(n_layers):
        li = got.scaled.layers.index(l)
        for h in range(n_heads):
            ref0 = R.head_means(base_att[l][:, h])
            for m in R.SWEEP_METRICS:
                np.testing.assert_allclose(got.unscaled.metric(m)[:, li, h].numpy(), ref0[m],
                                           rtol=1e-5, atol=1e-6, err_msg=f"unscaled L{l}H{h} {m}")
            for i, a in enumerate(got.alphas):
                ref = R.head_means(scaled[a][1][l][:, h])
                for m in R.SWEEP_METRICS:
                    np.testing.assert_allclose(got.scaled.metric(m)[i, :, li, h].numpy(), ref[m],
                                               rtol=1e-5, atol=1e-5, err_msg=f"α={a} L{l}H{h} {m}")
                if l > layer:
                    moved = max(moved, float(np.abs(ref["entropy"] - ref0["entropy"]).max()))
    assert moved > 1e-3, "a later head's entropy must move, or the test checks nothing downstream"


@pytest.mark.parametrize("family,layer,head", CASES[:2])
def test_head_frame_and_downstream_frame_rows_equal_the_reference(effects, toks, family, layer, head):
    got, (base_logits, base_att), scaled = effects(family)
    frame = got.head_frame(layer, head, n_boot=300)
    assert list(frame["scale"]) == list(ALPHAS)
    assert (frame["layer"] == layer).all() and (frame["head"] == head).all()
    base_loss = R.next_token_loss(base_logits, toks)
    ref0 = R.head_means(base_att[layer][:, head])
    for i, a in enumerate(ALPHAS):
        row = frame.iloc[i]
        ref = R.head_means(scaled[a][1][layer][:, head])
        checks = {
            "mean_entropy": ref["entropy"], "mean_max_attn": ref["max_attn"],
            "mean_k_eff": ref["k_eff_exp"],
            "delta_entropy": ref["entropy"] - ref0["entropy"],
            "delta_loss": R.next_token_loss(scaled[a][0], toks) - base_loss,
            "kl_from_unscaled": R.kl_per_sequence(base_logits, scaled[a][0]),
        }
        for col, values in checks.items():
            mean, low, high = R.document_bootstrap(values, n_boot=300)
            np.testing.assert_allclose([row[col], row[f"{col}_ci_low"], row[f"{col}_ci_high"]],
                                       [mean, low, high], rtol=2e-4, atol=1e-6, err_msg=col)
        np.testing.assert_allclose(row["k_eff_pr"], ref["k_eff_pr"].mean(), rtol=1e-5)
        np.testing.assert_allclose(row["k_eff_top90"], ref["k_eff_top90"].mean(), rtol=1e-6)
        assert row["n_sequences"] == toks.shape[0]
    down = got.downstream_frame(min_layer=layer + 1, n_boot=300)
    for _, row in down.iterrows():
        l, h, a = int(row["layer"]), int(row["head"]), float(row["scale"])
        ref = R.head_means(scaled[a][1][l][:, h])
        ref0 = R.head_means(base_att[l][:, h])
        mean, low, high = R.document_bootstrap(ref["entropy"] - ref0["entropy"], n_boot=300)
        np.testing.assert_allclose(row["entropy"], ref["entropy"].mean(), rtol=1e-5)
        np.testing.assert_allclose([row["delta_entropy"], row["delta_entropy_ci_low"],
                                    row["delta_entropy_ci_high"]], [mean, low, high],
                                   rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(row["delta_max_attn"], (ref["max_attn"] - ref0["max_attn"]).mean(),
                                   rtol=2e-4, atol=1e-6)


def test_key_scaling_effects_equal_plain_forward_passes(toks):
    """KeyScale on a grouped kv head: its whole query group, the loss and the KL."""
    family, layer, kv = "llama_gqa", 0, 1
    model = bridge_from_hf(_sensitive_hf(family))
    got = intervention_effects(model, toks, (0.5, 4.0), KeyScale.scan(layer, kv))
    base_logits, base_att = R.forward(_sensitive_hf(family), toks)
    for i, a in enumerate(got.alphas):
        hf = _sensitive_hf(family)
        R.scale_key(hf, family, layer, kv, a)
        logits, att = R.forward(hf, toks)
        np.testing.assert_allclose(got.kl[i].numpy(), R.kl_per_sequence(base_logits, logits),
                                   rtol=RTOL, atol=1e-8)
        np.testing.assert_allclose(got.delta_loss[i].numpy(),
                                   R.next_token_loss(logits, toks) - R.next_token_loss(base_logits, toks),
                                   rtol=RTOL, atol=2e-6)
        for l in range(len(att)):
            for h in range(att[l].shape[1]):
                np.testing.assert_allclose(got.scaled.entropy[i, :, l, h].numpy(),
                                           R.head_means(att[l][:, h])["entropy"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_query_scale_at_chosen_positions_equals_a_plain_forward_pass(toks, family):
    """QueryScale(positions=...) against a plain HF pass whose query projection output is scaled
    at those positions only: the first and the last position included, α one float or one value
    per batch row."""
    layer, head, positions = 0, 1, (0, 5, toks.shape[1] - 1)
    model = bridge_from_hf(_sensitive_hf(family))
    base, _ = R.forward(_sensitive_hf(family), toks)
    for alpha in (3.0, torch.tensor([0.5, 3.0, 8.0])):
        with torch.no_grad(), attached(model, QueryScale(layer, head, alpha, positions=positions)):
            got = model(toks).double().numpy()
        hf = _sensitive_hf(family)
        with R.query_scaled_at(hf, family, layer, head, alpha, positions):
            want, _ = R.forward(hf, toks)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
        moved = np.abs(got - base.numpy()).max(-1)  # [batch, pos]
        # Position 0 sees one key (its row is 1 at any α); positions 1–4 are not scaled.
        assert moved[:, :5].max() < 1e-4 and moved[:, 5].min() > 1e-2
    n = toks.shape[1]
    for bad in ((n,), (-1,), (2, n)):
        with pytest.raises(SpectraError, match=rf"positions must be in \[0, {n}\), got \[{', '.join(map(str, bad))}\]"):
            with torch.no_grad(), attached(model, QueryScale(layer, head, 2.0, positions=bad)):
                model(toks)


def test_loss_of_a_two_token_sequence_in_a_padded_batch_equals_a_plain_pass(toks):
    """A right-padded sequence with two real tokens beside a full one: its loss (one next-token
    prediction, from position 0, whose query sees one key and so does not change) and its KL
    (over its two positions) are those of the two tokens alone."""
    family, layer, head, alpha = "llama_gqa", 0, 2, 8.0
    model = bridge_from_hf(_sensitive_hf(family))
    short = toks[1:2, :2]
    n = toks.shape[1]
    batch = torch.cat([toks[:1], torch.cat([short, torch.full((1, n - 2), 3)], 1)])
    mask = torch.zeros_like(batch)
    mask[0], mask[1, :2] = 1, 1
    got = intervention_effects(model, batch, (alpha,), QueryScale.scan(layer, head), attention_mask=mask)
    base_logits, _ = R.forward(_sensitive_hf(family), short)
    want = R.next_token_loss(base_logits, short)[0]
    assert want > 1.0
    np.testing.assert_allclose(float(got.base_loss[1]), want, rtol=1e-5)
    np.testing.assert_allclose(float(got.loss[0, 1]), want, rtol=1e-5)
    hf = _sensitive_hf(family)
    R.scale_query(hf, family, layer, head, alpha)
    kl = R.kl_per_sequence(base_logits, R.forward(hf, short)[0])[0]
    assert kl > 1e-3
    np.testing.assert_allclose(float(got.kl[0, 1]), kl, rtol=RTOL)


def test_query_scale_hook_keeps_the_dtype_and_names_its_hook_in_errors():
    """The hook function itself: a bfloat16 query stays bfloat16 (only the head is multiplied,
    exactly), and a wrong shape or a wrong number of per-row α values is refused with the hook
    point's name."""
    from spectra_lens.layout import attention_layout

    model = bridge_from_hf(_sensitive_hf("llama_gqa"))
    layout = attention_layout(model)
    (name, fn), = QueryScale(1, 2, 2.0).hooks(layout)
    assert name == layout.q_hook(1)
    x = torch.randn(2, 5, layout.n_heads, layout.d_head, generator=torch.Generator().manual_seed(0))
    out = fn(x.bfloat16(), None)
    assert out.dtype == torch.bfloat16
    want = x.bfloat16().clone()
    want[:, :, 2] = want[:, :, 2] * 2
    assert torch.equal(out, want)
    with pytest.raises(SpectraError, match=rf"^{name}: expected \[batch pos head d_head\]"):
        fn(x[..., :-1], None)
    (_, per_row), = QueryScale(1, 2, torch.tensor([2.0, 3.0, 4.0])).hooks(layout)
    with pytest.raises(SpectraError, match=rf"^{name}: one alpha per batch row expected \(2\), got 3"):
        per_row(x, None)

"""The exact norm counterfactual: H_cf of the capture equals the entropy of a real forward pass in
which every query of the layer is rescaled to the head's reference norm (direction kept)."""

import numpy as np
import pytest
import torch

from spectra_lens import metrics as M
from spectra_lens.capture import MetricCapture, attached, capture_metrics
from spectra_lens.kernels.alpha import row_alpha_entropy
from spectra_lens.layout import attention_layout, hook_name
from spectra_lens.reference import ReferenceNorm, estimate_reference_norm, selection_documents
from spectra_lens.testing import FAMILIES


def _reference(model, layout, tokens, *, min_position=1):
    n_bins = int(M.log_position_bin(torch.tensor(tokens.shape[1] - 1))) + 1
    return estimate_reference_norm(model, [tokens], (0,), n_bins=n_bins, min_position=min_position,
                                   layout=layout)


class _Stop(Exception):
    pass


def _real_entropy(model, layout, tokens, layer, alpha):
    """Entropy of layer `layer`'s hook_pattern with q_eff[b, t, h] scaled by alpha[b, h, t] (a plain
    hook on the effective query), −Σ p log p computed here from the pattern."""
    got = {}

    def scale(q, hook):
        return q * alpha.permute(0, 2, 1)[..., None].to(q.dtype)

    def grab(p, hook):
        got["p"] = p.detach().double()
        raise _Stop  # nothing after this layer's pattern is needed

    hooks = [(layout.q_hook(layer), scale), (hook_name(layer, "pattern"), grab)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        try:
            model(tokens)
        except _Stop:
            pass
    p = got["p"]
    return -torch.special.xlogy(p, p).sum(-1)  # [batch, head, pos]


def test_kernel_equals_definition():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 9, 9, generator=g) * 3
    vis = M.causal_mask(9).expand(2, 3, 9, 9)
    s = s.masked_fill(~vis, torch.finfo(torch.float32).min)
    a = torch.rand(2, 3, 9, generator=g) * 3 + 0.1
    got = row_alpha_entropy(s, vis, a)
    want = M.counterfactual_entropy(s, vis, a)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # α = 1 is the row's own entropy; α → large goes to 0 (the argmax alone)
    torch.testing.assert_close(row_alpha_entropy(s, vis, torch.ones_like(a)),
                               M.entropy_from_scores(s, vis), atol=1e-5, rtol=0)
    assert (row_alpha_entropy(s, vis, a * 1e4) < 1e-3).all()


def test_log_position_bin():
    t = torch.arange(16)
    assert M.log_position_bin(t).tolist() == [0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 4]
    big = torch.tensor([2**20 - 2, 2**20 - 1])
    assert M.log_position_bin(big).tolist() == [19, 20]


@pytest.mark.parametrize("family", FAMILIES)
def test_counterfactual_equals_forward_pass(tiny, tokens, family):
    model, layout = tiny(family)
    ref = _reference(model, layout, tokens)
    tm = capture_metrics(model, tokens, reference=ref)
    assert tm.entropy_cf is not None and tm.entropy_cf.shape == tm.entropy.shape
    pos = torch.arange(tokens.shape[1])
    checked = 0
    for l in range(layout.n_layers):
        cf = tm.entropy_cf[:, l].double()
        if not layout.q_bilinear[l]:  # scaling q does not scale the logits: no counterfactual
            assert torch.isnan(cf).all()
            continue
        alpha = ref.alpha(l, tm.q_norm[:, l], pos)  # r / ‖q‖; NaN at t < min_position
        real = _real_entropy(model, layout, tokens, l, torch.nan_to_num(alpha, nan=1.0))
        keep = pos >= 1
        assert (cf[..., keep] - real[..., keep]).abs().max() <= 1e-5, family
        assert torch.isnan(cf[..., 0]).all()
        # where the norms vary, the counterfactual is not the observed entropy (QK-norm models
        # with unit norm weights have a near-constant ‖q‖: there the two agree)
        if torch.log(tm.q_norm[:, l, :, 1:]).std() > 1e-2:
            assert (cf[..., keep] - tm.entropy[:, l].double()[..., keep]).abs().max() > 1e-3
        checked += 1
    assert checked or family in ("bloom", "gemma2")


def test_counterfactual_query_has_reference_norm(tiny, tokens):
    """The scaled query keeps its direction and has norm r[l, h, bin(t)]."""
    model, layout = tiny("llama_gqa")
    ref = _reference(model, layout, tokens)
    tm = capture_metrics(model, tokens, reference=ref)
    pos = torch.arange(tokens.shape[1])
    alpha = ref.alpha(1, tm.q_norm[:, 1], pos)
    scaled = alpha * tm.q_norm[:, 1].double()
    want = torch.as_tensor(ref.norm[1])[:, M.log_position_bin(pos)]
    torch.testing.assert_close(scaled[..., 1:], want[None, :, 1:].expand_as(scaled[..., 1:]))
    # the geometric mean over the selection tokens of a bin is r there
    logq = torch.log(tm.q_norm[:, 1].double())[..., 3:7]  # bin 2: t = 3..6
    torch.testing.assert_close(logq.mean((0, 2)), torch.as_tensor(ref.log_norm[1, :, 2]))


def test_padding_counterfactual(tiny, tokens):
    """Under left padding the bins count real positions; padding gets NaN."""
    model, layout = tiny("llama_gqa")
    ref = _reference(model, layout, tokens)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[0, :3] = False
    tm = capture_metrics(model, tokens, reference=ref, attention_mask=mask)
    assert torch.isnan(tm.entropy_cf[0, :, :, :3]).all()
    assert torch.isfinite(tm.entropy_cf[1, :, :, 1:]).all()
    frame = tm.to_frame()
    assert "entropy_cf" in frame.columns


def test_reference_round_trip(tmp_path, tiny, tokens):
    model, layout = tiny("gpt2")
    ref = _reference(model, layout, tokens)
    ref.save(tmp_path / "r.npz")
    back = ReferenceNorm.load(tmp_path / "r.npz")
    np.testing.assert_array_equal(back.log_norm, ref.log_norm)
    assert back.layers == ref.layers and back.documents == ref.documents
    assert "selection_documents" in back.manifest()


def test_selection_documents():
    docs = np.repeat(np.arange(20), 2)
    sel = selection_documents(docs, seed=0)
    assert sel.size == 5 and np.array_equal(sel, np.unique(sel))
    assert np.array_equal(sel, selection_documents(docs, seed=0))
    assert not np.array_equal(sel, selection_documents(docs, seed=1))
    assert selection_documents([3, 3], seed=0).size == 0
    assert selection_documents([3, 4], seed=0).size == 1


def test_capture_without_reference_unchanged(tiny, tokens):
    model, layout = tiny("gpt2")
    a = MetricCapture(layout).run(model, tokens)
    with attached(model, layout=layout):
        pass
    assert a.entropy_cf is None and "entropy_cf" not in a.to_frame().columns


@pytest.fixture(scope="module")
def default_model():
    from spectra_lens.models import load_model

    return load_model()


def test_counterfactual_equals_forward_pass_default_model(default_model):
    """The embedded default model (SmolLM2-135M-Instruct, rotary, GQA), every layer, 2 × 24 tokens."""
    model = default_model
    layout = attention_layout(model)
    text = ["The old library stood at the corner of the market square, and every morning the "
            "librarian unlocked its heavy wooden doors a few minutes before nine.",
            "def mean(values):\n    return sum(values) / len(values)  # the arithmetic mean of a list"]
    tokens = torch.stack([model.to_tokens(t)[0, :24] for t in text])
    ref = _reference(model, layout, tokens[:1])
    tm = capture_metrics(model, tokens, reference=ref)
    pos = torch.arange(tokens.shape[1])
    worst = 0.0
    for l in range(layout.n_layers):
        alpha = torch.nan_to_num(ref.alpha(l, tm.q_norm[:, l], pos), nan=1.0)
        real = _real_entropy(model, layout, tokens, l, alpha)
        worst = max(worst, float((tm.entropy_cf[:, l, :, 1:].double() - real[..., 1:]).abs().max()))
    assert worst <= 1e-5
    assert float((tm.entropy_cf - tm.entropy)[..., 1:].abs().max()) > 0.1  # it is a real change

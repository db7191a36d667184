"""Norm replacement, mean ablation and the several-heads-per-pass engine (spectra_lens.norm_ablation)."""

import math
import warnings

import numpy as np
import pytest
import torch

from spectra_lens.capture import MetricCapture, attached, count_hooks
from spectra_lens.causal import SmallClusterWarning, query_direction_spread
from spectra_lens.errors import SpectraError
from spectra_lens.interventions import QueryRotate, QueryScale
from spectra_lens.norm_ablation import (
    Copy,
    NormReplace,
    RowBlocks,
    ZReplace,
    copy_effects,
    effect_frame,
    estimate_reference_norms,
    position_bins,
    skip_support,
)
from spectra_lens.testing import tiny_hf_model

T = 16


@pytest.fixture(scope="module")
def sel():
    return torch.randint(1, 97, (6, T), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def meas():
    return torch.randint(1, 97, (4, T), generator=torch.Generator().manual_seed(12))


def test_position_bins_are_log2_ranges():
    assert position_bins(9).tolist() == [0, 1, 2, 2, 3, 3, 3, 3, 4]
    with pytest.raises(SpectraError):
        position_bins(0)


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "gemma2"])  # qwen3: QK-norm fixes ||q||
def test_norm_replacement_keeps_direction_and_sets_norm(tiny, sel, meas, family):
    model, layout = tiny(family)
    ref = estimate_reference_norms(model, sel, spreads=False)
    l, h = 1, 2
    r = ref.norms(l, h, T)
    seen = {}

    def grab(key):
        def fn(x, hook):
            seen[key] = x[:, :, h].detach().double().clone()
        return fn

    name = layout.q_hook(l)
    with torch.no_grad():
        with attached(model, (name, grab("before")), NormReplace(l, h, r), (name, grab("after")), layout=layout):
            model(meas, return_type=None)
    q, q2 = seen["before"], seen["after"]
    assert (q2.norm(dim=-1) - r[None]).abs().max() <= 1e-5 * float(r.max())
    unit = q / q.norm(dim=-1, keepdim=True)
    unit2 = q2 / q2.norm(dim=-1, keepdim=True)
    assert (unit - unit2).abs().max() <= 1e-5
    assert (q.norm(dim=-1) - r[None]).abs().max() > 1e-2  # the norms did change
    assert count_hooks(model) == 0


def _hf_logits(family, tokens, hook_module, hook):
    hf = tiny_hf_model(family)
    module = hook_module(hf)
    handle = hook(module)
    try:
        with torch.no_grad():
            return hf(tokens).logits
    finally:
        handle.remove()


def test_norm_replacement_equals_a_hand_built_forward(tiny, sel, meas):
    """Llama: rotary is a rotation per (position, head), so replacing the norm of rot_q equals
    scaling the head's slice of the q_proj output by r_t / ||q_t||: a plain Hugging Face forward."""
    model, layout = tiny("llama_gqa")
    assert layout.q_kind == "rot_q"
    ref = estimate_reference_norms(model, sel, spreads=False)
    l, h, d = 1, 3, layout.d_head
    r = ref.norms(l, h, T)
    with torch.no_grad(), attached(model, NormReplace(l, h, r), layout=layout):
        got = model(meas, return_type="logits")

    def hook(module):
        def fn(mod, args, out):
            out = out.clone()
            part = out[..., h * d : (h + 1) * d].double()
            out[..., h * d : (h + 1) * d] = (part * (r[None, :, None] / part.norm(dim=-1, keepdim=True))).float()
            return out
        return module.register_forward_hook(fn)

    want = _hf_logits("llama_gqa", meas, lambda m: m.model.layers[l].self_attn.q_proj, hook)
    with torch.no_grad():
        plain = model(meas, return_type="logits")
    assert (got - plain).abs().max() > 1e-3  # the intervention does something
    assert torch.allclose(got, want, atol=1e-4)


def test_mean_ablation_equals_a_hand_built_forward(tiny, sel, meas):
    model, layout = tiny("llama_gqa")
    ref = estimate_reference_norms(model, sel, spreads=False)
    l, h, d = 0, 1, layout.d_head
    z = ref.z(l, h, T)  # [pos, d]
    with torch.no_grad(), attached(model, ZReplace(l, h, z), layout=layout):
        got = model(meas, return_type="logits")

    def hook(module):
        def fn(mod, args):
            x = args[0].clone()
            x[..., h * d : (h + 1) * d] = z.float()[None]
            return (x,)
        return module.register_forward_pre_hook(fn)

    want = _hf_logits("llama_gqa", meas, lambda m: m.model.layers[l].self_attn.o_proj, hook)
    assert torch.allclose(got, want, atol=1e-4)


def test_reference_norms_equal_an_independent_capture(tiny, sel):
    model, layout = tiny("qwen3")
    ref = estimate_reference_norms(model, sel, min_position=1)
    tm = MetricCapture(layout, top_mass=None).run(model, sel)
    log_q = tm.q_norm.double().log()  # [batch, layer, head, pos]
    bins = position_bins(T)
    for b in range(int(bins.max()) + 1):
        want = log_q[..., bins == b].mean(dim=(0, 3))
        assert torch.allclose(ref.log_norm[..., b], want, atol=1e-6)
    assert ref.counts.tolist() == [6 * int((bins == b).sum()) for b in range(int(bins.max()) + 1)]
    spread = query_direction_spread(model, sel, 1, 3, min_position=1)
    assert ref.spreads[(1, 3)].median_angle == pytest.approx(spread.median_angle, abs=1e-6)
    assert ref.spreads[(1, 3)].sd_log_norm == pytest.approx(spread.sd_log_norm, abs=1e-6)
    with pytest.raises(SpectraError, match="position bins"):
        ref.norms(0, 0, 4 * T)
    frame = ref.frame()
    assert len(frame) == layout.n_layers * layout.n_heads * (int(bins.max()) + 1)
    assert "disjoint" in ref.as_dict()["rule"]


def _copies(ref, heads):
    out = []
    for l, h in heads:
        out += [Copy(("norm", l, h), l, h, NormReplace(l, h, ref.norms(l, h, T))),
                Copy(("mean", l, h), l, h, ZReplace(l, h, ref.z(l, h, T))),
                Copy(("rot", l, h), l, h, QueryRotate(l, h, ref.spreads[(l, h)].median_angle))]
    return out


def _one_by_one(model, layout, tokens, copy):
    """The outcomes of one copy from two plain forward passes (no engine)."""
    with torch.no_grad():
        cap0, cap1 = MetricCapture(layout, top_mass=None), MetricCapture(layout, top_mass=None)
        with attached(model, cap0, layout=layout):
            base = model(tokens, return_type="logits").double()
        with attached(model, copy.intervention, cap1, layout=layout):
            new = model(tokens, return_type="logits").double()
    lp0, lp1 = base.log_softmax(-1), new.log_softmax(-1)
    tgt = tokens[:, 1:, None]
    d_loss = (lp0[:, :-1].gather(-1, tgt) - lp1[:, :-1].gather(-1, tgt)).squeeze(-1).mean(-1)
    kl = (lp0.exp() * (lp0 - lp1)).sum(-1).mean(-1)
    e0 = cap0.result().entropy[..., 1:].double().mean(-1)  # [batch, layer, head]
    e1 = cap1.result().entropy[..., 1:].double().mean(-1)
    own = e1[:, copy.layer, copy.head] - e0[:, copy.layer, copy.head]
    later = (e1[:, copy.layer + 1 :] - e0[:, copy.layer + 1 :]).abs().mean((1, 2))
    return d_loss, kl, own, later


@pytest.mark.parametrize("family", ["llama_gqa", "bloom"])
def test_several_heads_per_pass_equal_one_head_per_pass(tiny, sel, meas, family):
    model, layout = tiny(family)
    ref = estimate_reference_norms(model, sel)
    copies = _copies(ref, [(0, 0), (1, 2), (0, 3), (1, 1)])
    many = copy_effects(model, meas, copies, max_rows=4 * len(copies))  # every copy in one pass
    one = copy_effects(model, meas, copies, max_rows=meas.shape[0], skip_layers=False)  # one per pass
    assert many.n_passes == 2 and one.n_passes == 1 + len(copies)
    assert many.skipped == skip_support(model)[0] and many.skipped == (family != "bloom")
    for name in ("delta_loss", "kl", "own_delta_entropy", "later_abs_delta_entropy"):
        a, b = getattr(many, name), getattr(one, name)
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.allclose(a.nan_to_num(), b.nan_to_num(), atol=1e-6, rtol=1e-5), name
    for i in (0, 4, 8):  # against plain forward passes, without the engine
        d_loss, kl, own, later = _one_by_one(model, layout, meas, copies[i])
        assert torch.allclose(many.delta_loss[i], d_loss, atol=1e-5)
        assert torch.allclose(many.kl[i], kl, atol=1e-6)
        assert torch.allclose(many.own_delta_entropy[i], own, atol=1e-5)
        if copies[i].layer + 1 < layout.n_layers:
            assert torch.allclose(many.later_abs_delta_entropy[i], later, atol=1e-5)
    assert (many.kl >= 0).all() and (many.kl[[0, 1, 2]] > 0).all()
    assert many.later_abs_delta_entropy[[3, 4, 5]].isnan().all()  # layer 1 is the last layer
    assert count_hooks(model) == 0


def test_kl_is_nonnegative_and_zero_without_change(tiny, meas):
    model, layout = tiny("gemma2")
    copies = [Copy(("same", 1, 0), 1, 0, QueryScale(1, 0, 1.0)), Copy(("x", 0, 2), 0, 2, QueryScale(0, 2, 2.0))]
    got = copy_effects(model, meas, copies)
    assert (got.kl >= 0).all()
    assert got.kl[0].abs().max() < 1e-9 and got.delta_loss[0].abs().max() < 1e-6
    assert got.kl[1].min() > 1e-7


def test_row_blocks_touch_only_their_rows(tiny, meas):
    model, layout = tiny("llama_gqa")
    rows = RowBlocks(((QueryScale(1, 0, 3.0), 0, 4), (ZReplace(1, 1, torch.zeros(layout.d_head)), 4, 8)))
    with torch.no_grad():
        with attached(model, rows, layout=layout):
            both = model(meas.repeat(2, 1), return_type="logits")
        with attached(model, QueryScale(1, 0, 3.0), layout=layout):
            a = model(meas, return_type="logits")
        with attached(model, ZReplace(1, 1, torch.zeros(layout.d_head)), layout=layout):
            b = model(meas, return_type="logits")
    assert torch.allclose(both[:4], a, atol=1e-5) and torch.allclose(both[4:], b, atol=1e-5)
    with pytest.raises(SpectraError, match="outside the batch"):
        with torch.no_grad(), attached(model, RowBlocks(((QueryScale(1, 0, 3.0), 0, 9),)), layout=layout):
            model(meas, return_type=None)


def test_intervals_resample_documents_not_sequences(tiny):
    """Two documents, three identical sequences each: resampling documents gives the interval
    [smaller document mean, larger document mean] (both ends have probability 1/4); resampling
    sequences (or tokens) would give a narrower one."""
    model, layout = tiny("llama_gqa")
    g = torch.Generator().manual_seed(5)
    two = torch.randint(1, 97, (2, T), generator=g)
    tokens = two.repeat_interleave(3, dim=0)
    docs = [0, 0, 0, 1, 1, 1]
    copies = [Copy(("x", 0, 1), 0, 1, QueryScale(0, 1, 2.0))]
    eff = copy_effects(model, tokens, copies)
    per_doc = eff.kl[0].reshape(2, 3)
    assert torch.allclose(per_doc, per_doc[:, :1].expand(2, 3), atol=1e-9)
    lo_doc, hi_doc = float(per_doc[:, 0].min()), float(per_doc[:, 0].max())
    assert hi_doc - lo_doc > 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallClusterWarning)
        by_doc = effect_frame(eff, docs, n_boot=4000).iloc[0]
        by_seq = effect_frame(eff, None, n_boot=4000).iloc[0]
    assert by_doc["kl_ci_low"] == pytest.approx(lo_doc, abs=1e-12)
    assert by_doc["kl_ci_high"] == pytest.approx(hi_doc, abs=1e-12)
    assert by_seq["kl_ci_low"] > lo_doc + 0.05 * (hi_doc - lo_doc)
    assert by_seq["kl_ci_high"] < hi_doc - 0.05 * (hi_doc - lo_doc)
    assert by_doc["kl"] == pytest.approx(float(eff.kl[0].mean()))


def test_bad_input_is_refused(tiny, meas):
    model, layout = tiny("llama_gqa")
    with pytest.raises(SpectraError, match="positive"):
        NormReplace(0, 0, torch.tensor([1.0, -1.0])).hooks(layout)
    with pytest.raises(SpectraError, match="expected"):
        with torch.no_grad(), attached(model, NormReplace(0, 0, torch.ones(3)), layout=layout):
            model(meas, return_type=None)
    with pytest.raises(SpectraError, match="d_head"):
        ZReplace(0, 0, torch.zeros(3)).hooks(layout)
    with pytest.raises(SpectraError, match="at least one"):
        copy_effects(model, meas, [])
    assert count_hooks(model) == 0
    assert math.isfinite(float(np.float64(1.0)))

"""spectra_lens.metrics against answers computed by hand, and the theorems as property tests."""

import math

import pytest
import torch

from spectra_lens import metrics as M
from spectra_lens.errors import SpectraError

SEEDS = range(40)


def _hand_entropy(p: torch.Tensor) -> torch.Tensor:
    """-sum_j p_j log p_j with 0 log 0 = 0, written out."""
    p = p.double()
    terms = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0)
    return -terms.sum(-1)


def _random_scores(seed: int, *, rows: int = 6, n: int = 9, scale: float = 3.0):
    """(scores [rows, n] float64, causal visibility [rows, n]): rows are query positions."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, n, generator=g, dtype=torch.float64) * scale
    visible = M.causal_mask(rows, n)
    return s, visible


# --------------------------------------------------------------------------- hand-computed values


@pytest.mark.parametrize("n", [1, 2, 5, 17])
def test_uniform_entropy_is_log_n(n):
    p = torch.full((n,), 1.0 / n)
    assert M.entropy(p).item() == pytest.approx(math.log(n), abs=1e-6)
    assert M.k_eff_exp(M.entropy(p)).item() == pytest.approx(n, rel=1e-5)
    assert M.k_eff_participation(p).item() == pytest.approx(n, rel=1e-5)
    assert M.max_attention(p).item() == pytest.approx(1.0 / n)


def test_uniform_over_visible_keys_with_masked_zeros():
    # Three visible keys, two masked (p = 0): entropy log 3, masked keys contribute nothing.
    p = torch.tensor([1 / 3, 0.0, 1 / 3, 0.0, 1 / 3])
    assert M.entropy(p).item() == pytest.approx(math.log(3), abs=1e-6)
    normalized = M.normalized_entropy(M.entropy(p), torch.tensor(3.0))
    assert normalized.item() == pytest.approx(1.0, abs=1e-6)


def test_one_hot_entropy_is_zero():
    p = torch.zeros(2, 7)
    p[0, 3] = 1.0
    p[1, 0] = 1.0
    assert torch.equal(M.entropy(p), torch.zeros(2))
    assert torch.equal(M.max_attention(p), torch.ones(2))
    assert torch.equal(M.k_eff_exp(M.entropy(p)), torch.ones(2))
    assert torch.equal(M.k_eff_participation(p), torch.ones(2))
    assert torch.equal(M.k_eff_top_mass(p), torch.ones(2))
    assert torch.equal(M.sink_mass(p), torch.tensor([0.0, 1.0]))


def test_k_eff_definitions_on_a_worked_example():
    p = torch.tensor([0.1, 0.5, 0.1, 0.3])  # sorted: 0.5, 0.3, 0.1, 0.1
    H = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 2 * 0.1 * math.log(0.1))
    assert M.entropy(p).item() == pytest.approx(H, abs=1e-6)
    assert M.k_eff_exp(M.entropy(p)).item() == pytest.approx(math.exp(H), rel=1e-6)
    # sum p^2 = 0.25 + 0.09 + 0.01 + 0.01 = 0.36
    assert M.k_eff_participation(p).item() == pytest.approx(1 / 0.36, rel=1e-6)
    # 0.5 + 0.3 + 0.1 = 0.9 reaches the 90% mass (float rounding must not push it to 4)
    assert M.k_eff_top_mass(p).item() == 3
    assert M.k_eff_top_mass(p, mass=0.5).item() == 1
    assert M.k_eff_top_mass(p, mass=0.8).item() == 2
    assert M.k_eff_top_mass(p, mass=0.81).item() == 3
    assert M.k_eff_top_mass(p, mass=1.0).item() == 4
    assert set(M.K_EFF_DEFINITIONS) == {"k_eff_exp", "k_eff_pr", "k_eff_top90"}


@pytest.mark.parametrize("mass", [0.0, -0.1, 1.5, float("nan")])
def test_k_eff_top_mass_rejects_bad_mass(mass):
    with pytest.raises(SpectraError, match="mass must be in"):
        M.k_eff_top_mass(torch.tensor([0.5, 0.5]), mass=mass)


def test_normalized_entropy_is_nan_at_one_key():
    H = torch.tensor([0.0, math.log(2), 0.5 * math.log(4)])
    n = torch.tensor([1.0, 2.0, 4.0])
    out = M.normalized_entropy(H, n)
    assert torch.isnan(out[0])
    assert out[1].item() == pytest.approx(1.0)
    assert out[2].item() == pytest.approx(0.5)


def test_sink_norm_mask_helpers():
    assert torch.equal(M.causal_mask(3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]]).bool())
    # queries aligned to the end of a longer key axis
    assert torch.equal(M.causal_mask(2, 4), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool())
    assert torch.equal(M.n_visible(M.causal_mask(3)), torch.tensor([1.0, 2.0, 3.0]))
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.equal(M.vector_norm(x), torch.tensor([5.0, 0.0]))
    p = torch.tensor([[0.7, 0.2, 0.1]])
    assert M.sink_mass(p).item() == pytest.approx(0.7)


# --------------------------------------------------------------------------- entropy from scores


@pytest.mark.parametrize("fill", [float("-inf"), "finfo_min"])
@pytest.mark.parametrize("alpha", [1.0, 0.3, 2.5])
def test_entropy_from_scores_equals_entropy_of_softmax(fill, alpha):
    for seed in range(10):
        s, visible = _random_scores(seed)
        s = s.float()
        value = torch.finfo(s.dtype).min if fill == "finfo_min" else fill
        masked = s.masked_fill(~visible, value)
        p = torch.softmax((alpha * s).masked_fill(~visible, float("-inf")), -1)
        expected = _hand_entropy(p)
        # the mask recovered from the fill value, and the mask given explicitly
        got = M.entropy_from_scores(masked, alpha=alpha)
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
        got = M.entropy_from_scores(s, visible, alpha=alpha)
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
        assert got.dtype == torch.float32


def test_masked_scores_contribute_nothing():
    s, visible = _random_scores(0, rows=8, n=8)
    garbage = torch.randn(s.shape, dtype=s.dtype, generator=torch.Generator().manual_seed(9)) * 100
    s2 = torch.where(visible, s, garbage)
    torch.testing.assert_close(
        M.entropy_from_scores(s, visible), M.entropy_from_scores(s2, visible)
    )
    torch.testing.assert_close(M.local_gain(s, visible), M.local_gain(s2, visible))
    # the first query sees one key: entropy 0, gain 0
    assert M.entropy_from_scores(s, visible)[0].item() == 0.0
    assert M.local_gain(s, visible)[0].item() == 0.0


def test_visible_from_scores_recognises_both_mask_conventions():
    s = torch.tensor([0.5, -3.0, float("-inf"), torch.finfo(torch.float32).min, -1e30])
    assert M.visible_from_scores(s).tolist() == [True, True, False, False, True]


# --------------------------------------------------------------------------- local gain


def _var_p(s: torch.Tensor, visible: torch.Tensor, alpha: float) -> torch.Tensor:
    p = torch.softmax((alpha * s).masked_fill(~visible, float("-inf")), -1)
    s0 = s.masked_fill(~visible, 0.0)
    mean = (p * s0).sum(-1, keepdim=True)
    return (p * (s0 - mean) ** 2).sum(-1)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_local_gain_matches_central_finite_difference_in_log_alpha(alpha):
    h = 1e-4
    for seed in range(10):
        s, visible = _random_scores(seed)  # float64: the finite difference needs the precision
        plus = M.entropy_from_scores(s, visible, alpha=alpha * math.exp(h))
        minus = M.entropy_from_scores(s, visible, alpha=alpha * math.exp(-h))
        fd = (plus - minus) / (2 * h)
        gain = M.local_gain(s, visible, alpha=alpha)
        torch.testing.assert_close(gain, fd, atol=1e-6, rtol=1e-5)
        # and the closed form -alpha^2 Var_p(s)
        closed_form = -(alpha**2) * _var_p(s, visible, alpha)
        torch.testing.assert_close(gain, closed_form, atol=1e-10, rtol=1e-8)


def test_local_gain_from_the_pattern_alone():
    # log p = s - log Z: a per-row shift, which the variance ignores; masked keys are -inf.
    for seed in range(10):
        s, visible = _random_scores(seed)
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)
        torch.testing.assert_close(
            M.local_gain(M.logits_from_pattern(p)), M.local_gain(s, visible), atol=1e-10, rtol=1e-8
        )


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_return_float32(dtype):
    s, visible = _random_scores(3)
    s = s.to(dtype)
    p = torch.softmax(s.float().masked_fill(~visible, float("-inf")), -1).to(dtype)
    H = M.entropy(p)
    outs = {
        "entropy": H,
        "entropy_from_scores": M.entropy_from_scores(s.masked_fill(~visible, float("-inf"))),
        "normalized_entropy": M.normalized_entropy(H.to(dtype), M.n_visible(visible)),
        "max_attention": M.max_attention(p),
        "k_eff_exp": M.k_eff_exp(H.to(dtype)),
        "k_eff_participation": M.k_eff_participation(p),
        "k_eff_top_mass": M.k_eff_top_mass(p),
        "sink_mass": M.sink_mass(p),
        "vector_norm": M.vector_norm(s),
        "local_gain": M.local_gain(s, visible),
        "logits_from_pattern": M.logits_from_pattern(p),
        "rescale_pattern": M.rescale_pattern(p, 2.0),
    }
    for name, out in outs.items():
        assert out.dtype == torch.float32, name
    torch.testing.assert_close(H, _hand_entropy(p.float()).float(), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- theorems


ALPHAS = [0.1, 0.25, 0.5, 0.8, 1.0, 1.3, 2.0, 3.0, 5.0, 10.0]


def test_entropy_non_increasing_max_attn_and_top_k_mass_non_decreasing_in_alpha():
    for seed in SEEDS:
        s, visible = _random_scores(seed, scale=0.5 + seed % 5)
        Hs, maxes, tops = [], [], []
        for a in ALPHAS:
            p = torch.softmax((a * s).masked_fill(~visible, float("-inf")), -1)
            Hs.append(M.entropy_from_scores(s, visible, alpha=a).double())
            maxes.append(M.max_attention(p))
            tops.append(p.sort(-1, descending=True).values.cumsum(-1))  # top-k mass, every k
        for i in range(len(ALPHAS) - 1):
            assert (Hs[i + 1] <= Hs[i] + 1e-9).all(), (seed, ALPHAS[i])
            assert (maxes[i + 1] >= maxes[i] - 1e-12).all(), (seed, ALPHAS[i])
            assert (tops[i + 1] >= tops[i] - 1e-12).all(), (seed, ALPHAS[i])
            # the local gain is the slope: never positive
            assert (M.local_gain(s, visible, alpha=ALPHAS[i]) <= 0).all()


def test_rescale_pattern_equals_softmax_of_scaled_scores():
    for seed in SEEDS:
        s, visible = _random_scores(seed, scale=2.0)
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)
        for a in (0.2, 0.7, 1.0, 1.9, 4.0):
            expected = torch.softmax((a * s).masked_fill(~visible, float("-inf")), -1)
            got = M.rescale_pattern(p, a).double()
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_rescale_pattern_rejects_bad_alpha(alpha):
    with pytest.raises(SpectraError, match="alpha must be finite and > 0"):
        M.rescale_pattern(torch.tensor([0.5, 0.5]), alpha)


def test_local_gain_under_own_pattern_equals_local_gain():
    from spectra_lens.metrics import causal_mask, local_gain, local_gain_under

    scores = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(4))
    visible = causal_mask(6).expand(3, 6, 6)
    p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    expected = local_gain(scores, visible)
    torch.testing.assert_close(local_gain_under(p, scores, visible), expected)
    # Any per-row shift of the scores, e.g. log p, gives the same variance.
    torch.testing.assert_close(local_gain_under(p, torch.log(p), visible), expected, atol=1e-5, rtol=1e-5)

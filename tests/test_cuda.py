"""CUDA checks (`pytest -m cuda`; skipped without a CUDA device; `bench/gpu_check.sh` runs them):
the capture on the GPU equals hook_pattern-derived metrics and the CPU capture, the fast path
equals the exact mode on the GPU, and a bf16 / fp16 model gives metrics within tolerance of
float32."""

import pytest
import torch
from torch.testing import assert_close

from spectra_lens import metrics as M
from spectra_lens.capture import METRIC_NAMES, MetricCapture, attached, capture_metrics
from spectra_lens.kernels import blocked as KB
from spectra_lens.layout import attention_layout, hook_name
from spectra_lens.models import bridge_from_hf
from spectra_lens.sweep import head_curves
from spectra_lens.testing import tiny_hf_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ALPHAS = (0.5, 1.0, 2.0)


def _bridge(family="llama_gqa", dtype=torch.float32):
    return bridge_from_hf(tiny_hf_model(family).to(device="cuda", dtype=dtype))


def _tokens(n=96, batch=2):
    return torch.randint(0, 97, (batch, n), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "qwen3"])
def test_gpu_capture_equals_hook_pattern_and_the_cpu_capture(family):
    model = _bridge(family)
    x = _tokens().cuda()
    with torch.no_grad():
        _, cache = model.run_with_cache(x)
    tm = capture_metrics(model, x)
    assert tm.entropy.device.type == "cuda"
    for l in range(model.cfg.n_layers):
        p = cache[hook_name(l, "pattern")]
        assert_close(tm.entropy[:, l].double(), M.entropy(p).double(), atol=1e-5, rtol=0)
        assert_close(tm.max_attn[:, l], M.max_attention(p), atol=1e-5, rtol=0)
        assert_close(tm.k_eff_top90[:, l], M.k_eff_top_mass(p), atol=0, rtol=0)
    # the device kernel (torch: topk, then sorts) equals the CPU kernel (NumPy) on the same pattern
    p, s = cache[hook_name(0, "pattern")], cache[hook_name(0, "attn_scores")]
    gpu = KB.row_metrics(p, s)
    cpu = KB.row_metrics(p.cpu(), s.cpu())
    for name in gpu:
        assert_close(gpu[name].cpu(), cpu[name], atol=1e-5, rtol=1e-5, equal_nan=True, msg=name)


def test_gpu_fast_path_equals_exact_mode():
    model = _bridge()
    x = _tokens(48)
    fast = head_curves(model, x, ALPHAS, method="fast")
    exact = head_curves(model, x, ALPHAS, method="exact")
    for name in ("entropy", "max_attn", "k_eff_exp", "k_eff_pr", "k_eff_top90"):
        assert_close(fast.metrics.metric(name), exact.metrics.metric(name), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_metrics_are_float32_and_close_to_float32(dtype):
    x = _tokens().cuda()
    ref = capture_metrics(_bridge(), x)
    half = capture_metrics(_bridge(dtype=dtype), x)
    for name in METRIC_NAMES:
        got = getattr(half, name)
        assert got.dtype == torch.float32
    # half-precision weights change the pattern itself; the metrics follow within a few percent
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    for name in ("entropy", "max_attn", "sink_mass"):
        assert_close(getattr(half, name), getattr(ref, name), atol=tol, rtol=tol)


def test_gpu_pass_ended_at_the_last_pattern_equals_a_whole_pass():
    """MetricCapture.run ends the pass at the last layer's pattern; on the GPU too its metrics
    equal those of a whole forward pass, and its per-pass tensors live on the model's device."""
    model = _bridge()
    layout = attention_layout(model)
    x = _tokens().cuda()
    cap = MetricCapture(layout)
    short = cap.run(model, x)
    with torch.no_grad(), attached(model, cap, layout=layout):
        model(x, return_type="logits")
    full = cap.result()
    for name in METRIC_NAMES:
        assert short.metric(name).device.type == "cuda"
        assert_close(short.metric(name), full.metric(name), rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_precision_layout_of_a_sharp_model(dtype):
    """The layout probes compare half-precision patterns to the dtype's precision on the GPU too:
    a tiny Llama with sharp attention is faithful and bilinear, so the gain takes the fast path."""
    hf = tiny_hf_model("llama_gqa")
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight *= 8
    layout = attention_layout(bridge_from_hf(hf.to(device="cuda", dtype=dtype)))
    assert layout.scores_faithful
    assert all(layout.q_bilinear) and all(layout.k_bilinear)

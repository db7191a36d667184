"""Peak memory of one configuration, measured in a fresh process: `python -m bench.memory JSON`.

Prints one JSON line. On CPU the peak is the process's resident-set high-water mark (VmHWM),
reset after the model is loaded (`/proc/self/clear_refs`, Linux >= 4.0) so that the transient
peak of loading does not mask the forward pass; where the reset is unavailable it falls back to
`ru_maxrss` (peak since the process started) and says so. On CUDA it is
`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`.

Kinds: "hf" (bare Hugging Face forward), "bridge" (TransformerBridge forward, no hooks),
"capture" (the observational pass: MetricCapture on every head inside `attached` over a
whole forward pass, then `result()`), "observe_pass" (the same as `observe` runs it,
`MetricCapture.run`: the pass ends at the last layer's pattern), "collect" (`experiments.observational.collect` streaming `n_sequences` through
batches and per-shard Parquet files, exactly as the observational experiment does),
"analysis" (reading `moments_dir`'s shard files and the statistics, `bench.analysis.analyze`;
no model).
"""

import ctypes
import gc
import json
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


def _release_free_memory() -> None:
    gc.collect()
    try:  # glibc keeps freed heap pages; give them back so the baseline is what is live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak(device: torch.device) -> str:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda max_memory_allocated"
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM (peak RSS, reset after loading)"
    except OSError:
        return "ru_maxrss (peak RSS since process start, loading included)"


def _current(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    kib = _status_kib("VmRSS")
    return 1024 * kib if kib is not None else 0


def _peak(device: torch.device, how: str) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    if how.startswith("VmHWM"):
        return 1024 * _status_kib("VmHWM")
    return 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def measure_analysis(spec: dict) -> dict:
    """Peak RSS of reading a run's moment files and computing its statistics (no model)."""
    from bench.analysis import analyze

    paths = sorted(Path(spec["moments_dir"]).glob("shard_*.npz"))
    tiny = spec.get("warmup_dir")
    if tiny:  # imports and first-call set-up belong to the baseline, not to the analysis
        analyze(sorted(Path(tiny).glob("shard_*.npz")), n_boot=2)
    _release_free_memory()
    baseline = _current(torch.device("cpu"))
    how = _reset_peak(torch.device("cpu"))
    t0 = time.perf_counter()
    info = analyze(paths, n_boot=spec.get("n_boot", 1000))
    work_s = time.perf_counter() - t0
    peak = _peak(torch.device("cpu"), how)
    return {**spec, **info, "device": "cpu", "baseline_bytes": baseline, "peak_bytes": peak,
            "peak_over_baseline_bytes": max(0, peak - baseline), "measure": how,
            "work_s": round(work_s, 2), "reps": 1}


def measure(spec: dict) -> dict:
    if spec["kind"] == "analysis":
        return measure_analysis(spec)
    from spectra_lens.data.corpus import default_corpus, tokenize_documents
    from spectra_lens.data.prepare import prepare
    from spectra_lens.models import load_hf, load_model, load_tokenizer, resolve_device

    device = resolve_device(spec.get("device"))
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    kind, batch, seq_len = spec["kind"], spec["batch"], spec["seq_len"]
    n_seq = spec.get("n_sequences", batch)
    reps = spec.get("reps", 2)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer()
    tokens = tokenize_documents(default_corpus(), tokenizer, seq_len=seq_len, max_sequences=n_seq,
                                packing="stream").tokens
    if kind == "hf":
        model, _ = load_hf(device=device)
    else:
        model = load_model(device=device)
    load_s = time.perf_counter() - t0

    tmp = None
    if kind == "hf":
        x = tokens[:batch].to(device)

        def work():
            model(x, use_cache=False)
    elif kind == "bridge":
        x = tokens[:batch].to(device)

        def work():
            model(x, return_type=None)
    elif kind == "capture":
        from spectra_lens.capture import MetricCapture, attached
        from spectra_lens.layout import attention_layout

        layout = attention_layout(model)
        cap = MetricCapture(layout)
        x = tokens[:batch].to(device)

        def work():
            with attached(model, cap, layout=layout):
                model(x, return_type=None)
            cap.result()
    elif kind == "observe_pass":  # as `observe` runs it: the pass ends at the last layer's pattern
        from spectra_lens.capture import MetricCapture
        from spectra_lens.layout import attention_layout

        layout = attention_layout(model)
        cap = MetricCapture(layout)
        x = tokens[:batch].to(device)

        def work():
            cap.run(model, x, layout=layout)
    elif kind == "collect":
        from spectra_lens.experiments.observational import collect

        from spectra_lens.layout import attention_layout
        from spectra_lens.runs.rundir import RunDir

        attention_layout(model)  # the probe pass belongs to loading, not to the corpus
        tmp = tempfile.TemporaryDirectory(prefix="spectra-bench-")
        manifest = prepare(default_corpus(), tokenizer, Path(tmp.name) / "shards",
                                seq_len=seq_len, n_sequences=n_seq, shard_size=spec["shard_size"])
        reps = 1

        def work():
            run = RunDir(Path(tmp.name) / "run", "observational")
            run.start({"bench": "memory"}, overwrite=True)  # outputs are listed once started
            collect(model, manifest, run, batch_size=batch, progress=False)
    else:
        raise SystemExit(f"unknown kind {kind!r}; expected hf, bridge, capture, observe_pass, collect or analysis")

    # One untimed call first: safetensors weights are memory-mapped and only become resident
    # when a forward pass touches them, and the first call sets up caches; the baseline is the
    # steady state with the model resident.
    with torch.no_grad():
        if kind == "collect":
            model(tokens[:batch].to(device), return_type=None)
        else:
            work()
    _release_free_memory()
    baseline = _current(device)
    how = _reset_peak(device)
    t1 = time.perf_counter()
    with torch.no_grad():
        for _ in range(reps):
            work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    work_s = time.perf_counter() - t1
    peak = _peak(device, how)
    if tmp is not None:
        tmp.cleanup()
    return {
        **spec,
        "device": str(device),
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "peak_over_baseline_bytes": max(0, peak - baseline),
        "measure": how,
        "load_s": round(load_s, 2),
        "work_s": round(work_s, 2),
        "reps": reps,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.memory '{\"kind\": \"capture\", \"batch\": 8, \"seq_len\": 128}'",
              file=sys.stderr)
        return 2
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    print(json.dumps(measure(json.loads(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run the benchmarks: `python -m bench.run [--quick] [--only SECTION ...] [--device DEV]`.

Sections (each one's variants are interleaved repetition by repetition; medians; ratios are
medians of the per-repetition ratios, all measured in this run):

  overhead  the observational pass (MetricCapture on every head, every metric, in `attached`;
            and as `observe` runs it, ending at the last layer's pattern)
            ÷ the bridge's forward without hooks, ÷ the bare Hugging Face forward; the target
            pair (capture ÷ bridge) also timed close together, each call after one of its own
            kind (`adjacent`)
  memory    peak memory of capture vs bare forwards (fresh subprocess each) and of
            `experiments.observational.collect` over 1×, 2×, 4× the sequences
  gain      `sweep.head_curves` (every head × 21 α) ÷ one bare forward; the naive method (one
            hooked forward per head per α) timed on a subset of heads and extrapolated
  exact     `sweep.intervention_effects` with the α grid batched (one forward, batch repeated per α) vs
            one forward per α, for 5 and 9 α values
  scaling   bare forward vs capture over sequence length (128 to 4096 tokens) and batch size;
            tokens per second
  analysis  the observational statistics from per-document moments at the default run's size
            (`bench.analysis`): seconds, and peak memory (fresh subprocess each) for 4× the
            tokens and 4× the documents

Full run: bench/results.json and BENCHMARKS.md. `--quick` or `--only`: bench/results-quick.json
(or --out), and no markdown unless --markdown is given. `--only SECTION ... --merge`: replace
those sections in bench/results.json (or --out) and re-render BENCHMARKS.md; every section
records the command, start time and machine load of the run that measured it.
"""

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("overhead", "memory", "gain", "exact", "scaling", "analysis")

# Workload sizes. Full: sized for ~10 minutes on 2 unloaded CPU cores; quick: a smoke test.
_FULL = {
    # the observational experiment's batch; `pairs`: quads of the target pair (`adjacent`)
    "overhead": dict(batch=8, seq_len=128, reps=9, pairs=20),
    # 1× = 2 shards: one shard's records are concatenated and written before the allocators
    # settle, so the comparison starts from the steady state of the streaming loop.
    "memory": dict(batch=8, seq_len=128, shard_size=16, corpus_multiples=(1, 2, 4), base_sequences=32,
                   procs=3),
    "gain": dict(batch=4, seq_len=128, reps=5, naive_heads=((0, 0), (29, 8))),
    "exact": dict(batch=2, seq_len=128, reps=3, head=(15, 0), n_alphas=(5, 9)),
    "scaling": dict(
        seq_lens=(128, 512, 1024, 2048, 4096), seq_batch=1, seq_reps=(3, 2, 2, 1, 1),
        batch_sizes=(1, 4, 8), batch_seq_len=128, batch_reps=(3, 2, 2),
    ),
    # The observational run's defaults: 256 sequences × 128 tokens, shards of 32, batches of 8.
    "analysis": dict(n_sequences=256, seq_len=128, shard_size=32, batch=8, multiple=4,
                     n_boot=1000, reps=3),
}
_QUICK = {
    "overhead": dict(batch=2, seq_len=64, reps=3, pairs=2),
    "memory": dict(batch=2, seq_len=64, shard_size=2, corpus_multiples=(1, 4), base_sequences=4),
    "gain": dict(batch=1, seq_len=64, reps=2, naive_heads=((15, 0),)),
    "exact": dict(batch=1, seq_len=64, reps=2, head=(15, 0), n_alphas=(5, 9)),
    "scaling": dict(
        seq_lens=(64, 256), seq_batch=1, seq_reps=(2, 2),
        batch_sizes=(1, 4), batch_seq_len=64, batch_reps=(2, 2),
    ),
    "analysis": dict(n_sequences=32, seq_len=32, shard_size=8, batch=8, multiple=4,
                     n_boot=100, reps=2),
}
# Issue-12 targets (benchmarks, not tests).
LIMITS = {"overhead": 1.10, "long": 1.5, "long_seq_len": 2048, "memory": 1.2, "gain": 1.5,
          "analysis_s": 5.0, "analysis_memory": 1.05}
# Exact-mode grids leave out α = 1 (intervention_effects reuses the unscaled pass there), so that
# "n α values" means n scaled rows per sequence.
_EXACT_GRIDS = {
    5: (0.5, 0.75, 1.25, 1.5, 2.0),
    9: (0.5, 0.625, 0.75, 0.875, 1.125, 1.25, 1.5, 1.75, 2.0),
}

log = logging.getLogger("bench")


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine(device: torch.device) -> dict:
    from spectra_lens.runs.rundir import package_versions

    out = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "versions": package_versions(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out["gpu"] = props.name
        out["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        out["cuda"] = torch.version.cuda
    return out


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call, synchronized on CUDA."""
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    with torch.no_grad():
        fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


class Times:
    """Wall and CPU seconds per call of each variant; `times[name]` is the wall-clock list."""

    def __init__(self, names, *, track_cpu: bool = True):
        self.wall: dict[str, list[float]] = {n: [] for n in names}
        self.cpu: dict[str, list[float]] = {n: [] for n in names}
        self.track_cpu = track_cpu  # host CPU time says nothing about work queued on a GPU

    def __getitem__(self, name: str) -> list[float]:
        return self.wall[name]

    def add(self, name: str, wall_cpu: tuple[float, float]) -> None:
        self.wall[name].append(wall_cpu[0])
        if self.track_cpu:
            self.cpu[name].append(wall_cpu[1])

    def __iter__(self):
        return iter(self.wall)


def interleave(variants: dict[str, Callable[[], object]], reps: int, device: torch.device, *,
               warmup: bool = True, label: str = "") -> Times:
    """Seconds per call of each variant; repetition r runs every variant once, the order rotated
    by r so that no variant always runs first (or right after the same neighbour)."""
    names = list(variants)
    if warmup:
        for n in names:
            _timed(variants[n], device)
    times = Times(names, track_cpu=device.type == "cpu")
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            times.add(n, _timed(variants[n], device))
        la = _loadavg()
        if la:
            _LOAD_SAMPLES.append(la[0])
        log.info("%s rep %d/%d (load %s): %s", label, r + 1, reps, f"{la[0]:.1f}" if la else "?",
                 ", ".join(f"{n}={times[n][-1]:.2f}s" for n in names))
    return times


_LOAD_SAMPLES: list[float] = []  # 1-minute load average at the end of every repetition


def adjacent(num: Callable[[], object], den: Callable[[], object], quads: int,
             device: torch.device, *, label: str = "") -> dict:
    """num ÷ den timed close together: quad r runs den, den, num, num (r even) or num, num, den,
    den (r odd) and times only the second call of each kind, so each timed call follows a call
    of its own kind (no carry-over from the other variant: garbage, allocator state) and no
    other workload runs between the two. The even and odd quads swap the order, so a drift of
    the machine's speed tilts them opposite ways; the value is the median over quads of
    (timed num ÷ timed den). `interleave` puts the other variants of a section between them."""
    pairs, cpu_pairs = [], []
    for r in range(quads):
        got = {}
        for who in (("d", "n") if r % 2 == 0 else ("n", "d")):
            fn = num if who == "n" else den
            _timed(fn, device)  # the washout call
            got[who] = _timed(fn, device)
        pairs.append(got["n"][0] / got["d"][0])
        if device.type == "cpu" and got["d"][1] > 0:
            cpu_pairs.append(got["n"][1] / got["d"][1])
        la = _loadavg()
        if la:
            _LOAD_SAMPLES.append(la[0])
        log.info("%s quad %d/%d (load %s): %.3f", label, r + 1, quads, f"{la[0]:.1f}" if la else "?",
                 pairs[-1])
    return {"value": statistics.median(pairs),
            "cpu_value": statistics.median(cpu_pairs) if cpu_pairs else None,
            "per_quad": pairs, "quads": quads}


def _summary(times: Times, name: str, tokens: int | None = None) -> dict:
    ts, cs = times.wall[name], times.cpu[name]
    med = statistics.median(ts)
    out = {"median_s": med, "min_s": min(ts), "max_s": max(ts), "times_s": ts, "reps": len(ts),
           "cpu_median_s": statistics.median(cs) if cs else None, "cpu_times_s": cs}
    if tokens:
        out["tokens"] = tokens
        out["tokens_per_s"] = tokens / med
    return out


def _ratio(times: Times, num: str, den: str) -> dict:
    """Median of per-repetition ratios (paired: same repetition, same load), the ratio of
    medians, and the same paired ratio of process CPU time (steadier when others load the CPU
    and intra-op threads wait for each other; meaningless on CUDA)."""
    pairs = [a / b for a, b in zip(times.wall[num], times.wall[den])]
    cpu_pairs = [a / b for a, b in zip(times.cpu[num], times.cpu[den]) if b > 0]
    return {
        "value": statistics.median(pairs),
        "ratio_of_medians": statistics.median(times.wall[num]) / statistics.median(times.wall[den]),
        "cpu_value": statistics.median(cpu_pairs) if cpu_pairs else None,
        "per_rep": pairs,
        "of": f"{num} / {den}",
    }


def _target(name: str, value: float, limit: float, *, cpu_value: float | None = None,
            note: str = "") -> dict:
    """`met` judges the wall-clock (or memory) value; `cpu_value` is the CPU-time ratio beside it."""
    return {"name": name, "value": value, "limit": limit, "met": bool(value <= limit),
            "cpu_value": cpu_value, "note": note}


def _time_target(name: str, ratio: dict, limit: float) -> dict:
    return _target(name, ratio["value"], limit, cpu_value=ratio["cpu_value"])


# --------------------------------------------------------------------------- workloads


class Bench:
    """Models and tokens shared by the sections of one run."""

    def __init__(self, device: torch.device, quick: bool):
        from spectra_lens.data.corpus import default_corpus
        from spectra_lens.layout import attention_layout
        from spectra_lens.models import load_hf, load_model

        self.device = device
        self.quick = quick
        t0 = time.perf_counter()
        self.model = load_model(device=device)
        self.layout = attention_layout(self.model)
        # The bridge rewires the HF model it wraps in place: the bare reference is its own copy.
        self.hf, _ = load_hf(device=device)
        self.load_s = time.perf_counter() - t0
        self._corpus = default_corpus()
        self._tokenizer = self.model.tokenizer
        self._tokens: dict[int, torch.Tensor] = {}

    def tokens(self, batch: int, seq_len: int) -> torch.Tensor:
        """`batch` sequences of `seq_len` tokens of the default corpus (pydoc topics)."""
        from spectra_lens.data.corpus import tokenize_documents

        have = self._tokens.get(seq_len)
        if have is None or have.shape[0] < batch:
            have = tokenize_documents(self._corpus, self._tokenizer, seq_len=seq_len,
                                      max_sequences=max(batch, 16), packing="stream").tokens
            self._tokens[seq_len] = have
        return have[:batch].to(self.device)

    # the callables timed below

    def hf_forward(self, x):
        return lambda: self.hf(x, use_cache=False)

    def bridge_forward(self, x):
        return lambda: self.model(x, return_type=None)

    def capture(self, x, *, records: bool = False, top90: bool = True, ended: bool = False):
        """The capture inside a whole forward pass (the like-for-like cost of the hooks), or with
        `ended` as `observe` runs it: `MetricCapture.run`, the pass ending at the last layer's
        pattern (no last MLP, no logits)."""
        from spectra_lens.capture import MetricCapture, attached

        # top_mass=None: the library's switch that skips k_eff_top90 (the sort of every row).
        cap = MetricCapture(self.layout, top_mass=0.9 if top90 else None)

        def run():
            if ended:
                tm = cap.run(self.model, x, layout=self.layout)
            else:
                with attached(self.model, cap, layout=self.layout):
                    self.model(x, return_type=None)
                tm = cap.result()
            if records:
                tm.to_frame()

        return run


_EXTRA_FLAGS: list[str] = []  # --threads / --device of this run, repeated in every command


def _cmd(section: str, quick: bool) -> str:
    return " ".join(["python -m bench.run --only", section] + (["--quick"] if quick else []) + _EXTRA_FLAGS)


# --------------------------------------------------------------------------- sections


def section_overhead(b: Bench, cfg: dict) -> dict:
    x = b.tokens(cfg["batch"], cfg["seq_len"])
    n_tok = x.numel()
    variants = {
        "hf_forward": b.hf_forward(x),
        "bridge_forward": b.bridge_forward(x),
        "capture": b.capture(x),
        "capture_without_top90": b.capture(x, top90=False),
        "observe_pass": b.capture(x, ended=True),
        "observe_pass_and_records": b.capture(x, records=True, ended=True),
    }
    times = interleave(variants, cfg["reps"], b.device, label="overhead")
    # the target: the two variants timed close together (`adjacent`), not six variants apart
    pair = adjacent(variants["capture"], variants["bridge_forward"], cfg["pairs"], b.device,
                    label="overhead capture ÷ bridge")
    pair["of"] = "capture / bridge_forward, each timed after a call of its own kind"
    ratios = {
        "capture_vs_bridge_adjacent": pair,
        "capture_vs_bridge": _ratio(times, "capture", "bridge_forward"),
        "capture_vs_hf": _ratio(times, "capture", "hf_forward"),
        "bridge_vs_hf": _ratio(times, "bridge_forward", "hf_forward"),
        "capture_without_top90_vs_bridge": _ratio(times, "capture_without_top90", "bridge_forward"),
        "observe_pass_vs_bridge": _ratio(times, "observe_pass", "bridge_forward"),
        "observe_pass_vs_hf": _ratio(times, "observe_pass", "hf_forward"),
        "observe_pass_and_records_vs_bridge": _ratio(times, "observe_pass_and_records", "bridge_forward"),
    }

    def share(clock: dict[str, list[float]]) -> float | None:
        if not clock["capture"]:
            return None
        med = {n: statistics.median(clock[n]) for n in ("capture", "bridge_forward", "capture_without_top90")}
        extra = med["capture"] - med["bridge_forward"]
        return (med["capture"] - med["capture_without_top90"]) / extra if extra > 0 else None

    return {
        "workload": {"batch": cfg["batch"], "seq_len": cfg["seq_len"], "heads": b.layout.n_layers * b.layout.n_heads},
        "command": _cmd("overhead", b.quick),
        "variants": {n: _summary(times, n, n_tok) for n in times},
        "ratios": ratios,
        "top90_share_of_overhead": share(times.wall),
        "top90_share_of_overhead_cpu": share(times.cpu),
        "targets": [_time_target("capture ÷ hook-free bridge forward", pair, LIMITS["overhead"])],
    }


def _memory_child(spec: dict, env_extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-m", "bench.memory", json.dumps(spec)], cwd=ROOT,
                          capture_output=True, text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory child {spec} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1])
    log.info("memory %s: peak %.0f MiB (+%.0f MiB over loaded)", spec["kind"] + str(spec.get("n_sequences", "")),
             out["peak_bytes"] / 2**20, out["peak_over_baseline_bytes"] / 2**20)
    return out


_PIN = "MALLOC_MMAP_THRESHOLD_"


def _memory_median(spec: dict, procs: int, env_extra: dict | None = None) -> dict:
    """`spec` measured in `procs` fresh processes: the one with the median peak, with every
    process's peak and loaded bytes (the peak moves by tens of MiB from process to process)."""
    runs = sorted((_memory_child(spec, env_extra) for _ in range(procs)), key=lambda d: d["peak_bytes"])
    return {**runs[len(runs) // 2], "procs": procs, "peaks_bytes": [d["peak_bytes"] for d in runs],
            "baselines_bytes": [d["baseline_bytes"] for d in runs]}


def section_memory(b: Bench | None, cfg: dict, device: torch.device, quick: bool) -> dict:
    base = dict(batch=cfg["batch"], seq_len=cfg["seq_len"], device=str(device),
                threads=torch.get_num_threads())
    procs = cfg.get("procs", 1)
    single = {k: _memory_median({**base, "kind": k, "reps": 2}, procs)
              for k in ("hf", "bridge", "capture", "observe_pass")}
    # glibc raises its mmap threshold after large frees and then keeps freed heap pages, so the
    # RSS peak can overstate what is live. The same pair with the threshold pinned at 64 KiB
    # (big buffers always mmapped and returned at free) separates retention from live memory.
    pinned = {}
    if device.type == "cpu":
        pinned = {k: _memory_child({**base, "kind": k, "reps": 2}, {_PIN: "65536"})
                  for k in ("bridge", "capture")}
        # The same capture with the NumPy kernels: numba (imported when a compiled kernel first
        # runs) adds a fixed resident cost to the process, independent of model and batch.
        single["capture_numpy_kernels"] = _memory_median({**base, "kind": "capture", "reps": 2}, procs,
                                                         {"SPECTRA_LENS_NUMBA": "0"})
    growth = []
    for m in cfg["corpus_multiples"]:
        n = cfg["base_sequences"] * m
        growth.append({"multiple": m, **_memory_child(
            {**base, "kind": "collect", "n_sequences": n, "shard_size": cfg["shard_size"]})})
    ratios = {
        "capture_vs_bridge": single["capture"]["peak_bytes"] / single["bridge"]["peak_bytes"],
        "capture_vs_hf": single["capture"]["peak_bytes"] / single["hf"]["peak_bytes"],
        "observe_pass_vs_bridge": single["observe_pass"]["peak_bytes"] / single["bridge"]["peak_bytes"],
        "observe_pass_vs_hf": single["observe_pass"]["peak_bytes"] / single["hf"]["peak_bytes"],
        "capture_over_loaded_vs_bridge_over_loaded": (
            single["capture"]["peak_over_baseline_bytes"] / max(1, single["bridge"]["peak_over_baseline_bytes"])),
        "collect_largest_vs_bridge": growth[-1]["peak_bytes"] / single["bridge"]["peak_bytes"],
        "collect_largest_vs_smallest": growth[-1]["peak_bytes"] / growth[0]["peak_bytes"],
    }
    if pinned:
        ratios["capture_vs_bridge_pinned_mmap_threshold"] = (
            pinned["capture"]["peak_bytes"] / pinned["bridge"]["peak_bytes"])
    if "capture_numpy_kernels" in single:
        ratios["capture_numpy_kernels_vs_bridge"] = (
            single["capture_numpy_kernels"]["peak_bytes"] / single["bridge"]["peak_bytes"])
    return {
        "workload": {**base, "shard_size": cfg["shard_size"],
                     "collect_sequences": [g["n_sequences"] for g in growth]},
        "command": _cmd("memory", quick),
        "measure": single["capture"]["measure"],
        "single_batch": single,
        "single_batch_pinned_mmap_threshold": pinned,
        "pinned_env": f"{_PIN}=65536" if pinned else None,
        "corpus_growth": growth,
        "ratios": ratios,
        "targets": [
            _target("peak memory: capture ÷ hook-free bridge forward", ratios["capture_vs_bridge"],
                    LIMITS["memory"]),
            _target("peak memory: capture ÷ bare HF forward", ratios["capture_vs_hf"], LIMITS["memory"]),
            _target(f"peak memory: collect over {cfg['corpus_multiples'][-1]}× ÷ 1× the sequences (flat)",
                    ratios["collect_largest_vs_smallest"], 1.05,
                    note="flat = within 5%"),
        ],
    }


def _alpha_grid() -> tuple[float, ...]:
    """The gain experiment's default grid: 21 log-spaced α in [1/4, 4], 1 included."""
    from spectra_lens.config import ALPHAS_21

    return tuple(ALPHAS_21)


def section_gain(b: Bench, cfg: dict) -> dict:
    from spectra_lens import metrics, sweep
    from spectra_lens.capture import MetricCapture, attached
    from spectra_lens.interventions import QueryScale

    x = b.tokens(cfg["batch"], cfg["seq_len"])
    alphas = _alpha_grid()
    n_heads_total = b.layout.n_layers * b.layout.n_heads
    fast_layers = [l for l in range(b.layout.n_layers) if b.layout.fast_path_ok(l)]

    method: list[str] = []

    def fast():  # what experiments.gain runs: the fast path wherever the layer allows it
        res = sweep.head_curves(b.model, x, alphas, min_position=1, batch_size=x.shape[0])
        method[:] = res.method

    def naive_head(layer: int, head: int):
        # The original's method: one full hooked forward pass per (head, α), this head's query
        # scaled, its layer's metrics captured.
        def run():
            cap = MetricCapture(b.layout, layers=[layer])
            for a in alphas:
                with attached(b.model, QueryScale(layer, head, a), cap, layout=b.layout):
                    b.model(x, return_type=None)
                tm = cap.result()
                _ = {n: getattr(tm, n)[:, 0, head, 1:].mean(-1) for n in metrics.SWEEP_METRICS}

        return run

    variants = {"bridge_forward": b.bridge_forward(x), "hf_forward": b.hf_forward(x), "sweep_heads": fast}
    times = interleave(variants, cfg["reps"], b.device, label="gain")
    # The naive subset runs after the interleaved part, one head at a time between fresh
    # measurements of the bare forward, so that its per-forward cost is compared under the same load.
    naive, naive_bare = [], []
    for layer, head in cfg["naive_heads"]:
        t = interleave({"naive": naive_head(layer, head), "bridge_forward": b.bridge_forward(x)}, 1,
                       b.device, warmup=False, label=f"naive L{layer}H{head}")
        naive.append({"layer": layer, "head": head, "seconds_21_alphas": t["naive"][0],
                      "per_head_alpha_s": t["naive"][0] / len(alphas)})
        naive_bare.append(t["bridge_forward"][0])
    per_ha = statistics.median(n["per_head_alpha_s"] for n in naive)
    naive_total = per_ha * n_heads_total * len(alphas)
    fast_med = statistics.median(times["sweep_heads"])
    ratios = {
        "fast_vs_bridge": _ratio(times, "sweep_heads", "bridge_forward"),
        "fast_vs_hf": _ratio(times, "sweep_heads", "hf_forward"),
    }
    speedup = naive_total / fast_med
    return {
        "workload": {"batch": cfg["batch"], "seq_len": cfg["seq_len"], "n_alphas": len(alphas),
                     "alphas": alphas, "heads": n_heads_total, "fast_path_layers": len(fast_layers),
                     "methods_used": sorted(set(method)),
                     "n_layers": b.layout.n_layers},
        "command": _cmd("gain", b.quick),
        "variants": {n: _summary(times, n, x.numel()) for n in times},
        "ratios": ratios,
        "naive": {
            "method": "one full forward per (head, α) with QueryScale on that head and "
                      "MetricCapture on its layer (the original's method)",
            "measured_heads": naive,
            "bare_forward_alongside_s": naive_bare,
            "per_head_alpha_s": per_ha,
            "per_head_alpha_vs_bare_forward": per_ha / statistics.median(naive_bare),
            "extrapolated": True,
            "extrapolated_total_s": naive_total,
            "extrapolation": f"median per-(head, α) time of {len(naive)} measured head(s) × "
                             f"{n_heads_total} heads × {len(alphas)} α",
            "speedup_of_fast_path": speedup,
            # The same speedup from ratios to the bare forward measured alongside each, which
            # cancels a change of machine load between the two measurements.
            "speedup_from_ratios": (per_ha / statistics.median(naive_bare)) * n_heads_total * len(alphas)
                                   / ratios["fast_vs_bridge"]["value"],
        },
        "targets": [
            _time_target("fast path (all heads × 21 α) ÷ one hook-free bridge forward", ratios["fast_vs_bridge"],
                         LIMITS["gain"]),
            _time_target("fast path (all heads × 21 α) ÷ one bare HF forward", ratios["fast_vs_hf"],
                         LIMITS["gain"]),
        ],
    }


def section_exact(b: Bench, cfg: dict) -> dict:
    from spectra_lens import sweep
    from spectra_lens.interventions import QueryScale

    x = b.tokens(cfg["batch"], cfg["seq_len"])
    layer, head = cfg["head"]
    batch = x.shape[0]
    variants = {}
    for n in cfg["n_alphas"]:
        grid = _EXACT_GRIDS[n]
        for mode, max_rows in (("batched", batch * n), ("per_alpha", batch)):
            variants[f"{mode}_{n}"] = (lambda grid=grid, max_rows=max_rows: sweep.intervention_effects(
                b.model, x, grid, QueryScale.scan(layer, head), max_rows=max_rows))
    variants["bridge_forward"] = b.bridge_forward(x)
    # No warm-up calls: each variant is several forwards, and the models are warm by now.
    times = interleave(variants, cfg["reps"], b.device, warmup=False, label="exact")
    ratios = {}
    for n in cfg["n_alphas"]:
        ratios[f"per_alpha_vs_batched_{n}"] = _ratio(times, f"per_alpha_{n}", f"batched_{n}")
        ratios[f"batched_{n}_vs_bridge"] = _ratio(times, f"batched_{n}", "bridge_forward")
        ratios[f"per_alpha_{n}_vs_bridge"] = _ratio(times, f"per_alpha_{n}", "bridge_forward")
    return {
        "workload": {"batch": batch, "seq_len": cfg["seq_len"], "intervention": f"QueryScale.scan({layer}, {head})",
                     "grids": {str(n): _EXACT_GRIDS[n] for n in cfg["n_alphas"]},
                     "note": "intervention_effects also runs the unscaled pass and computes loss and KL over "
                             "the vocabulary; batched: max_rows = batch × n_α (one scaled forward), "
                             "per_alpha: max_rows = batch (n_α scaled forwards)"},
        "command": _cmd("exact", b.quick),
        "variants": {n: _summary(times, n) for n in times},
        "ratios": ratios,
        "targets": [],
    }


def section_scaling(b: Bench, cfg: dict) -> dict:
    rows = []
    for seq_len, reps in zip(cfg["seq_lens"], cfg["seq_reps"]):
        x = b.tokens(cfg["seq_batch"], seq_len)
        t = interleave({"bridge_forward": b.bridge_forward(x), "capture": b.capture(x),
                        "capture_without_top90": b.capture(x, top90=False)}, reps,
                       b.device, warmup=seq_len == cfg["seq_lens"][0], label=f"seq {seq_len}")
        rows.append(_scaling_row("seq_len", cfg["seq_batch"], seq_len, t))
    for batch, reps in zip(cfg["batch_sizes"], cfg["batch_reps"]):
        x = b.tokens(batch, cfg["batch_seq_len"])
        t = interleave({"bridge_forward": b.bridge_forward(x), "capture": b.capture(x)}, reps,
                       b.device, warmup=batch == cfg["batch_sizes"][0], label=f"batch {batch}")
        rows.append(_scaling_row("batch", batch, cfg["batch_seq_len"], t))
    targets = [_time_target(f"capture ÷ hook-free bridge forward at {d['seq_len']} tokens (batch 1)",
                            d["capture_vs_bridge"], LIMITS["long"])
               for d in rows if d["axis"] == "seq_len" and d["seq_len"] == LIMITS["long_seq_len"]]
    return {"workload": {k: v for k, v in cfg.items()}, "command": _cmd("scaling", b.quick),
            "rows": rows, "targets": targets}


def section_analysis(cfg: dict, quick: bool) -> dict:
    from bench import analysis as A

    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="spectra-bench-analysis-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        docs = A.default_documents(cfg["n_sequences"], cfg["seq_len"])
        m = cfg["multiple"]
        sets = {"1x": docs, f"{m}x_tokens": A.scaled_documents(docs, m, "tokens"),
                f"{m}x_documents": A.scaled_documents(docs, m, "documents")}
        geometry = dict(seq_len=cfg["seq_len"], shard_size=cfg["shard_size"], batch=cfg["batch"])
        for name, d in sets.items():
            A.write_moments(root / name, d, **geometry)
        A.write_moments(root / "warmup", np.unique(docs)[: 2 * cfg["batch"]], **geometry)  # >= 4 documents
        prepare_s = time.perf_counter() - t0
        paths = sorted((root / "1x" / "moments").glob("shard_*.npz"))
        infos: list[dict] = []
        times = interleave({"analysis": lambda: infos.append(A.analyze(paths, n_boot=cfg["n_boot"]))},
                           cfg["reps"], cpu, label="analysis")
        infos = infos[1:]  # the warm-up call
        head_statistics_s = A.head_statistics_seconds(paths, n_boot=cfg["n_boot"])
        memory = {name: _memory_child({"kind": "analysis", "n_boot": cfg["n_boot"],
                                       "moments_dir": str(root / name / "moments"),
                                       "warmup_dir": str(root / "warmup" / "moments")})
                  for name in sets}
    one = memory["1x"]
    ratios = {name: memory[name]["peak_bytes"] / one["peak_bytes"] for name in sets}
    over = {name: memory[name]["peak_over_baseline_bytes"] / max(1, one["peak_over_baseline_bytes"])
            for name in sets}
    summary = _summary(times, "analysis")
    breakdown = {k: statistics.median(i[k] for i in infos) for k in ("read_s", "analyze_s")}
    breakdown["head_statistics_alone_s"] = head_statistics_s
    return {
        "workload": {**cfg, "n_documents": infos[0]["n_documents"], "n_heads": infos[0]["n_heads"],
                     "n_variables": infos[0]["n_variables"], "n_shards": infos[0]["n_shards"],
                     "tokens_per_head": infos[0]["tokens_per_head"], "prepare_s": round(prepare_s, 1)},
        "command": _cmd("analysis", quick),
        "variants": {"analysis": summary},
        "breakdown_s": breakdown,
        "memory": memory,
        "peak_ratio": ratios,
        "working_memory_ratio": over,
        "targets": [
            _target("analysis of the default run: read moments + statistics, seconds",
                    summary["median_s"], LIMITS["analysis_s"], cpu_value=summary["cpu_median_s"],
                    note="CPU-time column: CPU seconds"),
            _target(f"peak memory: analysis of {m}× the tokens (same documents) ÷ 1×",
                    ratios[f"{m}x_tokens"], LIMITS["analysis_memory"], note="flat = within 5%"),
        ],
    }


def _scaling_row(axis: str, batch: int, seq_len: int, t: Times) -> dict:
    n_tok = batch * seq_len
    row = {
        "axis": axis, "batch": batch, "seq_len": seq_len,
        "bridge_forward": _summary(t, "bridge_forward", n_tok),
        "capture": _summary(t, "capture", n_tok),
        "capture_vs_bridge": _ratio(t, "capture", "bridge_forward"),
    }
    if "capture_without_top90" in t.wall:
        row["capture_without_top90"] = _summary(t, "capture_without_top90", n_tok)
        row["capture_without_top90_vs_bridge"] = _ratio(t, "capture_without_top90", "bridge_forward")
    return row


# --------------------------------------------------------------------------- driver


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small workloads, ~2-3 minutes")
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if present)")
    p.add_argument("--out", default=None, help="results JSON (default: bench/results.json for a "
                   "full run, bench/results-quick.json otherwise)")
    p.add_argument("--markdown", default=None, help="markdown report (default: BENCHMARKS.md for "
                   "a full run, none otherwise)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own choice, all cores)")
    p.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    p.add_argument("--merge", action="store_true",
                   help="with --only: replace those sections in bench/results.json (or --out) and "
                        "re-render BENCHMARKS.md (or --markdown); the other sections are kept")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.WARNING if args.silent else logging.INFO)
    warnings.filterwarnings("ignore")
    for noisy in ("transformers", "transformer_lens"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from spectra_lens.models import resolve_device

    full = not args.quick and not args.only
    if args.merge and (not args.only or args.quick):
        print("error: --merge needs --only SECTION ... and no --quick", file=sys.stderr)
        return 2
    main_files = full or args.merge
    out = Path(args.out) if args.out else ROOT / ("bench/results.json" if main_files else "bench/results-quick.json")
    md = Path(args.markdown) if args.markdown else (ROOT / "BENCHMARKS.md" if main_files else None)
    sizes = _QUICK if args.quick else _FULL
    sections = args.only or list(SECTIONS)
    device = resolve_device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    _EXTRA_FLAGS[:] = ([f"--device {args.device}"] if args.device else []) + \
        ([f"--threads {args.threads}"] if args.threads else [])

    t_start = time.time()
    load_before = _loadavg()
    previous = json.loads(out.read_text()) if args.merge and out.exists() else None
    results: dict = {
        "meta": {
            "command": "python -m bench.run" + (" --quick" if args.quick else "")
                       + (f" --only {' '.join(args.only)}" if args.only else "")
                       + "".join(" " + f for f in _EXTRA_FLAGS) + (" --merge" if args.merge else ""),
            "quick": args.quick,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": "SmolLM2-135M-Instruct (embedded default, float32)",
            "machine": machine(device),
            "loadavg_before": load_before,
        },
        "sections": {},
    }
    log.info("load average before: %s", load_before)
    cores = os.cpu_count() or 1
    if device.type == "cpu" and load_before and load_before[0] > 0.5 * cores and args.threads is None:
        log.warning("the CPU is loaded (load average %.1f on %d cores): wall times will be noisy and "
                    "inflated; `--threads 1` is far steadier under load", load_before[0], cores)
    if previous is not None:  # --merge: the earlier run's sections and machine, this run's on top
        this_run = results["meta"]
        results = previous
        results.setdefault("meta", {}).setdefault("updates", []).append(
            {k: this_run[k] for k in ("command", "started", "loadavg_before")} | {"sections": sections})
    b = None
    if any(s not in ("memory", "analysis") for s in sections):
        b = Bench(device, args.quick)
        results["meta"]["model_load_s"] = round(b.load_s, 1)
        results["meta"]["model_shape"] = {"n_layers": b.layout.n_layers, "n_heads": b.layout.n_heads,
                                          "n_kv_heads": b.layout.n_kv_heads, "d_head": b.layout.d_head}
    command = "python -m bench.run" + (" --quick" if args.quick else "") + \
        (f" --only {' '.join(args.only)}" if args.only else "") + "".join(" " + f for f in _EXTRA_FLAGS) + \
        (" --merge" if args.merge else "")
    for s in sections:
        t0 = time.time()
        log.info("section %s", s)
        n_samples, section_load = len(_LOAD_SAMPLES), _loadavg()
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if s == "memory":
            res = section_memory(b, sizes[s], device, args.quick)
        elif s == "analysis":
            res = section_analysis(sizes[s], args.quick)
        else:
            res = globals()[f"section_{s}"](b, sizes[s])
        res["section_wall_s"] = round(time.time() - t0, 1)
        res["run"] = {"command": command, "started": started, "loadavg_before": section_load,
                      "loadavg_after": _loadavg(), "threads": torch.get_num_threads(),
                      "loadavg_during": _load_summary(_LOAD_SAMPLES[n_samples:])}
        results["sections"][s] = res
        if previous is None:
            results["meta"]["wall_s"] = round(time.time() - t_start, 1)
        _write(results, out, md)  # partial results survive an interruption
    if previous is None:
        results["meta"]["loadavg_after"] = _loadavg()
        if _LOAD_SAMPLES:
            results["meta"]["loadavg_during"] = _load_summary(_LOAD_SAMPLES)
        results["meta"]["wall_s"] = round(time.time() - t_start, 1)
    else:
        results["meta"]["updates"][-1]["loadavg_after"] = _loadavg()
        results["meta"]["updates"][-1]["wall_s"] = round(time.time() - t_start, 1)
    _write(results, out, md)
    for t in [t for r in results["sections"].values() for t in r["targets"]]:
        print(f"{'met   ' if t['met'] else 'MISSED'} {t['name']}: {t['value']:.3f} (target ≤ {t['limit']})")
    print(f"wrote {out}" + (f" and {md}" if md else "") + f" in {time.time() - t_start:.0f} s; "
          f"load average before {load_before}, after {results['meta']['loadavg_after']}")
    return 0


def _load_summary(samples: list[float]) -> dict | None:
    if not samples:
        return None
    return {"min": min(samples), "median": statistics.median(samples), "max": max(samples),
            "samples": len(samples), "own_threads": torch.get_num_threads()}


def _write(results: dict, out: Path, md: Path | None) -> None:
    from bench.report import render

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    os.replace(tmp, out)
    if md is not None:
        md.write_text(render(results, results_path=out))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.device):
        return str(o)
    raise TypeError(f"not JSON-serializable: {type(o).__name__}")


if __name__ == "__main__":
    sys.exit(main())

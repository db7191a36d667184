"""BENCHMARKS.md from bench/results.json: `python -m bench.report [results.json] [out.md]`.

Everything in the markdown is read from the results; nothing is typed in by hand. The
explanations of missed targets are templates filled with the measured numbers.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20


def _f(x, nd=2):
    return "n/a" if x is None else f"{x:.{nd}f}"


def _x(r):
    """A ratio entry (dict with value / ratio_of_medians) or a float, as '1.23×'."""
    if r is None:
        return "n/a"
    if isinstance(r, dict):
        return f"{r['value']:.2f}×"
    return f"{r:.2f}×"


def _cx(r):
    """The CPU-time ratio of a ratio entry, as '1.23×'."""
    v = r.get("cpu_value") if isinstance(r, dict) else None
    return "n/a" if v is None else f"{v:.2f}×"


def _mib(b):
    return f"{b / MiB:,.0f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _machine(meta: dict) -> str:
    m = meta["machine"]
    v = m.get("versions", {})
    rows = [
        ["CPU", f"{m['cpu_model']}, {m['cpu_cores']} cores (torch threads: {m['torch_threads']})"],
        ["memory", f"{m.get('memory_gib')} GiB"],
        ["device", m["device"] + (f" — {m['gpu']} ({m['gpu_memory_gib']} GiB, CUDA {m['cuda']})" if "gpu" in m else "")],
        ["platform", m["platform"]],
        ["versions", f"python {m['python']}, torch {m['torch']}, transformers {v.get('transformers')}, "
                     f"transformer-lens {v.get('transformer-lens')}, spectra-lens {v.get('spectra-lens')}"],
        ["model", meta.get("model", "")
         + (f", {meta['model_shape']['n_layers']} layers × {meta['model_shape']['n_heads']} heads "
            f"({meta['model_shape']['n_kv_heads']} kv heads)" if "model_shape" in meta else "")],
        ["run", f"`{meta['command']}`, started {meta['started']}, {meta.get('wall_s', 0) / 60:.1f} min"],
        ["load average (1, 5, 15 min)", f"before {meta.get('loadavg_before')}, after {meta.get('loadavg_after')}"],
    ]
    for u in meta.get("updates", []):
        rows.append(["sections rerun", f"{', '.join(u['sections'])}: `{u['command']}`, started {u['started']}, "
                     f"{u.get('wall_s', 0) / 60:.1f} min, load average before {u.get('loadavg_before')}, "
                     f"after {u.get('loadavg_after')}"])
    return _table(["", ""], rows)


def _run_line(s: dict) -> str:
    """Which run measured a section, when, and under what machine load."""
    r = s.get("run")
    if not r:
        return ""
    d = r.get("loadavg_during")
    during = (f"; during its repetitions median {d['median']:.1f} (range {d['min']:.1f}–{d['max']:.1f}, "
              f"{d['samples']} samples, of which about {d['own_threads']} is this run's own threads)"
              if d else "")
    lb, la = r.get("loadavg_before"), r.get("loadavg_after")
    return (f"Measured by `{r['command']}`, section started {r['started']} ({r.get('threads')} torch "
            f"thread(s)); 1-minute load average {lb[0] if lb else '?'} before, {la[0] if la else '?'} "
            f"after{during}.")


def _load_note(meta: dict) -> str:
    """Whether other work shared the CPU, judged from the load average sampled during the run
    (its own intra-op threads subtracted)."""
    if meta["machine"]["device"] != "cpu":
        return ""
    cores = meta["machine"].get("cpu_cores") or 1
    threads = meta["machine"].get("torch_threads") or 1
    during = meta.get("loadavg_during")
    if during:
        others = max(0.0, during["median"] - during["own_threads"])
        seen = (f"1-minute load average during the run: median {during['median']:.1f} (range "
                f"{during['min']:.1f}–{during['max']:.1f}, {during['samples']} samples), of which "
                f"about {during['own_threads']} is this run's own threads")
    else:
        loads = [l[0] for l in (meta.get("loadavg_before"), meta.get("loadavg_after")) if l]
        if not loads:
            return ""
        others = max(loads)
        seen = f"1-minute load average before/after the run: {loads}"
    if others > 0.5:
        text = (f"**The machine was loaded** by other work ({seen}; {cores} cores). Absolute times "
                f"are inflated. Ratios are medians of per-repetition ratios of interleaved variants "
                f"and far less affected; treat differences of a few percent as noise.")
    else:
        text = f"The machine was otherwise idle during the run ({seen}; {cores} cores)."
    if threads == 1 and cores > 1:
        text += (" The run used `--threads 1`: with torch's default of one intra-op thread per "
                 "core, any other work on the machine makes the threads wait for each other (on "
                 "this 2-core machine, forward passes became several times slower and erratic, CPU "
                 "time inflated alike), while a single thread stays steady. Times here are "
                 "single-thread times; `make bench` uses torch's default.")
    elif others > 0.5:
        text += (f" With {threads} intra-op threads on a loaded machine, threads wait for each other "
                 f"and single calls can take several times their quiet duration; `--threads 1` "
                 f"gives steadier numbers there.")
    return text


def _targets(results: dict) -> str:
    rows = []
    for name, sec in results["sections"].items():
        for t in sec.get("targets", []):
            cpu = t.get("cpu_value")
            rows.append([name, t["name"], f"{t['value']:.3f}", "" if cpu is None else f"{cpu:.3f}",
                         f"≤ {t['limit']}", "met" if t["met"] else "**missed**", t.get("note", "")])
    return _table(["section", "target", "measured", "CPU-time ratio", "limit", "", "note"], rows)


def _overhead(s: dict) -> str:
    w, v, r = s["workload"], s["variants"], s["ratios"]
    labels = {
        "hf_forward": "bare Hugging Face forward (separate HF copy)",
        "bridge_forward": "TransformerBridge forward, no hooks",
        "capture": "observational pass: MetricCapture, every head, every metric",
        "capture_without_top90": "same without k_eff_top90 (`MetricCapture(top_mass=None)`)",
        "capture_and_records": "observational pass + `to_frame()` (what `collect` does per batch)",
        "observe_pass": "the pass as `observe` runs it: `MetricCapture.run`, ending at the last "
                        "layer's pattern (no last MLP, no logits)",
        "observe_pass_and_records": "same + `to_frame()` (what `collect` does per batch with records)",
    }
    bridge, hf = v["bridge_forward"], v["hf_forward"]
    rows = []
    for n, d in v.items():
        rows.append([labels.get(n, n), _f(d["median_s"], 3), f"{_f(d['min_s'], 3)}–{_f(d['max_s'], 3)}",
                     f"{d['tokens_per_s']:,.0f}", f"{_paired(d['times_s'], bridge['times_s']):.3f}×",
                     f"{_paired(d['times_s'], hf['times_s']):.3f}×",
                     f"{_paired(d['cpu_times_s'], bridge['cpu_times_s']):.3f}×" if d["cpu_times_s"] else "n/a"])
    share = s.get("top90_share_of_overhead")
    text = [
        f"Workload: {w['batch']} sequences × {w['seq_len']} tokens of the default corpus"
        f"{' (one batch of the observational experiment at its defaults)' if (w['batch'], w['seq_len']) == (8, 128) else ''}"
        f", all {w['heads']} heads; {v['capture']['reps']} "
        f"interleaved repetitions after one warm-up call each.",
        "",
        _table(["variant", "median s", "range s", "tokens/s", "÷ bridge", "÷ HF", "CPU time ÷ bridge"], rows),
        "",
        f"Capture ÷ hook-free bridge in this interleaved run: {_x(r['capture_vs_bridge'])} (ratio "
        f"of medians {r['capture_vs_bridge']['ratio_of_medians']:.3f}×); ÷ bare HF: "
        f"**{_x(r['capture_vs_hf'])}**; the bridge itself ÷ HF: {_x(r['bridge_vs_hf'])}.",
    ]
    adj = r.get("capture_vs_bridge_adjacent")
    if adj:
        q = adj["per_quad"]
        text.append(
            f"The target is timed close together (`bench.run.adjacent`): {adj['quads']} quads of "
            f"bridge, bridge, capture, capture (or the reverse), timing the second call of each kind, "
            f"so each timed call follows one of its own kind; capture ÷ hook-free bridge "
            f"**{adj['value']:.3f}×** (median over quads; single quads {min(q):.3f}–{max(q):.3f}×). "
            f"In the interleaved run above up to five other variants' calls can lie between the two "
            f"calls of a pair, while the machine's speed changes.")
    if "observe_pass_vs_bridge" in r:
        text.append(
            f"The `MetricCapture` rows above the `MetricCapture.run` ones run the hooks inside a "
            f"whole forward pass: the cost of "
            f"the hooks, like for like. `observe` needs no logits, so its pass ends at the last "
            f"layer's attention pattern: it costs **{_x(r['observe_pass_vs_bridge'])}** the "
            f"hook-free bridge forward and {_x(r['observe_pass_vs_hf'])} the bare HF forward.")
    if share is not None:
        text.append(
            f"k_eff_top90 (a full sort of every attention row) is {100 * share:.0f}% of the capture's "
            f"extra time; without it the capture is {_x(r['capture_without_top90_vs_bridge'])} the "
            f"bridge forward. That variant skips the sort: `MetricCapture(top_mass=None)` "
            f"(`spectra-lens observe --top-mass none`); results.json files written before that "
            f"option existed measured it by substituting zeros for the metric, the same saving.")
    text += ["", f"Reproduce: `{s['command']}`"]
    return "\n".join(text)


def _paired(a, b):
    import statistics

    return statistics.median(x / y for x, y in zip(a, b))


def _memory(s: dict) -> str:
    w, one, g, r = s["workload"], s["single_batch"], s["corpus_growth"], s["ratios"]
    unit = "GPU memory allocated" if w["device"].startswith("cuda") else "resident set (RSS)"
    labels = {"hf": "bare HF forward", "bridge": "bridge forward, no hooks",
              "capture": "observational pass (capture + result)",
              "capture_numpy_kernels": "observational pass, NumPy kernels (`SPECTRA_LENS_NUMBA=0`)",
              "observe_pass": "the pass as `observe` runs it (`MetricCapture.run`: ends at the last "
                              "layer's pattern, no logits)"}

    def peak(d: dict) -> str:
        peaks = d.get("peaks_bytes") or []
        return (_mib(d["peak_bytes"]) if len(peaks) < 2
                else f"{_mib(d['peak_bytes'])} ({_mib(peaks[0])}–{_mib(peaks[-1])})")

    procs = max((d.get("procs", 1) for d in one.values()), default=1)
    rows = [[labels[k], _mib(d["baseline_bytes"]), peak(d),
             _mib(d["peak_over_baseline_bytes"]),
             f"{d['peak_bytes'] / one['bridge']['peak_bytes']:.3f}×",
             f"{d['peak_bytes'] / one['hf']['peak_bytes']:.3f}×"] for k, d in one.items()]
    pinned = s.get("single_batch_pinned_mmap_threshold") or {}
    rows += [[f"{labels[k]}, `{s['pinned_env']}`", _mib(d["baseline_bytes"]), _mib(d["peak_bytes"]),
              _mib(d["peak_over_baseline_bytes"]),
              f"{d['peak_bytes'] / pinned['bridge']['peak_bytes']:.3f}× (pinned bridge)", ""]
             for k, d in pinned.items()]
    grows = [[f"{d['n_sequences']} ({d['multiple']}×)", f"{d['n_sequences'] // w['shard_size']}",
              _mib(d["baseline_bytes"]), _mib(d["peak_bytes"]), _mib(d["peak_over_baseline_bytes"]),
              f"{d['peak_bytes'] / g[0]['peak_bytes']:.3f}×", _f(d["work_s"], 1)] for d in g]
    return "\n".join([
        f"Each configuration runs in a fresh process (`python -m bench.memory`); measure: "
        f"{s['measure']}. \"loaded\" is the {unit} after loading the model and tokenizing; "
        f"the peak is over the forward passes only. Batch {w['batch']} × {w['seq_len']} tokens."
        + (f" Each of the first rows ran in {procs} processes: the row is the process with the median "
           f"peak, the range in brackets the peaks of all {procs}." if procs > 1 else ""),
        "",
        _table(["configuration", "loaded MiB", "peak MiB", "peak − loaded MiB", "÷ bridge", "÷ HF"], rows),
        "",
        f"The working memory of the pass itself (peak − loaded) is "
        f"{r['capture_over_loaded_vs_bridge_over_loaded']:.2f}× that of the bridge forward"
        + (f"; with glibc's mmap threshold pinned (`{s['pinned_env']}`, so freed large buffers go "
           f"back to the system at once) the capture's peak is "
           f"{r['capture_vs_bridge_pinned_mmap_threshold']:.3f}× the bridge's"
           + (": most of the difference under the default allocator is freed memory that glibc "
              "keeps, not live tensors."
              if r["capture_vs_bridge_pinned_mmap_threshold"] - 1 < 0.5 * (r["capture_vs_bridge"] - 1)
              else ".")
           if "capture_vs_bridge_pinned_mmap_threshold" in r else ".")
        + " The bare forward's own working memory includes the logits, `batch × pos × 49152` "
        "float32."
        + (f" `observe` computes no logits: its pass (`MetricCapture.run`) ends at the last layer's "
           f"pattern and peaks at {r['observe_pass_vs_bridge']:.3f}× the bridge forward, "
           f"{r['observe_pass_vs_hf']:.3f}× the bare HF forward."
           if "observe_pass_vs_bridge" in r else ""),
        "",
        f"Corpus growth: `experiments.observational.collect` (capture, `to_frame`, one Parquet file "
        f"per shard of {w['shard_size']} sequences) over "
        f"{', '.join(str(d['multiple']) + '×' for d in g)} the sequences:",
        "",
        _table(["sequences", "shards", "loaded MiB", "peak MiB", "peak − loaded MiB", "÷ smallest", "time s"], grows),
        "",
        f"Peak at the largest corpus ÷ smallest: **{r['collect_largest_vs_smallest']:.3f}×**"
        + (": flat; memory is bounded by one shard's records, not by the corpus."
           if r["collect_largest_vs_smallest"] <= 1.05 else ": it grows with the corpus (see below)."),
        "",
        f"Reproduce: `{s['command']}`",
    ])


def _gain(s: dict) -> str:
    w, v, r, n = s["workload"], s["variants"], s["ratios"], s["naive"]
    rows = [
        ["one bare HF forward", _f(v["hf_forward"]["median_s"], 3), "", ""],
        ["one hook-free bridge forward", _f(v["bridge_forward"]["median_s"], 3), "1", ""],
        [f"fast path: `sweep.head_curves` (method {'/'.join(w.get('methods_used', []))}), "
         f"{w['heads']} heads × {w['n_alphas']} α",
         _f(v["sweep_heads"]["median_s"], 3), f"{w['heads'] * w['n_alphas']:,}",
         f"{_x(r['fast_vs_bridge'])} bridge, {_x(r['fast_vs_hf'])} HF"],
        [f"naive, measured: {len(n['measured_heads'])} head(s) × {w['n_alphas']} α "
         "(" + ", ".join("L{layer}H{head}".format(**h) for h in n["measured_heads"]) + ")",
         " / ".join(_f(h["seconds_21_alphas"], 2) for h in n["measured_heads"]),
         f"{len(n['measured_heads']) * w['n_alphas']}", f"{_f(n['per_head_alpha_s'], 3)} s per (head, α) "
         f"= {n['per_head_alpha_vs_bare_forward']:.2f}× a bare forward"],
        [f"naive, **extrapolated** to {w['heads']} heads × {w['n_alphas']} α",
         f"{n['extrapolated_total_s']:,.0f}", f"{w['heads'] * w['n_alphas']:,}",
         f"{n['extrapolated_total_s'] / v['bridge_forward']['median_s']:,.0f}× bridge"],
    ]
    return "\n".join([
        f"Workload: {w['batch']} sequences × {w['seq_len']} tokens; α = {w['n_alphas']} values "
        f"log-spaced in [{min(w['alphas']):g}, {max(w['alphas']):g}]; fast path on "
        f"{w['fast_path_layers']} of {w['n_layers']} layers (those bilinear in q; the exact mode "
        f"would run on the others). The fast path returns every head's entropy, max_attn, "
        f"k_eff_exp, k_eff_pr, k_eff_top90 at every α plus the analytic gain −Var_p(s). Its "
        f"pass ends at the last layer's attention pattern (`SweepCapture.run`): the last MLP and "
        f"the unembedding, which no gain needs, are not computed. For this model that is about a "
        f"fifth of a forward's multiply-adds per token (a 49,152-token unembedding beside 30 "
        f"small layers); for an 8B model with a 128k vocabulary, about 7%.",
        "",
        _table(["method", "seconds", "forwards / (head, α) pairs", "ratio"], rows),
        "",
        f"Fast path ÷ one bare forward: **{_x(r['fast_vs_bridge'])}** (bridge), "
        f"**{_x(r['fast_vs_hf'])}** (HF); in CPU time {_cx(r['fast_vs_bridge'])} and "
        f"{_cx(r['fast_vs_hf'])}. Speedup over the naive method: "
        f"**{n['speedup_of_fast_path']:,.0f}×** (from the ratios of each to the bare forward "
        f"measured beside it: {n.get('speedup_from_ratios', float('nan')):,.0f}×) — the naive total "
        f"is an extrapolation ({n['extrapolation']}), not a measurement.",
        f"Naive method: {n['method']}.",
        "",
        f"Reproduce: `{s['command']}`",
    ])


def _exact(s: dict) -> str:
    w, v, r = s["workload"], s["variants"], s["ratios"]
    rows = []
    for k in w["grids"]:
        rows.append([k, _f(v[f"batched_{k}"]["median_s"], 3), _f(v[f"per_alpha_{k}"]["median_s"], 3),
                     _x(r[f"per_alpha_vs_batched_{k}"]), _cx(r[f"per_alpha_vs_batched_{k}"]),
                     _x(r[f"batched_{k}_vs_bridge"]),
                     _x(r[f"per_alpha_{k}_vs_bridge"])])
    return "\n".join([
        f"`sweep.intervention_effects(model, tokens, grid, {w['intervention']})` on {w['batch']} sequences × "
        f"{w['seq_len']} tokens: real forward passes with the query of one head scaled, metrics of "
        f"every head, loss and KL. {w['note']}. One hook-free bridge forward of the same tokens: "
        f"{_f(v['bridge_forward']['median_s'], 3)} s.",
        "",
        _table(["n α", "batched s", "one forward per α s", "per-α ÷ batched", "(CPU time)", "batched ÷ bare",
                "per-α ÷ bare"], rows),
        "",
        _exact_note(s),
        "",
        f"Reproduce: `{s['command']}`",
    ])


def _exact_note(s: dict) -> str:
    gains = [s["ratios"][f"per_alpha_vs_batched_{k}"]["value"] for k in s["workload"]["grids"]]
    if s["variants"]["bridge_forward"].get("cpu_times_s") and max(gains) < 1.2:
        return ("On a CPU the forward pass is compute-bound already at this batch, so batching α "
                "saves only the per-call overhead (hooks, Python, the unscaled-pass bookkeeping). "
                "Batching pays where one small batch leaves the device idle, as on a GPU; this run "
                "does not measure that.")
    return ""


def _scaling(s: dict) -> str:
    def rows(axis):
        out = []
        for d in s["rows"]:
            if d["axis"] != axis:
                continue
            row = [str(d["seq_len"] if axis == "seq_len" else d["batch"]),
                   _f(d["bridge_forward"]["median_s"], 3), _f(d["capture"]["median_s"], 3),
                   _x(d["capture_vs_bridge"]), _cx(d["capture_vs_bridge"])]
            if axis == "seq_len":
                row.append(_x(d.get("capture_without_top90_vs_bridge")))
            row += [f"{d['bridge_forward']['tokens_per_s']:,.0f}", f"{d['capture']['tokens_per_s']:,.0f}",
                    str(d["capture"]["reps"])]
            out.append(row)
        return out

    w = s["workload"]
    tail = ["bridge tokens/s", "capture tokens/s", "reps"]
    head = ["bridge s", "capture s", "capture ÷ bridge", "(CPU time)"]
    return "\n".join([
        f"Bare = hook-free bridge forward; capture = the observational pass (every head, every "
        f"metric). Sequence length at batch {w['seq_batch']} (\"no top90\": the capture without "
        f"k_eff_top90, `top_mass=None`):",
        "",
        _table(["seq_len"] + head + ["no top90 ÷ bridge"] + tail, rows("seq_len")),
        "",
        f"Batch size at {w['batch_seq_len']} tokens:",
        "",
        _table(["batch"] + head + tail, rows("batch")),
        "",
        f"Reproduce: `{s['command']}`",
    ])


def _analysis(s: dict) -> str:
    w, v, b, mem = s["workload"], s["variants"]["analysis"], s["breakdown_s"], s["memory"]
    steps = [
        ["read every shard's moments file and merge them (`observational.read_moments`)", _f(b["read_s"], 2)],
        ["the run's tables from the moments (`observational.analyze`: `head_statistics` with a "
         f"{w['n_boot']:,}-resample document bootstrap, fold consistency, replication, agreement; "
         "no finite-difference gain, which needs the model)", _f(b["analyze_s"], 2)],
        [f"**total** (median of {v['reps']}; range {_f(v['min_s'], 2)}–{_f(v['max_s'], 2)} s; "
         f"CPU {_f(v['cpu_median_s'], 2)} s)", f"**{_f(v['median_s'], 2)}**"],
        ["of which `stats.head_statistics` alone (one call, timed separately)",
         _f(b["head_statistics_alone_s"], 2)],
    ]
    labels = {"1x": "1× (the default run)"}
    one = mem["1x"]
    rows = []
    for name, d in mem.items():
        rows.append([labels.get(name, name.replace("x_", "× the ").replace("_", " ")), f"{d['n_documents']}",
                     f"{d['n_shards']}", f"{d['tokens_per_head']:,}", _mib(d["baseline_bytes"]),
                     _mib(d["peak_bytes"]), _mib(d["peak_over_baseline_bytes"]),
                     f"{d['peak_bytes'] / one['peak_bytes']:.3f}×",
                     f"{d['peak_over_baseline_bytes'] / max(1, one['peak_over_baseline_bytes']):.2f}×"])
    return "\n".join([
        f"Workload: the per-document moments of the observational run at its defaults — "
        f"{w['n_sequences']} sequences × {w['seq_len']} tokens in {w['n_shards']} shard files of "
        f"{w['shard_size']}, {w['n_documents']} documents (the default corpus cut as `prepare` "
        f"cuts it), {w['n_heads']} heads, {w['n_variables']} variables per token, "
        f"{w['tokens_per_head']:,} tokens per head, {w['n_boot']:,} bootstrap resamples. The "
        f"statistics' work depends on the moments' shapes (documents × heads × variables², "
        f"resamples), not on the token values, so the token values are synthetic (`bench.analysis`; "
        f"moments formed by `DocumentMoments.from_tokens` batch by batch and saved per shard, as "
        f"the run does; {_f(w['prepare_s'], 0)} s to write all inputs, not timed).",
        "",
        _table(["step", "seconds"], steps),
        "",
        f"Peak memory (fresh process each, `python -m bench.memory`; measure: {one['measure']}; "
        f"\"loaded\" is the resident set after imports and a warm-up analysis of 2 shards). "
        f"\"× the tokens\": every document cut into that many times the sequences (same documents, "
        f"more shards); \"× the documents\": that many times the documents of the same size:",
        "",
        _table(["corpus", "documents", "shards", "tokens per head", "loaded MiB", "peak MiB",
                "peak − loaded MiB", "peak ÷ 1×", "(peak − loaded) ÷ 1×"], rows),
        "",
        "The analysis holds per-(document, head) moment matrices, so its memory is "
        "O(documents × heads × variables²) and does not depend on the tokens per document; more "
        "documents make it grow in proportion.",
        "",
        f"Reproduce: `{s['command']}`",
    ])


def _why_overhead(sec, results):
    r = sec["ratios"]
    share = sec.get("top90_share_of_overhead")
    text = ("The capture computes every per-token metric of every head inside the forward pass: on "
            "the CPU one compiled pass over each attention row's visible keys "
            "(`spectra_lens.kernels.compiled`, numba; float64 sums, log p from the scores, no logarithm per "
            "key), the top-mass counts from NumPy's sort of each query block walked once, plus the "
            "query/key norms. ")
    v = sec["variants"]
    limit = next((t["limit"] for t in sec.get("targets", []) if t["name"].startswith("capture ÷")), 1.1)
    reps = [c / b for c, b in zip(v["capture"]["times_s"], v["bridge_forward"]["times_s"])]
    adj = r.get("capture_vs_bridge_adjacent")
    if adj:
        text += (f"Timed close together the capture is {adj['value']:.3f}× the forward (quads "
                 f"{min(adj['per_quad']):.2f}–{max(adj['per_quad']):.2f}×); interleaved with the "
                 f"other variants {_x(r['capture_vs_bridge'])} (single repetitions "
                 f"{min(reps):.2f}–{max(reps):.2f}×): the median of a rerun can land a few percent "
                 f"either side. ")
    elif len(reps) > 1:
        text += (f"Single repetitions of the ratio ranged {min(reps):.2f}–{max(reps):.2f}× in this "
                 f"run: the median of a rerun can land a few percent either side. ")
    if share is not None:
        w = r["capture_without_top90_vs_bridge"]["value"]
        text += (f"The sort behind k_eff_top90 is {100 * share:.0f}% of the extra time by the "
                 f"medians (an estimate as noisy as the ratios); without it the capture is "
                 f"{_x(r['capture_without_top90_vs_bridge'])} the bridge forward"
                 f"{' (within the target)' if w <= limit else ''}. ")
    long = [d for d in results["sections"].get("scaling", {}).get("rows", [])
            if d["axis"] == "seq_len" and "capture_without_top90_vs_bridge" in d]
    if long:
        d = long[-1]
        text += (f"The capture's work is O(T²) per head while the model's "
                 f"cost at these lengths is mostly O(T) matrix products, so the gap widens with "
                 f"length: at {d['seq_len']} tokens the capture is "
                 f"{_x(d['capture_vs_bridge'])} the forward, {_x(d['capture_without_top90_vs_bridge'])} "
                 f"without k_eff_top90. ")
    text += ("k_eff_top90 needs the fewest largest masses of each row that reach 0.9: the CPU path "
             "keeps the keys that can be among them, finds the crossing in a histogram of their "
             "masses and selects within that bucket (no sort of the row; sums in float64). "
             "Without it (`--top-mass none`) the capture is the cheaper variant above. Not measured "
             "here: the GPU path (`bench/gpu_check.sh`).")
    return text


def _why_long(sec, results):
    rows = [d for d in sec["rows"] if d["axis"] == "seq_len" and "capture_without_top90_vs_bridge" in d]
    text = ("At length T the capture's work per head is O(T²) for the row metrics and O(T² log T) "
            "for the sort behind k_eff_top90, while the forward's own cost on this model is "
            "dominated by O(T) matrix products until T is large. ")
    if rows:
        text += "Capture ÷ bridge by length: " + ", ".join(
            f"{d['seq_len']}: {_x(d['capture_vs_bridge'])} ({_x(d['capture_without_top90_vs_bridge'])} "
            f"without k_eff_top90)" for d in rows) + ". "
    return text + ("The sort (k_eff_top90 and k_eff_top90_nosink) is the difference between the two "
                   "numbers; the rest is the compiled pass over every visible pattern entry, which "
                   "grows as T² per head like the model's own attention.")


def _why_analysis(sec, results):
    w, mem = sec["workload"], sec["memory"]
    m = w["multiple"]
    one, tok = mem["1x"], mem[f"{m}x_tokens"]
    return (f"With {m}× the tokens the analysis reads {tok['n_shards']} shard files instead of "
            f"{one['n_shards']}; every file holds the rows of the documents in that shard, and "
            f"reading concatenates all of them before the rows of one document are merged, so the "
            f"transient grows with the number of shards ({_mib(one['peak_over_baseline_bytes'])} → "
            f"{_mib(tok['peak_over_baseline_bytes'])} MiB over loaded) while the merged moments "
            f"do not ({one['n_documents']} → {tok['n_documents']} documents).")


def _why_gain(sec, results):
    return ("The fast path evaluates softmax(α·s) and five metrics for every α on every layer's "
            "score tensor, so its cost grows with α × heads × query × key, while the forward "
            "pass's attention is a small part of a 135M model's compute on short sequences. On the "
            "CPU each row is sorted once and every α is one compiled, vectorized pass over the keys "
            "down to e^-110 (`compiled.alpha_row_sums`: float64 exponentials from a polynomial, "
            "the sums and the top-mass count).")


def _why_memory(sec, results):
    r = sec["ratios"]
    text = (f"The capture's working memory (peak − loaded) is "
            f"{r['capture_over_loaded_vs_bridge_over_loaded']:.2f}× the bridge forward's. The row "
            f"metrics work in query blocks of at most 2¹⁸ entries, so their temporaries are small; "
            f"the capture keeps per-token results `[batch, layer, head, pos]` per metric and the "
            f"query/key norms, and the hooks hold each layer's pattern and scores while it runs. ")
    pinned = r.get("capture_vs_bridge_pinned_mmap_threshold")
    if pinned is not None:
        p = sec["single_batch_pinned_mmap_threshold"]
        most = pinned - 1 < 0.5 * (r["capture_vs_bridge"] - 1)
        extra = (p["capture"]["peak_over_baseline_bytes"] - p["bridge"]["peak_over_baseline_bytes"]) / MiB
        text += (f"{'Most of the excess is glibc keeping freed heap memory' if most else 'Allocator retention'}"
                 f": with `{sec['pinned_env']}` "
                 f"(large buffers always mmapped and returned on free) the capture's peak is "
                 f"{pinned:.2f}× the bridge's{' (within the target)' if pinned <= 1.2 else ''}, its "
                 f"working memory {p['capture']['peak_over_baseline_bytes'] / MiB:,.0f} MiB instead "
                 f"of {sec['single_batch']['capture']['peak_over_baseline_bytes'] / MiB:,.0f} MiB; the "
                 f"remaining {extra:,.0f} MiB over the bridge is the capture's live working set plus what retention is left. ")
    nk = sec["single_batch"].get("capture_numpy_kernels")
    if nk is not None:
        cap = sec["single_batch"]["capture"]
        text += (f"The compiled kernels' runtime (numba and LLVM, loaded by the warm-up call, so it "
                 f"is part of \"loaded\") adds {(cap['baseline_bytes'] - nk['baseline_bytes']) / MiB:,.0f} MiB "
                 f"to the process whatever the model or batch; with the NumPy kernels "
                 f"(`SPECTRA_LENS_NUMBA=0`, numba never imported) the capture peaks at "
                 f"{r['capture_numpy_kernels_vs_bridge']:.2f}× the bridge forward. ")
    text += ("Outside the library, `MALLOC_MMAP_THRESHOLD_` or jemalloc return freed buffers at "
             "once.")
    if "observe_pass_vs_hf" in r:
        text += (f" The pass `observe` runs ends at the last layer's pattern and computes no logits: "
                 f"it peaks at {r['observe_pass_vs_bridge']:.2f}× the bridge forward and "
                 f"{r['observe_pass_vs_hf']:.2f}× the bare HF forward, numba's runtime included.")
    return text


def _why_flat(sec, results):
    g = sec["corpus_growth"]
    peaks = ", ".join(f"{d['n_sequences']}: {d['peak_bytes'] / MiB:,.0f} MiB" for d in g)
    return (f"Peaks by number of sequences: {peaks}. A monotone rise would mean records accumulate "
            f"across shards; a rise that stops (or reverses) is the allocators (glibc's heap, "
            f"pyarrow's pool) settling after the first shards, not growth with the corpus.")


def _why(name: str, target: str):
    if name == "overhead":
        return _why_overhead
    if name == "scaling":
        return _why_long
    if name == "analysis":
        return _why_analysis if "memory" in target else None
    if name == "gain":
        return _why_gain
    if name == "memory":
        return _why_flat if "collect" in target else _why_memory
    return None


def render(results: dict, *, results_path: Path | None = None) -> str:
    meta = results["meta"]
    secs = results["sections"]
    parts = [
        "# Benchmarks",
        "",
        f"Generated by `{meta['command']}` from `{_rel(results_path)}`; do not edit by hand "
        f"(re-render with `python -m bench.report`). Benchmarks are not tests: nothing in "
        f"`tests/` asserts a time.",
        "",
        "## Machine",
        "",
        _machine(meta),
        "",
        _load_note(meta),
        "",
        "Ratios are the median over repetitions of (variant ÷ baseline) within the same "
        "repetition; variants are interleaved and their order rotates every repetition. The "
        "capture-overhead target is timed close together instead (section 1: quads of bridge, "
        "bridge, capture, capture, or the reverse, the second call of each kind timed). "
        "On CUDA every timed call ends with `torch.cuda.synchronize()`.",
        "",
        "## Targets",
        "",
        _targets(results),
        "",
    ]
    titles = {"overhead": "1. Capture overhead", "memory": "2. Memory", "gain": "3. Gain for every head",
              "exact": "4. Exact-mode sweeps: batched α vs one forward per α",
              "scaling": "5. Scaling with sequence length and batch size",
              "analysis": "6. Analysis: statistics from per-document moments"}
    render_fn = {"overhead": _overhead, "memory": _memory, "gain": _gain, "exact": _exact, "scaling": _scaling,
                 "analysis": _analysis}
    for name in titles:
        if name in secs:
            run = _run_line(secs[name])
            parts += [f"## {titles[name]}", ""] + ([run, ""] if run else []) + [render_fn[name](secs[name]), ""]
    parts += ["## Missed targets: why, and what would close the gap", "", _missed_all(results), ""]
    return "\n".join(parts)


def _missed_all(results: dict) -> str:
    out = []
    for name, sec in results["sections"].items():
        for t in sec.get("targets", []):
            if t["met"]:
                continue
            line = f"- **{t['name']}: {t['value']:.3f} (target ≤ {t['limit']}).**"
            why = _why(name, t["name"])
            if why is not None:
                line += " " + why(sec, results)
            out.append(line)
    return "\n".join(out) if out else "Every target was met in this run."


def _rel(p: Path | None) -> str:
    if p is None:
        return "bench/results.json"
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    src = Path(argv[0]) if argv else ROOT / "bench/results.json"
    dst = Path(argv[1]) if len(argv) > 1 else ROOT / "BENCHMARKS.md"
    dst.write_text(render(json.loads(src.read_text()), results_path=src))
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

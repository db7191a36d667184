"""Capture ÷ hook-free bridge forward over sequence length, in one process, side by side:

    python -m bench.lengths [--lengths 128 512 1024 2048 4096] [--threads 1] [--write]

For each length: one sequence of the default corpus; the bridge forward without hooks, the
observational capture (MetricCapture, every head, every metric) and the capture without
k_eff_top90, interleaved (the order rotates per repetition), each timed in wall-clock and in
process CPU time. Ratios are medians of the per-repetition ratios, so machine load that changes
between repetitions cancels as far as it can; CPU-time ratios are the steadier ones on a shared
machine. Results go to bench/lengths.json; `--write` also replaces the section between the
markers in BENCHMARKS.md.
"""

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench.lengths begin -->", "<!-- bench.lengths end -->"


def measure(lengths: list[int], reps_short: int = 2) -> dict:
    from spectra_lens import corpus as C
    from spectra_lens.hooks import MetricCapture, attached
    from spectra_lens.layout import attention_layout
    from spectra_lens.models import load_model

    model = load_model()
    layout = attention_layout(model)
    device = next(model.parameters()).device

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    text = C.default_corpus()
    rows = []
    for n in lengths:
        x = C.tokenize_corpus(text, model.tokenizer, seq_len=n, max_sequences=1)[:1].to(device)

        def forward(x=x):
            with torch.no_grad():
                model(x, return_type=None)

        def capture(top: bool, x=x):
            cap = MetricCapture(layout, top_mass=0.9 if top else None)

            def run():
                with torch.no_grad(), attached(model, cap, layout=layout):
                    model(x, return_type=None)
                cap.result()

            return run

        variants = {"bridge_forward": forward, "capture": capture(True), "capture_without_top90": capture(False)}
        if n <= 512:  # warm-up where it is cheap
            for f in variants.values():
                f()
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        reps = reps_short if n <= 1024 else 1
        names = list(variants)
        for r in range(reps):
            for k in names[r % 3:] + names[: r % 3]:
                sync()
                w0, c0 = time.perf_counter(), time.process_time()
                variants[k]()
                sync()
                times[k].append((time.perf_counter() - w0, time.process_time() - c0))
        row = {"seq_len": n, "reps": reps, "load_after": os.getloadavg()[0],
               **{f"{k}_s": [t[0] for t in v] for k, v in times.items()},
               **{f"{k}_cpu_s": [t[1] for t in v] for k, v in times.items()}}
        for k in ("capture", "capture_without_top90"):
            pairs = list(zip(times[k], times["bridge_forward"]))
            row[f"{k}_vs_bridge"] = statistics.median(a[0] / b[0] for a, b in pairs)
            row[f"{k}_vs_bridge_cpu"] = statistics.median(a[1] / b[1] for a, b in pairs)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_s")}), file=sys.stderr, flush=True)
    return {"command": "python -m bench.lengths " + " ".join(sys.argv[1:]), "device": str(device),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "rows": rows}


def markdown(res: dict) -> str:
    lines = [
        BEGIN,
        "## 6. Capture over sequence length (`python -m bench.lengths`)",
        "",
        f"Command: `{res['command']}`, started {res['started']}, torch threads {res['threads']} on "
        f"{res['cores']} cores. One sequence per length; bridge forward, capture and capture without "
        "k_eff_top90 interleaved in the same process; ratios are medians of per-repetition ratios. "
        "The CPU is shared: wall-clock ratios are noisy, the process-CPU-time ratios are the steadier.",
        "",
        "| seq_len | reps | bridge s | capture ÷ bridge (wall) | (CPU time) | no top90 ÷ bridge (wall) | (CPU time) | load avg after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['seq_len']} | {r['reps']} | {statistics.median(r['bridge_forward_s']):.2f} | "
            f"{r['capture_vs_bridge']:.2f}× | {r['capture_vs_bridge_cpu']:.2f}× | "
            f"{r['capture_without_top90_vs_bridge']:.2f}× | {r['capture_without_top90_vs_bridge_cpu']:.2f}× | "
            f"{r['load_after']:.1f} |")
    lines += ["", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lengths", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench" / "lengths.json"))
    p.add_argument("--write", action="store_true", help="replace the section in BENCHMARKS.md")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    res = measure(args.lengths)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    print(md)
    if args.write:
        path = ROOT / "BENCHMARKS.md"
        text = path.read_text()
        if BEGIN in text and END in text:
            text = text[: text.index(BEGIN)] + md + text[text.index(END) + len(END):]
        else:
            text = text.rstrip("\n") + "\n\n" + md + "\n"
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

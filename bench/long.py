"""Long contexts: time and peak memory of the blocked capture against the hook-free SDPA forward.

    python bench/long.py [--lengths 2048 4096 8192] [--threads 1] [--device cuda] [--model NAME]

Each (kind, length) runs in a fresh process under `/usr/bin/time -v` (peak RSS: "Maximum
resident set size", the whole process: Python, torch, the weights and the pass), batch 1, on
the default model (or `--model`, any spec `models.load_model` takes, e.g.
Qwen2.5-Coder-0.5B-Instruct) and the first `length` tokens of CPython's documentation text
(`pydoc_data.topics`). Kinds:

* "load_hf" / "load_bridge": load the Hugging Face model (as "sdpa" does) / the bridge (as
  "blocked" does) and run the 64-token warm-up only: the floor of each;
* "sdpa": the Hugging Face model with `attn_implementation="sdpa"`, no hooks, no grad,
  logits of the last position only (`logits_to_keep=1`);
* "blocked": `blocked_capture.BlockedCapture` on every layer and head (all 16 metrics,
  k_eff_top90 included), the pass ending after the last layer's attention;
* "blocked_notop": the same with `top_mass=None` (no top-mass count; k_eff_top90 NaN).

Each timed call follows a 64-token warm-up in the same process. Besides its wall time the table
gives its CPU time (`time.process_time()`, all threads of the process): on cores shared with other
jobs the wall time of a one-thread run grows with their load, its CPU time much less, so the CPU
ratio is the steadier one there. With `--device cuda` the model
and tokens live on the GPU, the timed call is synchronized, and the table adds the peak GPU
memory of the process (`torch.cuda.max_memory_allocated`: weights, warm-up and the pass). The table's ratios come from
one run of this script. Timings on a shared machine vary: say how many cores were free.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

KINDS = ("load_hf", "load_bridge", "sdpa", "blocked", "blocked_notop")


def _tokens(tokenizer, n: int):
    from pydoc_data.topics import topics

    import torch

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n]
    if ids.shape[1] < n:
        raise SystemExit(f"the text has only {ids.shape[1]} tokens, {n} asked")
    return ids.to(torch.long)


def one(kind: str, length: int, threads: int, device: str = "cpu", model_spec: str | None = None) -> dict:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    from spectra_lens.models import load_hf, load_model

    if kind in ("sdpa", "load_hf"):
        model, tok = load_hf(model_spec, device=device)
        model.set_attn_implementation("sdpa")

        def run(ids):
            with torch.no_grad():
                model(ids, logits_to_keep=1)
    else:
        from spectra_lens.blocked_capture import BlockedCapture
        from spectra_lens.layout import attention_layout

        model = load_model(model_spec, device=device)
        tok = model.tokenizer
        layout = attention_layout(model)
        cap = BlockedCapture(layout, top_mass=None if kind == "blocked_notop" else 0.9)

        def run(ids):
            cap.run(model, ids)
    ids = _tokens(tok, length).to(device)
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    run(ids[:, :64])
    sync()
    out = {"kind": kind, "length": length, "seconds": 0.0}
    if not kind.startswith("load"):
        t0, c0 = time.perf_counter(), time.process_time()
        run(ids)
        sync()
        out["seconds"] = time.perf_counter() - t0
        out["cpu_seconds"] = time.process_time() - c0
    if cuda:
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def measure(kind: str, length: int, threads: int, device: str = "cpu", model_spec: str | None = None) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--one", kind, str(length), "--threads", str(threads),
           "--device", device] + (["--model", model_spec] if model_spec else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{kind} at {length} failed:\n{p.stderr[-3000:]}")
    got = json.loads(p.stdout.strip().splitlines()[-1])
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    got["peak_rss_mib"] = int(rss.group(1)) / 1024 if rss else float("nan")
    return got


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--device", default="cpu", help="torch device of the model and tokens, e.g. cuda")
    ap.add_argument("--model", default=None, help="model spec (models.load_model); default: the embedded model")
    ap.add_argument("--one", nargs=2, metavar=("KIND", "LENGTH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.threads, args.device, args.model)))
        return
    rows = {}
    for length in args.lengths:
        for kind in args.kinds:
            if kind.startswith("load") and length != args.lengths[0]:
                continue
            print(f"running {kind} at {length} tokens ({time.strftime('%H:%M:%S')}; a long pass prints "
                  f"nothing until it ends)", file=sys.stderr, flush=True)
            r = measure(kind, length, args.threads, args.device, args.model)
            rows[(kind, length)] = r
            print(json.dumps(r), file=sys.stderr, flush=True)
    floors = ", ".join(f"{k}: {rows[(k, args.lengths[0])]['peak_rss_mib']:.0f} MiB"
                       for k in ("load_hf", "load_bridge") if (k, args.lengths[0]) in rows)
    print(f"{args.model or 'default model'} on {args.device}, batch 1, {args.threads} thread(s); peak RSS of the whole process "
          f"(load + 64-token warm-up alone: {floors or 'not measured'})")
    gpu = args.device.startswith("cuda")
    head = (f"{'tokens':>7} {'kind':>14} {'time s':>9} {'CPU s':>9} {'peak MiB':>9} {'time/sdpa':>10} "
            f"{'CPU/sdpa':>9} {'RSS/sdpa':>9}")
    print(head + (f" {'GPU MiB':>9} {'GPU/sdpa':>9}" if gpu else ""))
    for length in args.lengths:
        base = rows.get(("sdpa", length))
        for kind in args.kinds:
            r = rows.get((kind, length))
            if r is None or kind.startswith("load"):
                continue
            tr = r["seconds"] / base["seconds"] if base else float("nan")
            cr = r["cpu_seconds"] / base["cpu_seconds"] if base else float("nan")
            mr = r["peak_rss_mib"] / base["peak_rss_mib"] if base else float("nan")
            line = (f"{length:>7} {kind:>14} {r['seconds']:>9.2f} {r['cpu_seconds']:>9.2f} {r['peak_rss_mib']:>9.0f} "
                    f"{tr:>10.2f} {cr:>9.2f} {mr:>9.2f}")
            if gpu:
                g = r["peak_gpu_mib"] / base["peak_gpu_mib"] if base else float("nan")
                line += f" {r['peak_gpu_mib']:>9.0f} {g:>9.2f}"
            print(line)


if __name__ == "__main__":
    main()

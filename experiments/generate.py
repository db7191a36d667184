"""`spectra-lens generate`: a prompt continued with and without head scalings, side by side, and
the per-token log-probability differences (`spectra_lens.generate.compare_generations`)."""

from __future__ import annotations

import pandas as pd

from spectra_lens.generate import MODES, GenerationDiff, compare_generations, parse_scale, scalings
from spectra_lens.layout import attention_layout

__all__ = ["command"]


def _format(diff: GenerationDiff) -> str:
    d = diff.diverge_at
    head = f"{diff.mode}" + (f" (seed {diff.seed}, temperature {diff.temperature:g}"
                             + (f", top-k {diff.top_k}" if diff.top_k else "") + ")"
                             if diff.mode == "sample" else "")
    lines = [f"== {head}", f"  plain : {diff.base.text!r}", f"  scaled: {diff.scaled.text!r}"]
    if d is None:
        lines.append("  identical continuations")
    else:
        def piece(c):
            return repr(c.pieces[d]) if d < len(c.pieces) else "(ended)"

        lines.append(f"  first difference at generated token {d}: plain {piece(diff.base)} vs "
                     f"scaled {piece(diff.scaled)}")
    frame = diff.frame()[["step", "same_so_far", "base_text", "base_delta_logprob", "scaled_text",
                          "scaled_delta_logprob"]]
    frame = frame.rename(columns={"base_text": "plain token", "base_delta_logprob": "Δlog p (plain)",
                                  "scaled_text": "scaled token", "scaled_delta_logprob": "Δlog p (scaled)"})
    lines.append("  Δlog p = log p_scaled − log p_plain of each token, same prefix")
    lines.append("\n".join("  " + s for s in frame.to_string(index=False, float_format=lambda v: f"{v:+.3f}").splitlines()))
    return "\n".join(lines)


def command(cfg, *, progress: bool = True) -> int:
    """`spectra-lens generate` (a `config.GenerateConfig`): print both continuations and the
    per-token log-probability differences. SpectraError for bad input."""
    import time

    from spectra_lens.models import load_model

    args = cfg
    specs = [parse_scale(s) for s in args.scale]  # bad --scale fails before the model loads
    if args.csv:  # an existing file is refused before the model loads
        from spectra_lens.io import check_new_file

        check_new_file(args.csv, overwrite=args.overwrite, option="--csv")
    t0 = time.perf_counter()
    model = load_model(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map,
                       progress=progress)
    layout = attention_layout(model)
    items = scalings(specs, layout, kind=args.kind)
    modes = MODES if args.mode == "both" else (args.mode,)
    t1 = time.perf_counter()
    out = compare_generations(model, args.prompt, items, modes=modes,
                              max_new_tokens=args.max_new_tokens, seed=args.seed,
                              temperature=args.temperature, top_k=args.top_k,
                              stop_at_eos=args.eos_stop, progress=progress)
    t2 = time.perf_counter()
    print(f"model: {args.model or 'SmolLM2-135M-Instruct (embedded default)'}")
    print(f"scalings ({args.kind}): {', '.join(out[modes[0]].interventions) or 'none (plain model in both rows)'}")
    if args.kind == "k":
        for it in items:
            print(f"  kv head {it.kv_head} of layer {it.layer} is read by query heads {list(layout.heads_of_kv(it.kv_head))}")
    print(f"prompt: {args.prompt!r}")
    for diff in out.values():
        print(_format(diff))
    if args.csv:
        from spectra_lens.io import atomic_write

        frame = pd.concat([d.frame() for d in out.values()], ignore_index=True)
        atomic_write(args.csv, lambda tmp: frame.to_csv(tmp, index=False))
        print(f"wrote {args.csv}")
    print(f"load {t1 - t0:.1f} s, generate {t2 - t1:.1f} s")
    return 0

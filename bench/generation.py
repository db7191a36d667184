"""The first library call and generation on the default model: `python -m bench.generation`.

    python -m bench.generation [--tokens 20] [--reps 2] [--threads N] [--out bench/generation.json]

Measures, in this one process (the layout cache is empty at the start):

  first call   `capture_metrics(model, "hello")` right after `load_model()`: the attention
               layout's probe (derived on first use) plus one capture; then the same call again
  generation   `compare_generations` of one prompt, greedy and sampled, plain and scaled rows
               (4 rows × `--tokens` tokens, a QueryScale on L15H3 active), with the key/value
               cache and without it (a full forward pass per token); the variants alternate
               repetition by repetition. Tokens per second count the generated tokens of all
               4 rows; the time includes the one teacher-forced scoring pass both variants run.
               The cached and uncached continuations must be identical (checked).
  decoding     the greedy decoding loop alone (`KVDecoder`, 4 rows, the same QueryScale), cached
               and uncached, from the same short prompt and from a `--long-prompt`-token prompt
               (the default corpus's text): tokens per second of decoding without the scoring
               pass. A cached step costs about the same at any context length here; an
               uncached one grows with it, so the ratio grows with the prompt.

Writes the numbers as JSON (`--out`) and prints them. Timings depend on the machine's load:
the JSON records the load average before and after.
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

PROMPT = "The history of the printing press begins"


def _time(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def n_generated_decode(args) -> int:
    return 4 * args.tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--long-prompt", type=int, default=128, help="tokens of the longer prompt")
    ap.add_argument("--out", default=str(Path(__file__).with_name("generation.json")))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from spectra_lens.capture import capture_metrics
    from spectra_lens.generate import compare_generations
    from spectra_lens.interventions import QueryScale
    from spectra_lens.models import load_model

    load0 = os.getloadavg()
    t_load, model = _time(load_model)
    t_first, _ = _time(lambda: capture_metrics(model, "hello"))
    t_second, _ = _time(lambda: capture_metrics(model, "hello"))
    print(f"load {t_load:.1f} s; first capture_metrics(model, 'hello') {t_first:.2f} s "
          f"(layout probe included), second {t_second:.2f} s", flush=True)

    items = [QueryScale(15, 3, 2.0)]

    def run(cache: bool):
        return compare_generations(model, PROMPT, items, max_new_tokens=args.tokens, seed=0,
                                   stop_at_eos=False, use_cache=cache)

    times: dict[str, list[float]] = {"cached": [], "uncached": []}
    outputs = {}
    for rep in range(args.reps):
        for name, cache in (("cached", True), ("uncached", False)):
            s, out = _time(lambda cache=cache: run(cache))
            times[name].append(s)
            outputs[name] = {m: (d.base.tokens, d.scaled.tokens) for m, d in out.items()}
            print(f"rep {rep} {name}: {s:.2f} s", flush=True)
    same = outputs["cached"] == outputs["uncached"]

    from spectra_lens.capture import attached
    from spectra_lens.data.corpus import default_corpus
    from spectra_lens.generate import KVDecoder

    text = " ".join(doc for _, doc in zip(range(20), default_corpus()))
    prompts = {"short": model.to_tokens(PROMPT)[0],
               "long": model.to_tokens(text)[0, : args.long_prompt]}
    alpha = torch.tensor([1.0, 2.0, 1.0, 2.0])

    def decode(prompt, cache: bool):
        with torch.no_grad(), attached(model, QueryScale(15, 3, alpha)), \
                KVDecoder(model, use_cache=cache) as dec:
            logits = dec.step(prompt.repeat(4, 1))
            for _ in range(args.tokens - 1):
                logits = dec.step(logits.argmax(-1)[:, None])
            return dec.seqs[:, prompt.numel():].tolist() + [logits.argmax(-1).tolist()]

    decoding = {}
    for label, prompt in prompts.items():
        dt: dict[str, list[float]] = {"cached": [], "uncached": []}
        toks = {}
        for _rep in range(args.reps):
            for name, cache in (("cached", True), ("uncached", False)):
                s, toks[name] = _time(lambda cache=cache, prompt=prompt: decode(prompt, cache))
                dt[name].append(s)
        m = {k: statistics.median(v) for k, v in dt.items()}
        decoding[label] = {"prompt_tokens": int(prompt.numel()), "seconds": dt, "median_s": m,
                           "tokens_per_s": {k: n_generated_decode(args) / v for k, v in m.items()},
                           "speedup": m["uncached"] / m["cached"],
                           "identical": toks["cached"] == toks["uncached"]}
        same = same and decoding[label]["identical"]
        print(f"decoding, {label} prompt ({prompt.numel()} tokens), 4 rows × {args.tokens}: cached "
              f"{m['cached']:.2f} s ({n_generated_decode(args) / m['cached']:.1f} tokens/s), uncached "
              f"{m['uncached']:.2f} s ({n_generated_decode(args) / m['uncached']:.1f} tokens/s), "
              f"{m['uncached'] / m['cached']:.1f}×; identical: {decoding[label]['identical']}", flush=True)
    n_generated = 4 * args.tokens
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__,
                    "loadavg_before": load0, "loadavg_after": os.getloadavg()},
        "first_call": {"load_s": t_load, "first_capture_s": t_first, "second_capture_s": t_second},
        "generation": {
            "prompt": PROMPT, "rows": 4, "new_tokens_per_row": args.tokens, "reps": args.reps,
            "seconds": times, "median_s": med,
            "tokens_per_s": {k: n_generated / v for k, v in med.items()},
            "speedup": med["uncached"] / med["cached"],
            "identical_continuations": outputs["cached"] == outputs["uncached"],
        },
        "decoding": decoding,
    }
    print(f"generation, {n_generated} tokens (4 rows × {args.tokens}): cached {med['cached']:.2f} s "
          f"({n_generated / med['cached']:.1f} tokens/s), uncached {med['uncached']:.2f} s "
          f"({n_generated / med['uncached']:.1f} tokens/s), {med['uncached'] / med['cached']:.1f}×; "
          f"identical continuations: {same}")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())

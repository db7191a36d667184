"""One HTML page for one head (`spectra_lens.present.head_page`), from the command line.

    spectra-lens head L15H8 [--out results/heads] [--model M] [--corpus C] [--n-sequences 8]
        [--seq-len 64] [--types head_types.csv] [--agreement agreement.csv] [--alphas 0.5 2]
        [--prompt TEXT] [--max-new-tokens 16]

Writes `OUT/L15H8.html` (self-contained: plotly.js inline). The text sequences come from the
corpus (default: the CPython reference docs), the head-type scores from --types when given (a
`spectra-lens head-types` table; else this head's scores are measured on the same text), the
observational slope and causal gain from --agreement when it has a row for the head (else they
are computed on the text). `spectra-lens report RESULTS` links each head of its tables to
`RESULTS/heads/L{l}H{h}.html` when that page exists.
"""

import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

from spectra_lens.config import HeadPageConfig
from spectra_lens.errors import SpectraError
from spectra_lens.models import DEFAULT_MODEL
from spectra_lens.present.head_page import HeadPage, head_page
from spectra_lens.runs import pipeline as P
from spectra_lens.validate import HeadRef

__all__ = ["command", "run"]


def _table(path: str | None, flag: str) -> pd.DataFrame | None:
    if path is None:
        return None
    try:
        return pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise SpectraError(f"{flag} {path!r} is not a readable CSV ({type(e).__name__}: {e})") from e


def run(cfg: HeadPageConfig, *, model=None, tokens=None, progress: bool = False) -> tuple[HeadPage, Path]:
    """Measure the head of `cfg` and write its page into `cfg.out`: (page, path)."""
    cfg.validate()
    layer, head = HeadRef.parse(cfg.head)
    types, agreement = _table(cfg.types, "--types"), _table(cfg.agreement, "--agreement")
    model, name = P.load_run_model(cfg, model, progress=progress)
    # no heads are chosen here: every text sequence is measured (n_select = 0)
    spec = SimpleNamespace(corpus=cfg.corpus, seq_len=cfg.seq_len, n_sequences=cfg.n_sequences, n_select=0)
    text = P.load_run_tokens(spec, model, tokens).measure
    torch.manual_seed(0)
    page = head_page(model, layer, head, text=text, prompt=cfg.prompt, alphas=cfg.alphas, types=types,
                     agreement=agreement, max_new_tokens=cfg.max_new_tokens,
                     model_name=name if cfg.model else DEFAULT_MODEL, progress=progress)
    return page, page.write(cfg.out)


def command(cfg: HeadPageConfig, *, progress: bool = True) -> int:
    """`spectra-lens head`: write the page, print its label, estimates and generation diffs."""
    t0 = time.time()
    page, path = run(cfg, progress=progress)
    print(f"{HeadRef(page.layer, page.head)}: {page.label}; " + "; ".join(
        f"{r.estimate} {r.value:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}] ({r.source})"
        for r in page.estimates.itertuples()))
    for a, g in page.generations.items():
        d = g.diverge_at
        print(f"α = {a:g}: " + ("identical greedy continuation" if d is None else
                                f"greedy continuation diverges at generated token {d}"))
    print(f"wrote {path} in {time.time() - t0:.0f} s")
    return 0


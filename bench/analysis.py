"""The observational analysis from per-document moments, at the default run's size.

The analysis (statistics from `moments/shard_XXXXX.npz`, no model) costs what the moments'
shapes say: documents × heads × variables² and the number of bootstrap resamples; the token
values do not change its work. `write_moments` therefore writes shard files of the default
run's shape without a model: the document id of every sequence from the default corpus as
`data.prepare.prepare` cuts it, 270 heads (30 layers × 9, the default model), every variable the
capture stores (`stats.MOMENT_VARIABLES`), moments formed by `DocumentMoments.from_tokens`
from synthetic token values batch by batch, one file per shard, as `collect` writes them.

`multiple` scales the corpus: `tokens` = more sequences of the same documents (each document
cut into more chunks), `documents` = more documents of the same size.
"""

import time
import warnings
from pathlib import Path

import numpy as np

N_LAYERS, N_HEADS = 30, 9  # the default model


def default_documents(n_sequences: int, seq_len: int) -> np.ndarray:
    """The document of every sequence of the default run (`prepare` with the default corpus)."""
    from spectra_lens.data.corpus import default_corpus, tokenize_documents
    from spectra_lens.models import load_tokenizer

    tok = tokenize_documents(default_corpus(), load_tokenizer(), seq_len=seq_len,
                             max_sequences=n_sequences)
    return np.asarray(tok.documents, dtype=np.int64)


def scaled_documents(documents: np.ndarray, multiple: int, grow: str) -> np.ndarray:
    """`documents` for `multiple` × the tokens: `grow`="tokens" repeats every sequence's
    document (same documents, more sequences each), "documents" adds new document ids."""
    if grow == "tokens":
        return np.repeat(documents, multiple)
    if grow == "documents":
        span = int(documents.max()) + 1
        return np.concatenate([documents + k * span for k in range(multiple)])
    raise ValueError(f"grow must be 'tokens' or 'documents'; got {grow!r}")


def write_moments(directory: Path, documents: np.ndarray, *, seq_len: int, shard_size: int,
                  batch: int, min_position: int = 1, seed: int = 0) -> list[Path]:
    """One `moments/shard_XXXXX.npz` per shard of `shard_size` sequences (see module doc)."""
    from spectra_lens.stats.moments import MOMENT_VARIABLES, DocumentMoments

    rng = np.random.default_rng(seed)
    variables = MOMENT_VARIABLES
    n_var, n_pos = len(variables), seq_len - min_position
    heads = N_LAYERS * N_HEADS
    layers = np.repeat(np.arange(N_LAYERS), N_HEADS)
    head_ids = np.tile(np.arange(N_HEADS), N_LAYERS)
    ix, iy, ip = (variables.index(v) for v in ("log_q_norm", "entropy", "log_position"))
    log_pos = np.log1p(np.arange(min_position, seq_len, dtype=np.float64))
    out = []
    directory = Path(directory)
    for shard, start in enumerate(range(0, len(documents), shard_size)):
        parts = []
        for b0 in range(start, min(start + shard_size, len(documents)), batch):
            docs = documents[b0:min(b0 + batch, start + shard_size, len(documents))]
            v = rng.standard_normal((len(docs), heads, n_pos, n_var), dtype=np.float32)
            v = v.astype(np.float64)
            v[..., iy] -= 0.3 * v[..., ix]  # a negative query-norm association, as in the model
            v[..., ip] = log_pos
            valid = np.ones(v.shape[:3], dtype=bool)
            parts.append(DocumentMoments.from_tokens(
                v, valid, docs, layers=layers, heads=head_ids, variables=variables,
                meta={"min_position": min_position}))
        path = directory / "moments" / f"shard_{shard:05d}.npz"
        DocumentMoments.concat(parts).save(path)
        out.append(path)
    return out


def analyze(paths: list[Path], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """What the observational run does after capture, without the model: read the shards'
    moments (`observational.read_moments`) and compute its tables (`observational.analyze`,
    the run's configuration but `n_boot`, no finite-difference gain)."""
    from spectra_lens.experiments import observational as obs

    from spectra_lens.config import ObservationalConfig

    cfg = ObservationalConfig(n_boot=n_boot, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t0 = time.perf_counter()
        moments = obs.read_moments(paths)
        t1 = time.perf_counter()
        tables = obs.analyze(moments, cfg)
        t2 = time.perf_counter()
    return {"read_s": t1 - t0, "analyze_s": t2 - t1,
            "n_documents": moments.n_documents, "n_heads": int(moments.layers.size),
            "tokens_per_head": int(moments.n.sum()) // int(moments.layers.size),
            "n_variables": len(moments.variables), "n_shards": len(paths),
            "n_rows": len(tables["head_summary"])}


def head_statistics_seconds(paths: list[Path], *, n_boot: int = 1000, seed: int = 0) -> float:
    """Seconds of `stats.head_statistics` alone on the same moments (the largest step)."""
    from spectra_lens.experiments import observational as obs

    from spectra_lens.stats.decisions import head_statistics

    moments = obs.read_moments(paths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t0 = time.perf_counter()
        head_statistics(moments, n_boot=n_boot, seed=seed)
    return time.perf_counter() - t0

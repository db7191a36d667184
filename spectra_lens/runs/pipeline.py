"""The pipeline every experiment run shares, from its configuration to its written outputs.

* `begin_run`: check what needs no model (config, corpus, --out), lock the run directory
  (`runs.rundir.RunDir`), load the model and the tokens, check the heads and the context against
  the model, then write the first manifest; a failure inside marks the run "failed";
* `load_run_model` / `model_info`, `load_run_tokens` / `RunTokens`: the model and the sequences of
  a run (measured ones and the held-out ones that choose default heads);
* what a run writes is declared and written by `spectra_lens.runs.outputs`;
* `read_shares`: the finished shares of a run computed in several jobs, checked to share one
  configuration, and the configuration of their merged run.

Experiment-specific steps (which heads to study, what to compute) stay in the experiments.
"""

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spectra_lens.causal import MIN_MEASURE_DOCUMENTS
from spectra_lens.data.corpus import tokenize_corpus
from spectra_lens.data.prepare import corpus_from_spec
from spectra_lens.data.shards import ShardManifest, load_tokens
from spectra_lens.errors import SpectraError
from spectra_lens.layout import AttentionLayout, attention_layout
from spectra_lens.models import DEFAULT_MODEL, load_model, resolve_device, weights_info
from spectra_lens.runs.rundir import NOT_RESULT_FIELDS, RunDir
from spectra_lens.validate import check_alphas, check_context, check_vocab

__all__ = [
    "RunSetup",
    "RunTokens",
    "begin_run",
    "check_layer_head",
    "load_run_model",
    "load_run_tokens",
    "merged_config",
    "model_info",
    "provenance",
    "read_shares",
    "run_directory",
    "split_by_document",
    "timed",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- run directory


@contextlib.contextmanager
def run_directory(cfg, experiment: str, *, inputs=()) -> Iterator[RunDir]:
    """The run directory of `cfg.out`, checked (nothing written) and locked for the block.

    Load the model, check what needs it, then `rd.start(cfg, overwrite=cfg.overwrite)` writes
    the first manifest; a failure after that marks the run "failed" (Ctrl-C: "interrupted").
    `inputs` are directories the run reads (prepared shards): they must not lie in `cfg.out`.
    """
    rd = RunDir(cfg.out, experiment)
    rd.check(cfg, overwrite=cfg.overwrite, inputs=inputs)
    with rd:
        yield rd


@contextlib.contextmanager
def timed(rd: RunDir | None, name: str) -> Iterator[None]:
    """Add the block's wall time to `rd.timings[name]`."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if rd is not None:
            rd.timed(name, time.perf_counter() - t0)


# --------------------------------------------------------------------------- a run's frame


@dataclass(frozen=True)
class RunSetup:
    """What every causal run starts from: its directory, model, layout and tokens."""

    rd: RunDir
    model: object
    model_name: str  # recorded in the manifest
    layout: AttentionLayout
    tokens: "RunTokens"


@contextlib.contextmanager
def begin_run(cfg, experiment: str, *, model=None, tokens: torch.Tensor | None = None,
              progress: bool = False) -> Iterator[RunSetup]:
    """The frame of a causal run, for a `with` block.

    Checks everything that needs no model before anything is written (the config, the corpus,
    `--out`), locks the run directory, loads the model and the tokens and checks the heads and
    the context length against the model; only then is the manifest written ("running"). A
    failure inside the block marks the run "failed" with the error, and the lock is released on
    every exit. `progress`: a bar over the model's loading stages.
    """
    cfg.validate()
    if hasattr(cfg, "alphas"):
        check_alphas(cfg.alphas)
    source = corpus_from_spec(cfg.corpus) if tokens is None else None  # a missing file: now
    inputs = [source.directory] if isinstance(source, ShardManifest) else []
    with run_directory(cfg, experiment, inputs=inputs) as rd:
        with timed(rd, "load_model_s"):
            model, model_name = load_run_model(cfg, model, progress=progress)
            layout = attention_layout(model)
        check_context(model, cfg.seq_len if tokens is None else tokens.shape[-1])
        _check_given_heads(cfg, layout)
        with timed(rd, "tokens_s"):
            run_tokens = load_run_tokens(cfg, model, tokens)
        rd.start(cfg, overwrite=cfg.overwrite)
        torch.manual_seed(cfg.seed)
        yield RunSetup(rd, model, model_name, layout, run_tokens)


def _check_given_heads(cfg, layout: AttentionLayout) -> None:
    """The layers and heads the config names exist in the model (before any file is written)."""
    if not hasattr(cfg, "target_layer"):
        return
    t_layer = cfg.target_layer if cfg.target_layer is not None else layout.n_layers // 2
    check_layer_head(layout, t_layer, cfg.target_head or 0, "target")
    if hasattr(cfg, "control_head"):
        c_layer = t_layer if cfg.control_layer is None else cfg.control_layer
        check_layer_head(layout, c_layer, cfg.control_head or 0, "control")


def provenance(setup: RunSetup, choice, seed: int) -> dict:
    """The manifest fields every causal run records: model, corpus, sizes, head selection
    (`choice.as_dict()`), seed."""
    t = setup.tokens
    return dict(
        model=model_info(setup.model_name, setup.layout, setup.model), corpus=t.corpus,
        n_sequences=int(t.measure.shape[0]), seq_len=int(t.measure.shape[1]),
        selection={**choice.as_dict(), "held_out": t.held_out, "n_select": int(t.select.shape[0]),
                   **({"split": t.split} if t.split is not None else {})},
        seed=seed,
    )


# --------------------------------------------------------------------------- model and tokens


def load_run_model(cfg, model=None, *, device: str | None = None,
                   progress: bool = False) -> tuple[object, str]:
    """(bridge, name recorded in the manifest): `model` as given, else `cfg.model` loaded with
    the config's device options (`config.DeviceOptions`); `device` overrides `cfg.device` (the
    device of one rank of a distributed run)."""
    if model is not None:
        name = cfg.model or f"pre-loaded model ({getattr(model.cfg, 'model_name', '?')})"
        return model, name
    bridge = load_model(cfg.model, dtype=cfg.dtype, device=resolve_device(device or cfg.device),
                        device_map=getattr(cfg, "device_map", None), progress=progress,
                        derive_layout=True)  # every run measures next: probed under the bar
    return bridge, cfg.model or DEFAULT_MODEL


def model_info(name: str, layout: AttentionLayout, model=None) -> dict:
    """The manifest's model fields: spec, shape, effective hooks, bilinearity, and the weights'
    source and quantization (`models.weights_info`: the default is a dequantized Q4_1 GGUF)."""
    spec = None if name == DEFAULT_MODEL else model if name.startswith("pre-loaded model") else name
    return {
        "spec": name, "weights": weights_info(spec, model), "n_layers": layout.n_layers, "n_heads": layout.n_heads,
        "n_kv_heads": layout.n_kv_heads, "d_head": layout.d_head, "q_hook": layout.q_kind,
        "k_hook": layout.k_kind, "scores_faithful": layout.scores_faithful,
        "non_bilinear_layers": {l: layout.q_reason[l] for l in range(layout.n_layers)
                                if not layout.q_bilinear[l]},
    }


@dataclass(frozen=True, repr=False)
class RunTokens:
    """The measured sequences and the held-out sequences that choose default heads."""

    measure: torch.Tensor  # [n_sequences, seq_len]
    select: torch.Tensor  # [n_select, seq_len]; the measured tokens when none were held out
    held_out: bool  # True when `select` comes from documents disjoint from `measure`'s
    corpus: str  # description recorded in the manifest
    measure_documents: object = None  # one document id per measured sequence; None: each its own
    select_documents: object = None  # the same for `select`
    split: dict | None = None  # the document ids and corpus sequence indices of each side (manifest)

    def __repr__(self) -> str:
        return (f"RunTokens(measure={tuple(self.measure.shape)}, select={tuple(self.select.shape)}, "
                f"held_out={self.held_out}, corpus={self.corpus!r})")


def load_run_tokens(cfg, model, tokens: torch.Tensor | None = None) -> RunTokens:
    """Tokens of a run: `tokens` as given (then the selection uses the same tokens, `held_out`
    False), else `cfg.n_select` sequences of `cfg.corpus` that choose default heads and
    `cfg.n_sequences` measured ones, from disjoint documents (`split_by_document`: the corpus's
    first documents choose, the later ones are measured); `split` records each side's document
    ids and sequence indices for the manifest. With `n_select` > 0, fewer than
    `causal.MIN_MEASURE_DOCUMENTS` measured documents is refused (SpectraError).

    A corpus is tokenized with `corpus.tokenize_documents` (sequences never span documents,
    drawn round-robin across documents), so the measured sample comes from many documents and
    every sequence carries its document id (`measure_documents`, `select_documents`: the unit of
    the intervals). Prepared shards give the ids their manifest records (None for old ones)."""
    vocab = int(model.cfg.d_vocab)
    if tokens is not None:
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.dtype.is_floating_point:
            raise SpectraError(f"tokens must be an integer tensor [batch, pos], got {tokens!r:.80}")
        check_vocab(tokens, vocab, "the tokens passed in")
        return RunTokens(tokens.long(), tokens.long(), False, "tokens passed by the caller")
    n, n_sel = cfg.n_sequences, cfg.n_select
    source = corpus_from_spec(cfg.corpus)
    sel = meas = np.zeros(0, dtype=int)
    if isinstance(source, ShardManifest):
        if source.seq_len != cfg.seq_len:
            raise SpectraError(
                f"shards in {source.directory} have seq_len {source.seq_len}; expected "
                f"--seq-len {cfg.seq_len} (pass --seq-len {source.seq_len})"
            )
        all_tokens = load_tokens(source)
        docs = source.documents_of(0, source.n_sequences)
        all_docs = None if docs is None else np.asarray(docs)
        description = source.corpus or str(source.directory)
        sel, meas = split_by_document(all_docs, len(all_tokens), n_sel, n)
    else:
        if model.tokenizer is None:
            raise SpectraError("the model has no tokenizer; pass --corpus as a prepared shard directory")
        prepend = getattr(model.cfg, "default_prepend_bos", None)
        want = n_sel + n
        for _ in range(6):  # documents with several chunks: draw more until the split measures n
            source, got = tokenize_corpus(source, model.tokenizer, seq_len=cfg.seq_len,
                                          max_sequences=want, prepend_bos=prepend)
            all_tokens, all_docs = got.tokens, got.documents.numpy()
            sel, meas = split_by_document(all_docs, len(all_tokens), n_sel, n)
            if len(meas) >= n or len(all_tokens) < want:
                break
            want *= 2
        description = source.description
    if len(meas) < n:
        raise SpectraError(
            f"corpus {description!r} gives {len(meas)} sequences of {cfg.seq_len} tokens from documents "
            f"not held out for choosing heads; expected at least n_sequences={n} (ask for fewer or use a "
            "larger corpus)"
        )
    check_vocab(all_tokens, vocab, description)
    ids = np.arange(len(all_tokens)) if all_docs is None else all_docs
    if n_sel and len(sel):
        n_meas_docs = len(np.unique(ids[meas]))
        if n_meas_docs < MIN_MEASURE_DOCUMENTS:
            raise SpectraError(
                f"corpus {description!r}: after holding out {len(np.unique(ids[sel]))} document(s) to choose "
                f"heads, {n_meas_docs} remain to measure; at least {MIN_MEASURE_DOCUMENTS} are needed "
                "(a corpus with more documents, or --n-select 0 with every head given)")
    measure = all_tokens[meas].long()
    docs_of = (lambda i: None) if all_docs is None else (lambda i: all_docs[i])  # noqa: E731
    split = {"document_ids": "corpus" if all_docs is not None else "sequence index (the corpus records none)",
             "select_documents": [int(d) for d in np.unique(ids[sel])],
             "measure_documents": [int(d) for d in np.unique(ids[meas])],
             "select_sequences": [int(i) for i in sel], "measure_sequences": [int(i) for i in meas]}
    if not len(sel):
        if n_sel:
            log.warning("no sequences left to hold out for choosing heads; choosing on the measured ones")
        split["select_documents"], split["select_sequences"] = split["measure_documents"], split["measure_sequences"]
        return RunTokens(measure, measure, False, description, docs_of(meas), docs_of(meas), split)
    return RunTokens(measure, all_tokens[sel].long(), True, description, docs_of(meas), docs_of(sel), split)


def split_by_document(documents, n_total: int, n_select: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(selection indices, measured indices) of `n_total` sequences with document ids
    `documents` (None: each sequence its own document), so that no document has sequences in both.

    The documents, in the order they first appear, are cut into a prefix that chooses heads and
    the rest, which is measured: the prefix is the shortest one holding `n_select` sequences (and
    at least 2 documents where there are more than 2), shortened while the rest holds fewer than `n`
    sequences. Each side takes its sequences round-robin over its documents (every document's
    first sequence, then the second, ...), `n_select` and `n` of them, returned in corpus order.
    """
    ids = np.arange(n_total) if documents is None else np.asarray(documents)
    order, first = np.unique(ids, return_index=True)
    order = order[np.argsort(first)]
    members = [np.flatnonzero(ids == d) for d in order]
    counts = np.array([len(m) for m in members])
    cum = np.concatenate([[0], np.cumsum(counts)])
    k = 0
    if n_select:
        need = min(2, len(order) - 1) if len(order) > 2 else 1
        k = next((j for j in range(1, len(order) + 1) if cum[j] >= n_select and j >= need), len(order))
        while k > 0 and n_total - cum[k] < n:
            k -= 1

    def round_robin(groups, m):
        picked, depth = [], 0
        while len(picked) < m and any(depth < len(g) for g in groups):
            picked += [int(g[depth]) for g in groups if depth < len(g)][: m - len(picked)]
            depth += 1
        return np.array(sorted(picked), dtype=int)

    return round_robin(members[:k], n_select), round_robin(members[k:], n)


# --------------------------------------------------------------------------- heads


def check_layer_head(layout: AttentionLayout, layer: int, head: int, role: str) -> None:
    """(layer, head) exists in the model; SpectraError naming its `role` (target, control)."""
    try:
        layout.check_head(layer, head)
    except SpectraError as e:
        raise SpectraError(f"{role} head: {e} (the model has {layout.n_layers} layers of "
                           f"{layout.n_heads} heads)") from None




# --------------------------------------------------------------------------- shares of a run


def read_shares(cfg, experiment: str, *,
                ignore: tuple[str, ...] = NOT_RESULT_FIELDS) -> list[tuple[Path, dict]]:
    """The shares of one run, to merge (`config.MergeConfig` `cfg`): [(run directory, manifest)]
    of every `cfg.run_dir`.

    Every directory must hold a finished share of `experiment`, run with the same configuration
    up to the fields in `ignore` (where and how a share ran, not what it computed)."""
    cfg.validate()
    shares = []
    for d in cfg.run_dir:
        m = RunDir(d, experiment).read_manifest()
        if m is None or m.get("experiment") != experiment:
            raise SpectraError(f"{d} is not {'an' if experiment[0] in 'aeiou' else 'a'} {experiment} run "
                               f"directory (no manifest.json of experiment {experiment!r})")
        if m.get("status") != "complete" or "share" not in m:
            raise SpectraError(f"{d} holds no finished share (status {m.get('status')!r}); rerun "
                               "that share's command to finish it")
        shares.append((Path(d), m))
    first = {k: v for k, v in shares[0][1]["config"].items() if k not in ignore}
    for d, m in shares[1:]:
        other = {k: v for k, v in m["config"].items() if k not in ignore}
        if other != first:
            diff = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
            raise SpectraError(f"{d} was run with a different configuration than {shares[0][0]} "
                               f"({', '.join(diff)}); shares of one run share every setting")
    return shares


def merged_config(cfg, config_class: type, manifest: dict):
    """The config of the merged run: `config_class` as a share's `manifest` records it, with the
    merge's (`cfg`) output options."""
    names = {f.name for f in dataclasses.fields(config_class)}
    base = {k: tuple(v) if isinstance(v, list) else v for k, v in manifest["config"].items() if k in names}
    return dataclasses.replace(config_class(**base), out=cfg.out, overwrite=cfg.overwrite,
                               images=cfg.images)

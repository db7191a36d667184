"""Shared plumbing of the causal experiment CLIs (EXP1 intervention, EXP2 gain, EXP3 qk_control).

* the run directory (`spectra_lens.runs.rundir.RunDir`: refuse a finished run unless --overwrite,
  atomic CSV/JSON writes, `manifest.json` with config, model, versions, seed and timings);
* figures: HTML and JSON as written, then their images (`cfg.images`, PNG by default) in one
  browser session at the end (`write_outputs`; one warning line when no browser draws them);
* the model and the tokens of a run (default: the embedded model and `default_corpus()`);
* the default target / control heads (`choose_heads`, `choose_control`, rules below);
* the command line: generated from the configs by `spectra_lens.cli`.

Default heads. With no --target-layer the target layer is the middle one (n_layers // 2). With
no --target-head the target is the head of that layer with the most negative analytic local gain
dH/d ln α at α = 1 = −Var_p(s) (the head whose entropy responds most to query scale). The
control (no --control-head) is the head whose observational r(log ‖q‖, entropy) is nearest 0
with a tight document-bootstrap interval (`causal.CONTROL_RULE`), among all heads but the
target, or among the heads of --control-layer when given. Both are chosen on `n_select`
held-out sequences, the ones just before the measured sequences in the corpus, so the heads are
not chosen on the data that then measures them. When the caller passes tokens, the selection
uses those tokens (recorded).
"""

import contextlib
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from spectra_lens.causal import CONTROL_RULE, choose_control_head, head_r_table
from spectra_lens.data.corpus import tokenize_documents
from spectra_lens.data.shards import ShardManifest, corpus_from_spec, load_tokens
from spectra_lens.errors import SpectraError
from spectra_lens.layout import AttentionLayout, attention_layout
from spectra_lens.metrics import K_EFF_DEFINITIONS
from spectra_lens.models import DEFAULT_MODEL, load_model, resolve_device, weights_info
from spectra_lens.present import figures as figs
from spectra_lens.runs.rundir import RunDir
from spectra_lens.sweep import analytic_gain
from spectra_lens.validate import check_alphas, check_context

__all__ = [
    "HeadChoice",
    "Outputs",
    "Table",
    "write_outputs",
    "RunTokens",
    "choose_heads",
    "load_run_model",
    "load_run_tokens",
    "model_info",
    "run_directory",
    "timed",
    "write_figure",
]

log = logging.getLogger(__name__)

SELECTION_RULE = (
    "target layer: given, else n_layers // 2; target head: given, else the head of the target "
    "layer with the most negative analytic gain -Var_p(s) at alpha = 1 (per-sequence means over "
    "the selection sequences); " + CONTROL_RULE
)


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


# --------------------------------------------------------------------------- declared outputs


@dataclass(frozen=True)
class Table:
    """One CSV an experiment writes: file name or glob, heading, how the report shows it."""

    pattern: str  # e.g. "gain_summary.csv" or "q_scale_intervention_L*_H*_*.csv"
    title: str
    sort_abs: tuple[str, ...] = ()  # sort by |column| descending (first one present)
    columns: tuple[str, ...] = ()  # shown first when present
    rows: int = 15


@dataclass(frozen=True)
class Outputs:
    """The one declaration of what an experiment writes. `figures(tables)` of the experiment
    module builds every figure from these tables alone, so the report rebuilds exactly the
    figures the run wrote."""

    label: str  # "EXP0"
    title: str
    command: str
    tables: tuple[Table, ...]

    def read_tables(self, directory: str | Path) -> dict[str, pd.DataFrame]:
        """{file stem: DataFrame} of every declared CSV present in `directory` (natural order).
        An unreadable CSV raises SpectraError naming it."""
        directory = Path(directory)
        out: dict[str, pd.DataFrame] = {}
        for spec in self.tables:
            for path in sorted(directory.glob(spec.pattern), key=_natural_key):
                if path.name.startswith("."):
                    continue
                try:
                    out[path.stem] = pd.read_csv(path)
                except Exception as e:  # pandas raises many types for a malformed file
                    raise SpectraError(f"table {path} is unreadable: {e}") from e
        return out


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def write_outputs(rd: RunDir, tables: dict, figures: dict, *, images: str = "png") -> list[str]:
    """Write every table as `{name}.csv` and every figure under figures/ (HTML and JSON), then
    the figures' images (formats `images`: "png", "png,svg", "none") in one browser session,
    timed as timings["images_s"]; the CSV file names written."""
    names = []
    for name, frame in tables.items():
        rd.write_csv(f"{name}.csv", frame)
        names.append(f"{name}.csv")
    # every file the figures may write is listed in the run's manifest first (`RunDir.output`)
    formats = figs.image_formats(images)
    for name in figures:
        for suffix in ("html", "json", *formats):
            rd.output(f"figures/{name}.{suffix}")
    exported = figs.write_figures(figures, rd.file("figures"), images=formats)
    rd.timed("images_s", exported.seconds)
    return names


def write_figure(rd: RunDir, fig, name: str) -> list[Path]:
    """figures/`name`.html and .json (atomic), no image: `write_outputs` exports a run's images
    together at the end. Both files are listed in the run's manifest first (`RunDir.output`)."""
    for file in (f"{name}.html", f"{name}.json"):
        rd.output(f"figures/{file}")
    return figs.save_figure(fig, rd.file("figures") / name, bundle=False)


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
    checked_alphas(cfg)
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
    t_layer = cfg.target_layer if cfg.target_layer is not None else layout.n_layers // 2
    _check_layer_head(layout, t_layer, cfg.target_head or 0, "target")
    if hasattr(cfg, "control_head"):
        c_layer = t_layer if cfg.control_layer is None else cfg.control_layer
        _check_layer_head(layout, c_layer, cfg.control_head or 0, "control")


def provenance(setup: RunSetup, choice: "HeadChoice", seed: int) -> dict:
    """The manifest fields every causal run records: model, corpus, sizes, head selection, seed."""
    t = setup.tokens
    return dict(
        model=model_info(setup.model_name, setup.layout, setup.model), corpus=t.corpus,
        n_sequences=int(t.measure.shape[0]), seq_len=int(t.measure.shape[1]),
        selection={**choice.as_dict(), "held_out": t.held_out, "n_select": int(t.select.shape[0])},
        seed=seed,
    )


# --------------------------------------------------------------------------- model and tokens


def load_run_model(cfg, model=None, *, progress: bool = False) -> tuple[object, str]:
    """(bridge, name recorded in the manifest): `model` as given, else `cfg.model` loaded."""
    if model is not None:
        name = cfg.model or f"pre-loaded model ({getattr(model.cfg, 'model_name', '?')})"
        return model, name
    bridge = load_model(cfg.model, dtype=cfg.dtype, device=resolve_device(cfg.device), progress=progress)
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
    held_out: bool  # True when `select` is disjoint from `measure`
    corpus: str  # description recorded in the manifest
    measure_documents: object = None  # one document id per measured sequence; None: each its own
    select_documents: object = None  # the same for `select`

    def __repr__(self) -> str:
        return (f"RunTokens(measure={tuple(self.measure.shape)}, select={tuple(self.select.shape)}, "
                f"held_out={self.held_out}, corpus={self.corpus!r})")


def load_run_tokens(cfg, model, tokens: torch.Tensor | None = None) -> RunTokens:
    """Tokens of a run: `tokens` as given, else `cfg.n_select` + `cfg.n_sequences` sequences of
    `cfg.corpus` (the first `n_select` choose default heads, the rest are measured).

    A corpus is tokenized with `corpus.tokenize_documents` (sequences never span documents,
    drawn round-robin across documents), so the measured sample comes from many documents and
    every sequence carries its document id (`measure_documents`, `select_documents`: the unit of
    the intervals). Prepared shards give the ids their manifest records (None for old ones)."""
    vocab = int(model.cfg.d_vocab)
    if tokens is not None:
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.dtype.is_floating_point:
            raise SpectraError(f"tokens must be an integer tensor [batch, pos], got {tokens!r:.80}")
        _check_vocab(tokens, vocab, "the tokens passed in")
        return RunTokens(tokens.long(), tokens.long(), False, "tokens passed by the caller")
    n, n_sel = cfg.n_sequences, cfg.n_select
    source = corpus_from_spec(cfg.corpus)
    if isinstance(source, ShardManifest):
        if source.seq_len != cfg.seq_len:
            raise SpectraError(
                f"shards in {source.directory} have seq_len {source.seq_len}; expected "
                f"--seq-len {cfg.seq_len} (pass --seq-len {source.seq_len})"
            )
        stop = min(source.n_sequences, n_sel + n)
        all_tokens = load_tokens(source, stop=stop)
        docs = source.documents_of(0, stop)
        all_docs = None if docs is None else np.asarray(docs)
        description = source.corpus or str(source.directory)
    else:
        if model.tokenizer is None:
            raise SpectraError("the model has no tokenizer; pass --corpus as a prepared shard directory")
        prepend = getattr(model.cfg, "default_prepend_bos", None)
        got = tokenize_documents(source, model.tokenizer, seq_len=cfg.seq_len,
                                 max_sequences=n_sel + n, prepend_bos=prepend)
        all_tokens, all_docs = got.tokens, got.documents.numpy()
        description = source.description
    if len(all_tokens) < n:
        raise SpectraError(
            f"corpus {description!r} gives {len(all_tokens)} sequences of {cfg.seq_len} tokens; "
            f"expected at least n_sequences={n} (ask for fewer or use a larger corpus)"
        )
    _check_vocab(all_tokens, vocab, description)
    n_held = min(n_sel, len(all_tokens) - n)
    measure = all_tokens[n_held : n_held + n].long()
    docs_of = (lambda a, b: None) if all_docs is None else (lambda a, b: all_docs[a:b])  # noqa: E731
    if n_held == 0:
        if n_sel:
            log.warning("no sequences left to hold out for choosing heads; choosing on the measured ones")
        return RunTokens(measure, measure, False, description, docs_of(0, n), docs_of(0, n))
    return RunTokens(measure, all_tokens[:n_held].long(), True, description,
                     docs_of(n_held, n_held + n), docs_of(0, n_held))


def _check_vocab(tokens: torch.Tensor, vocab: int, what: str) -> None:
    if tokens.numel() and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
        raise SpectraError(
            f"{what} hold token ids in [{int(tokens.min())}, {int(tokens.max())}]; expected ids in "
            f"[0, {vocab}) for this model's vocabulary: tokenizer mismatch?"
        )


# --------------------------------------------------------------------------- default heads


@dataclass(frozen=True)
class HeadChoice:
    """The heads a run studies and how they were chosen."""

    target: tuple[int, int]  # (layer, head)
    control: tuple[int, int] | None  # (layer, head), or None when the experiment has no control
    chosen: tuple[str, ...]  # which of "target_layer", "target_head", ... came from the rule
    gains: dict  # {layer: [per-head mean analytic gain]} of the layers the rule looked at
    control_r: dict | None = None  # the control's row of the selection r table (CONTROL_RULE)

    def as_dict(self) -> dict:
        return {"target": list(self.target), "control": list(self.control) if self.control else None,
                "chosen_by_rule": list(self.chosen), "rule": SELECTION_RULE,
                "selection_gains": {str(l): g for l, g in self.gains.items()},
                **({"control_r": self.control_r} if self.control_r is not None else {})}


def choose_heads(cfg, model, layout: AttentionLayout, tokens: "RunTokens", *,
                 control: bool = True) -> tuple[HeadChoice, pd.DataFrame | None]:
    """Target (and control) heads: the config's, with None fields chosen by SELECTION_RULE.

    Returns the choice and, with `control`, the r table of every head on the selection
    sequences that the control rule reads (`causal.head_r_table`, with a "role" column).
    Raises SpectraError for a head out of range or a control equal to the target.
    """
    t_layer = cfg.target_layer if cfg.target_layer is not None else layout.n_layers // 2
    t_head = cfg.target_head
    _check_layer_head(layout, t_layer, t_head if t_head is not None else 0, "target")
    c_layer, c_head = getattr(cfg, "control_layer", None), getattr(cfg, "control_head", None)
    if control:
        _check_layer_head(layout, t_layer if c_layer is None else c_layer,
                          c_head if c_head is not None else 0, "control")
    chosen = [name for name, v in (("target_layer", cfg.target_layer), ("target_head", t_head)) if v is None]
    gains: dict[int, list[float]] = {}
    if t_head is None:
        g = analytic_gain(model, tokens.select, layers=[t_layer], min_position=cfg.min_position,
                          batch_size=cfg.max_rows).mean(0)
        gains = {t_layer: [round(float(x), 6) for x in g[0]]}
        t_head = min(range(layout.n_heads), key=lambda h: gains[t_layer][h])
    target = (t_layer, t_head)
    if not control:
        return HeadChoice(target, None, tuple(chosen), gains), None
    table = head_r_table(model, tokens.select, tokens.select_documents, min_position=cfg.min_position,
                         ci=cfg.ci, n_boot=cfg.n_boot, seed=cfg.seed, batch_size=cfg.max_rows)
    if c_head is None:
        chosen += [name for name, v in (("control_layer", c_layer), ("control_head", c_head)) if v is None]
        ctrl = choose_control_head(table, target, layer=c_layer)
    else:
        ctrl = (t_layer if c_layer is None else c_layer, c_head)
    if ctrl == target:
        raise SpectraError(
            f"the control head must differ from the target head; both are layer {t_layer} head {t_head}"
        )
    table.insert(2, "role", ["target" if (l, h) == target else "control" if (l, h) == ctrl else ""
                             for l, h in zip(table["layer"], table["head"])])
    row = table[table["role"] == "control"].iloc[0].drop("role").to_dict()
    return HeadChoice(target, ctrl, tuple(chosen), gains, control_r=row), table


def _check_layer_head(layout: AttentionLayout, layer: int, head: int, role: str) -> None:
    try:
        layout.check_head(layer, head)
    except SpectraError as e:
        raise SpectraError(f"{role} head: {e} (the model has {layout.n_layers} layers of "
                           f"{layout.n_heads} heads)") from None


# --------------------------------------------------------------------------- helpers


def checked_alphas(cfg) -> tuple[float, ...]:
    """cfg.alphas validated and sorted (SpectraError for an empty grid or α <= 0)."""
    return check_alphas(cfg.alphas)


def k_eff_definitions() -> dict[str, str]:
    """What each k_eff column means (recorded in every manifest)."""
    return {"mean_k_eff": K_EFF_DEFINITIONS["k_eff_exp"], **K_EFF_DEFINITIONS}

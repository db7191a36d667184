"""Frozen, keyword-only settings of each command; the command line (`spectra_lens.experiments.cli`) is
generated from them: one flag per field, its help text from the command line's `FLAG_HELP`
(or the field's own `metadata['help']`), its default the field's.

Validation happens when a run starts (`validate()`), not in `__init__`. This module imports
neither torch nor the experiments, so building the command line is instant.
"""

from dataclasses import dataclass, field

from spectra_lens.errors import SpectraError

__all__ = ["ObservationalConfig"]


def _images():
    """The `images` field: `--images FMT`, and `--no-images` (= "none")."""
    return field(default="png", metadata={"off": ("--no-images", "none"), "metavar": "FMT"})


# --------------------------------------------------------------------------- run options
# The options shared by the commands, declared once. A command's config inherits the groups
# that apply to it, so `cfg.model`, `cfg.device`, ... and the flags `--model`, `--device`, ...
# mean the same in every subcommand; a command overrides only a default (its `out`).

__all__ += ["DeviceOptions", "ModelOptions", "OutputOptions", "RunOptions"]


@dataclass(frozen=True, kw_only=True)
class DeviceOptions:
    """Where and in which precision the model runs."""

    dtype: str = "float32"  # model weights (float32, bf16, fp16); metrics are always float32
    device: str | None = None  # None = CUDA when present, else CPU
    device_map: str | None = None  # HF device_map ("auto", JSON {module: device}): layers over devices


@dataclass(frozen=True, kw_only=True)
class ModelOptions(DeviceOptions):
    """Which model, and where it runs."""

    model: str | None = None  # HF id or local dir; None = the embedded default model


@dataclass(frozen=True, kw_only=True)
class OutputOptions:
    """Where a run writes, whether it may replace a finished run there, and its figures' images."""

    out: str = "results"  # run directory: manifest, tables, figures (each command sets its own)
    overwrite: bool = False  # replace a finished run in `out` instead of refusing
    images: str = _images()  # image copies of every figure: "png", "svg", "png,svg" or "none"

    def validate(self) -> None:
        _check_images(self.images)


@dataclass(frozen=True, kw_only=True)
class RunOptions(ModelOptions, OutputOptions):
    """The options of every experiment run: model and device, run directory, seed."""

    seed: int = 0  # bootstrap resamples, replication split, sampling; recorded in the manifest


# --attention auto: sequences longer than this many tokens are captured in query blocks (no
# [head, T, T] pattern); at and below it, from the eager hook_pattern.
BLOCKED_ABOVE = 1024
__all__ += ["BLOCKED_ABOVE", "attention_path"]


def attention_path(attention: str, seq_len: int) -> str:
    """The capture path of `--attention` for sequences of `seq_len` tokens: "eager" or "blocked"."""
    if attention == "auto":
        return "blocked" if seq_len > BLOCKED_ABOVE else "eager"
    return attention


@dataclass(frozen=True, kw_only=True)
class ObservationalConfig(RunOptions):
    """EXP0: per-token query norm and attention metrics over a corpus, then per-head statistics."""

    corpus: str | None = None  # corpus spec (see data.prepare.corpus_from_spec); None = pydoc topics
    out: str = "results/observational"  # run directory: shards, records, tables, figures
    seq_len: int = 128  # tokens per sequence (BOS included where the model uses one)
    n_sequences: int = 256  # 32k tokens: ~2.5 min of capture on one CPU core (default model)
    shard_size: int = 32  # sequences per shard: the unit of resuming, consistency, replication
    batch_size: int = 8  # sequences per forward pass
    min_position: int = 1  # tokens before this position (the sink/BOS token) are excluded
    top_mass: float | None = 0.9  # mass of k_eff_top90; None skips it (its sort is ~2/3 of capture cost)
    n_boot: int = 1000  # bootstrap resamples of whole documents (intervals of r)
    records: bool = False  # also write per-token Parquet records (statistics use the moments)
    n_folds: int = 4  # disjoint random document folds for the consistency check
    fd_sequences: int | None = None  # sequences for the finite-difference gain; 0 skips; None: fd_sequences_for
    fdr_alpha: float = 0.05  # Benjamini-Hochberg false discovery rate across all heads
    consistency_threshold: float = 0.8  # share of document folds that must agree for "consistent"
    equivalence_margin: float = 0.2  # "equivalent to a temperature": slope/gain within 1 ± this (TOST)
    top_heads: int = 6  # strongest heads shown in the query-norm vs entropy scatter
    attention: str = "auto"  # eager (hook_pattern), blocked (query blocks), auto: blocked above BLOCKED_ABOVE

    def validate(self) -> None:
        if self.attention not in CHOICES["attention"]:
            raise SpectraError(f"attention must be one of {CHOICES['attention']}, got {self.attention!r}")
        if self.fd_sequences is not None and (not isinstance(self.fd_sequences, int)
                                              or isinstance(self.fd_sequences, bool) or self.fd_sequences < 0):
            raise SpectraError(f"fd_sequences must be an integer >= 0, got {self.fd_sequences!r}")
        for name in ("seq_len", "n_sequences", "shard_size", "batch_size", "n_boot", "top_heads",
                     "n_folds"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SpectraError(f"{name} must be a positive integer, got {v!r}")
        if self.seq_len < 2:
            raise SpectraError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.n_sequences < 2:
            raise SpectraError(f"n_sequences must be >= 2: the sequence bootstrap and the "
                               f"replication split need two sequences at least, got {self.n_sequences}")
        from spectra_lens.validate import check_min_position  # imports torch: not at module load

        check_min_position(self.min_position, self.seq_len)
        super().validate()
        if self.top_mass is not None and not 0 < self.top_mass <= 1:
            raise SpectraError(f"top_mass must be in (0, 1] or None, got {self.top_mass!r}")
        if not 0 < self.fdr_alpha < 1:
            raise SpectraError(f"fdr_alpha must be in (0, 1), got {self.fdr_alpha!r}")
        if not 0 < self.consistency_threshold <= 1:
            raise SpectraError(f"consistency_threshold must be in (0, 1], got {self.consistency_threshold!r}")
        if not 0 < self.equivalence_margin < 1:
            raise SpectraError(f"equivalence_margin must be in (0, 1) (a share of |gain|), got "
                               f"{self.equivalence_margin!r}")


def _check_images(images) -> None:
    """Image formats of a run's figures (SpectraError naming a bad one)."""
    from spectra_lens.present.figures.export import image_formats  # plotly, no torch

    if not isinstance(images, str):
        raise SpectraError(f"images must be a string such as 'png' or 'png,svg' or 'none', got {images!r}")
    image_formats(images)


# --------------------------------------------------------------------------- causal experiments
# EXP1-EXP3 (experiments/intervention.py, gain.py, qk_control.py). Layer/head fields left None
# are chosen when the run starts (see experiments/_common.choose_heads); validate() checks what
# needs no model, the run checks heads against the model's layout.

__all__ += ["ALPHAS_9", "ALPHAS_21", "GainConfig", "InterventionConfig", "QKConfig"]

# log2-spaced grids from 1/4 to 4 that contain 1 exactly (2**0): 9 and 21 points.
ALPHAS_9: tuple[float, ...] = tuple(2.0 ** (k / 2) for k in range(-4, 5))
ALPHAS_21: tuple[float, ...] = tuple(2.0 ** (k / 5) for k in range(-10, 11))


def _check_causal(cfg, *, at_least: int = 1) -> None:
    """The rules shared by the causal configs; `at_least`: the fewest α the experiment needs."""
    OutputOptions.validate(cfg)
    for name in ("seq_len", "n_sequences", "max_rows"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SpectraError(f"{name} must be a positive integer, got {v!r}")
    if cfg.n_sequences < 2:
        raise SpectraError(f"n_sequences must be >= 2: intervals over sequences need two at "
                           f"least, got {cfg.n_sequences}")
    if cfg.seq_len < 2:
        raise SpectraError(f"seq_len must be >= 2, got {cfg.seq_len}")
    from spectra_lens.validate import check_min_position  # imports torch: not at module load

    check_min_position(cfg.min_position, cfg.seq_len)
    if not isinstance(cfg.n_select, int) or isinstance(cfg.n_select, bool) or cfg.n_select < 0:
        raise SpectraError(f"n_select must be an integer >= 0, got {cfg.n_select!r}")
    if not 0 < cfg.ci < 1:
        raise SpectraError(f"ci must lie strictly between 0 and 1, got {cfg.ci!r}")
    from spectra_lens.validate import check_alphas  # config stays importable without torch

    check_alphas(cfg.alphas, at_least=at_least)
    mult = tuple(getattr(cfg, "rotation_multiples", (1.0,)))
    if not mult or any(isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < 100 for m in mult):
        raise SpectraError(f"rotation_multiples must be numbers > 0, got {list(mult)}")
    n_boot = getattr(cfg, "n_boot", 1000)
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 100:
        raise SpectraError(f"n_boot must be an integer >= 100, got {n_boot!r}")
    for name in ("target_layer", "target_head", "control_layer", "control_head"):
        v = getattr(cfg, name, None)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise SpectraError(f"{name} must be None or an integer >= 0, got {v!r}")
    target = (cfg.target_layer, cfg.target_head)
    c_layer = getattr(cfg, "control_layer", None)
    control = (cfg.target_layer if c_layer is None else c_layer, getattr(cfg, "control_head", None))
    if None not in target and target == control:
        raise SpectraError(f"the control head must differ from the target head; both are layer "
                           f"{target[0]} head {target[1]}")


@dataclass(frozen=True, kw_only=True)
class InterventionConfig(RunOptions):
    """EXP1: scale one head's effective query by each α on the real forward pass; measure the
    head, every later head and the output (loss, KL), for a target and a control head."""

    corpus: str | None = None  # corpus spec (data.prepare.corpus_from_spec); None = pydoc topics
    out: str = "results/intervention"  # run directory
    target_layer: int | None = None  # None: the middle layer, n_layers // 2
    target_head: int | None = None  # None: most negative analytic gain −Var_p(s) in target_layer
    control_layer: int | None = None  # None: target_layer
    control_head: int | None = None  # None: r(log ||q||, H) nearest 0 with a tight interval (causal.CONTROL_RULE)
    alphas: tuple[float, ...] = ALPHAS_9  # query scales; 1 is the unscaled model
    rotation_multiples: tuple[float, ...] = (0.5, 1.0, 2.0)  # rotation angles in units of the target's natural direction spread
    n_boot: int = 2000  # document-bootstrap resamples of every interval
    n_sequences: int = 8  # measured sequences: sized for ~1-2 minutes on 2 CPU cores
    seq_len: int = 128  # tokens per sequence (BOS included where the model uses one)
    n_select: int = 8  # held-out sequences (before the measured ones) that choose default heads
    min_position: int = 1  # query positions before this (the sink/BOS token) are not averaged
    max_rows: int = 32  # sequence copies per forward pass: bounds the logits held in memory
    ci: float = 0.95  # t-interval level over sequences

    def validate(self) -> None:
        _check_causal(self)


@dataclass(frozen=True, kw_only=True)
class GainConfig(RunOptions):
    """EXP2: every head's entropy / max attention / k_eff against ln α (fast path, exact where
    the logits are not bilinear) and the analytic local gain −Var_p(s) at α = 1."""

    corpus: str | None = None  # corpus spec (data.prepare.corpus_from_spec); None = pydoc topics
    out: str = "results/gain"  # run directory
    target_layer: int | None = None  # head shown in the fit plots; None: as InterventionConfig
    target_head: int | None = None  # None: most negative analytic gain in target_layer
    control_layer: int | None = None  # None: target_layer
    control_head: int | None = None  # None: r(log ||q||, H) nearest 0 with a tight interval (causal.CONTROL_RULE)
    alphas: tuple[float, ...] = ALPHAS_21  # query scales for the fits (log-spaced, contains 1)
    n_boot: int = 1000  # document-bootstrap resamples of the r intervals that choose the control
    n_sequences: int = 16  # measured sequences
    seq_len: int = 128  # tokens per sequence
    n_select: int = 8  # held-out sequences that choose the default target / control
    min_position: int = 1  # query positions before this are not averaged
    batch_size: int = 8  # sequences per forward pass of the fast path
    max_rows: int = 32  # sequence copies per forward pass in the exact fallback
    ci: float = 0.95  # t-interval level over sequences

    def validate(self) -> None:
        _check_causal(self, at_least=3)  # a slope fit with a residual
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise SpectraError(f"batch_size must be a positive integer, got {self.batch_size!r}")


@dataclass(frozen=True, kw_only=True)
class QKConfig(RunOptions):
    """EXP3: scale the target head's query, or the key of its kv head, by each α; compare the
    patterns of every query head of the kv group and the output effects."""

    corpus: str | None = None  # corpus spec (data.prepare.corpus_from_spec); None = pydoc topics
    out: str = "results/qk_control"  # run directory
    target_layer: int | None = None  # None: the middle layer, n_layers // 2
    target_head: int | None = None  # None: most negative analytic gain in target_layer
    alphas: tuple[float, ...] = ALPHAS_9  # scales applied to q (or to k)
    n_sequences: int = 8  # measured sequences: sized for ~1-2 minutes on 2 CPU cores
    seq_len: int = 128  # tokens per sequence
    n_select: int = 8  # held-out sequences that choose the default target head
    min_position: int = 1  # query positions before this are not averaged
    max_rows: int = 32  # sequence copies per forward pass: bounds the logits held in memory
    ci: float = 0.95  # t-interval level over sequences

    def validate(self) -> None:
        _check_causal(self)


# --------------------------------------------------------------------------- head types

__all__ += ["HeadTypesConfig"]


@dataclass(frozen=True, kw_only=True)
class HeadTypesConfig(RunOptions):
    """Every head's sink / previous-token / induction / local / positional scores and label
    (`spectra_lens.head_types`), joined with the agreement and gain tables when given."""

    corpus: str | None = None  # text of the sink / previous-token / local scores; None = pydoc topics
    out: str = "results/head_types"  # run directory
    n_sequences: int = 8  # text sequences: each score's sd is over them
    seq_len: int = 64  # tokens per text sequence
    n_repeated: int = 8  # random-token sequences shown twice (induction, positional scores)
    half_len: int = 32  # random tokens per copy
    window: int = 4  # keys i - window + 1 … i count as local
    agreement: str | None = None  # agreement.csv to join on (layer, head)
    gain: str | None = None  # gain_summary.csv to join on (layer, head)
    batch_size: int = 8  # sequences per forward pass

    def validate(self) -> None:
        super().validate()
        from spectra_lens.validate import check_int  # imports torch: not at module load

        for name in ("n_sequences", "batch_size"):
            check_int(name, getattr(self, name))
        check_int("seq_len", self.seq_len, minimum=8)
        check_int("n_repeated", self.n_repeated, minimum=2)
        check_int("half_len", self.half_len, minimum=4)
        check_int("window", self.window)
        if self.window >= self.seq_len:
            raise SpectraError(f"window must be < seq_len ({self.seq_len}), got {self.window}")


def fd_sequences_for(cfg, seq_len: int) -> int:
    """The sequences of observe's finite-difference gain: `cfg.fd_sequences` when given, else 4
    where the capture reads the eager pattern and 0 where it runs in query blocks (above
    BLOCKED_ABOVE tokens the check's exact passes, 2 per head and sequence with every [head, T, T]
    pattern, would cost far more than the capture itself)."""
    if cfg.fd_sequences is not None:
        return cfg.fd_sequences
    return 4 if attention_path(cfg.attention, seq_len) == "eager" else 0


__all__ += ["fd_sequences_for"]


# --------------------------------------------------------------------------- choices

CHOICES: dict[str, tuple[str, ...]] = {
    "kind": ("q", "k", "logit"),
    "mode": ("greedy", "sample", "both"),
    "dtype": ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
    "file_format": ("safetensors", "npy"),
    "attention": ("eager", "blocked", "auto"),
}


# --------------------------------------------------------------------------- prepare and report

__all__ += ["CHOICES", "GenerateConfig", "PrepareConfig", "ReportConfig"]


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    """Tokenize a corpus once into fixed-length sequence shards with a manifest; every
    experiment's --corpus accepts the shard directory. The tokenizer is the model's, read
    without its weights."""

    model: str | None = None  # whose tokenizer; None = the embedded default model's
    corpus: str | None = None  # corpus spec (data.prepare.corpus_from_spec); None = pydoc topics
    out: str = field(default="results/shards", metadata={"help": "shard directory to write"})
    seq_len: int = 128  # tokens per sequence, as the experiments' default
    n_sequences: int | None = None  # None = every full sequence of the corpus
    shard_size: int = 32  # sequences per shard, as the observational run's default
    prepend_bos: bool | None = None  # None = when the tokenizer has a BOS token
    min_tokens: int | None = None  # None = keep every document
    file_format: str = "safetensors"  # or "npy"
    overwrite: bool = False  # replace a different shard set already in `out`

    def validate(self) -> None:
        for name in ("seq_len", "shard_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SpectraError(f"{name} must be a positive integer, got {v!r}")
        for name in ("n_sequences", "min_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise SpectraError(f"{name} must be None or a positive integer, got {v!r}")
        if self.file_format not in CHOICES["file_format"]:
            raise SpectraError(f"file_format must be one of {CHOICES['file_format']}, got {self.file_format!r}")


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """One self-contained HTML page of every run directory found under a results directory
    (tables, figures, manifests); symlinked run directories are followed."""

    results_dir: str = field(metadata={"positional": True})
    out: str | None = field(default=None, metadata={"help": "HTML file to write"})
    plotlyjs: str | None = None  # load plotly.js from here instead of inlining it
    pdf: bool = False  # also print the page to RESULTS_DIR/report.pdf (beside --out)
    overwrite: bool = False  # replace an existing --out file (and its PDF) instead of refusing

    def validate(self) -> None:
        if not self.results_dir:
            raise SpectraError("results_dir must name a directory, got an empty string")


@dataclass(frozen=True, kw_only=True)
class GenerateConfig(ModelOptions):
    """Continue a prompt with and without head scalings, side by side: greedy and seeded sampled
    continuations of the plain and the scaled model, each token's log p_scaled - log p_plain
    under teacher forcing, and where the two first differ."""

    prompt: str = field(metadata={"positional": True})
    scale: tuple[str, ...] = field(default=(), metadata={"metavar": "LxHy=ALPHA"})
    kind: str = "q"  # what --scale scales: the query, the key of the kv head, or the logits
    mode: str = "both"  # greedy, sample, or both
    max_new_tokens: int = 20
    seed: int = 0
    temperature: float = 1.0
    top_k: int | None = None
    eos_stop: bool = True  # stop at the end-of-text token
    csv: str | None = None  # also write the per-token table here
    overwrite: bool = False  # replace an existing --csv file


# --------------------------------------------------------------------------- one head's page

__all__ += ["HeadPageConfig"]


@dataclass(frozen=True, kw_only=True)
class HeadPageConfig(ModelOptions):
    """One HTML page for one head (`spectra_lens.present.head_page`): token-labelled patterns, ‖q‖ and
    entropy along the text, its α-curve, observational slope vs causal gain with intervals, its
    type scores and a greedy generation diff at two α."""

    head: str = field(metadata={"positional": True})  # e.g. "L15H8"
    out: str = field(default="results/heads", metadata={
        "help": "directory of head pages; the page is OUT/L{layer}H{head}.html"})
    corpus: str | None = None  # the text sequences; None = pydoc topics
    n_sequences: int = 8  # text sequences: the units of every interval on the page
    seq_len: int = 64  # tokens per text sequence
    types: str | None = None  # head_types.csv; None = this head's scores measured on the text
    agreement: str | None = None  # its obs_slope, gain_analytic; None = computed on the text
    alphas: tuple[float, ...] = (0.5, 2.0)  # the two query scales of the generation diff
    prompt: str | None = None  # continued in the generation diff; None = the text's first 16 tokens
    max_new_tokens: int = 16  # tokens generated at each α

    def validate(self) -> None:
        from spectra_lens.validate import check_int  # imports torch: not at module load

        check_int("n_sequences", self.n_sequences, minimum=2)
        check_int("seq_len", self.seq_len, minimum=8)
        check_int("max_new_tokens", self.max_new_tokens)
        if len(self.alphas) != 2:
            raise SpectraError(f"alphas must be two query scales, got {list(self.alphas)}")


# --------------------------------------------------------------------------- study

__all__ += ["StudyConfig"]


@dataclass(frozen=True, kw_only=True)
class StudyConfig(DeviceOptions, OutputOptions):
    """The study: EXP0 (with the observational-causal agreement and the norm counterfactual), EXP2,
    the norm ablation and the causal map in every model × corpus cell, summarized in one table
    and one figure."""

    DEFAULT_MODELS = ("default",)
    DEFAULT_CORPORA = ("default", "kjv")

    models: tuple[str, ...] = ()  # model specs; "default" = the embedded model; () = ("default",)
    corpora: tuple[str, ...] = ()  # corpus specs or names (genres.NAMED_CORPORA); () = ("default", "kjv")
    out: str = "results/study"  # study directory; every cell's runs go below it
    n_sequences: int = 64  # EXP0 sequences per cell
    seq_len: int = 128  # tokens per sequence
    batch_size: int = 8  # sequences per forward pass
    fd_sequences: int | None = None  # EXP0's finite-difference gain check; None: fd_sequences_for
    run_gain: bool = True  # also run EXP2 (gain) per cell
    gain_sequences: int = 16  # EXP2 sequences per cell
    run_causal: bool = True  # also run ablate-norm and causal-map per cell
    causal_sequences: int = 8  # measured sequences of ablate-norm and causal-map per cell
    causal_seq_len: int = 64  # tokens per sequence of ablate-norm and causal-map
    causal_select: int = 8  # their selection sequences (other documents)
    causal_heads: int = 0  # heads of the causal steps, spread evenly over the model; 0 = every head
    causal_alphas: tuple[float, ...] = (0.5, 2.0)  # query scales of the causal map
    ablation_baselines: bool = True  # ablate-norm's mean ablation and rotation beside the norm
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        for name in ("models", "corpora"):
            v = getattr(self, name)
            if not all(isinstance(x, str) and x for x in v):
                raise SpectraError(f"{name} must name non-empty specs, got {v!r}")
            if len(set(v)) != len(v):
                raise SpectraError(f"{name} must be distinct, got {list(v)}")
        from spectra_lens.validate import check_alphas, check_int  # imports torch: not at load

        for name in ("n_sequences", "seq_len", "batch_size", "gain_sequences", "causal_select"):
            check_int(name, getattr(self, name))
        if self.fd_sequences is not None:
            check_int("fd_sequences", self.fd_sequences, minimum=0)
        check_int("causal_sequences", self.causal_sequences, minimum=2)
        check_int("causal_seq_len", self.causal_seq_len, minimum=2)
        check_int("causal_heads", self.causal_heads, minimum=0)
        check_alphas(self.causal_alphas)
        if 1.0 in tuple(self.causal_alphas):
            raise SpectraError(f"causal_alphas must not include 1 (no intervention), got {list(self.causal_alphas)}")

    def cells(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(models, corpora), the defaults where none were named."""
        return self.models or self.DEFAULT_MODELS, self.corpora or self.DEFAULT_CORPORA


@dataclass(frozen=True, kw_only=True)
class MergeConfig(OutputOptions):
    """Merge the shares of one observational or gain run (jobs started with SPECTRA_SHARD_RANK=i
    SPECTRA_SHARD_WORLD=N, e.g. a SLURM array, each into its own run directory; observational
    shares over the same prepared shards): read every share's per-document moments (or per-part
    α-curves) and write the run's tables and figures once, as a single run of the same
    configuration would."""

    run_dir: tuple[str, ...] = field(metadata={"positional": True,
                                               "help": "run directories of the shares (all of them)"})
    out: str = field(default="results/merged",
                     metadata={"help": "run directory of the merged run (observational or gain): "
                                       "manifest, tables, figures"})

    def validate(self) -> None:
        if not self.run_dir or any(not r for r in self.run_dir):
            raise SpectraError(f"merge needs the run directories of the shares; got {list(self.run_dir)}")
        super().validate()


__all__ += ["MergeConfig"]


# --------------------------------------------------------------------------- norm ablation, causal map

__all__ += ["AblateNormConfig", "CausalMapConfig"]


def _check_heads_run(cfg) -> None:
    """Fields shared by ablate-norm and causal-map (SpectraError naming a bad one)."""
    OutputOptions.validate(cfg)
    from spectra_lens.validate import HeadRef, check_int, check_min_position  # imports torch

    for name in ("seq_len", "max_rows"):
        check_int(name, getattr(cfg, name))
    check_int("n_sequences", cfg.n_sequences, minimum=2)
    check_int("n_select", cfg.n_select, minimum=1)
    check_int("n_boot", cfg.n_boot, minimum=100)
    if cfg.seq_len < 2:
        raise SpectraError(f"seq_len must be >= 2, got {cfg.seq_len}")
    check_min_position(cfg.min_position, cfg.seq_len)
    if not 0 < cfg.ci < 1:
        raise SpectraError(f"ci must lie strictly between 0 and 1, got {cfg.ci!r}")
    heads = [HeadRef.parse(h) for h in cfg.heads]
    if len(set(heads)) != len(heads):
        raise SpectraError(f"heads must be distinct, got {list(cfg.heads)}")


@dataclass(frozen=True, kw_only=True)
class AblateNormConfig(RunOptions):
    """Norm ablation: replace each head's query norm by its reference norm (direction kept) in
    the real forward pass; next-token loss, KL and later heads, beside mean ablation of the
    head's output and a rotation of its query by its natural angular spread."""

    corpus: str | None = None  # corpus spec (data.prepare.corpus_from_spec); None = pydoc topics
    out: str = "results/ablate_norm"  # run directory
    heads: tuple[str, ...] = field(default=(), metadata={"metavar": "LxHy"})  # () = every head
    baselines: bool = True  # also mean ablation and rotation of every head
    n_sequences: int = 16  # measured sequences
    seq_len: int = 128  # tokens per sequence
    n_select: int = 16  # selection sequences (other documents): reference norms, means, spreads
    min_position: int = 1  # query positions before this are not averaged
    max_rows: int = 32  # rows (sequence copies, one head's intervention each) per forward pass
    n_boot: int = 2000  # document-bootstrap resamples of every interval
    ci: float = 0.95  # interval level

    def validate(self) -> None:
        _check_heads_run(self)


@dataclass(frozen=True, kw_only=True)
class CausalMapConfig(RunOptions):
    """The causal map: scale each head's query by each α in the real forward pass; downstream
    KL and loss with document intervals beside the head's analytic gain (and its norm-ablation
    effect from a norm_ablation.csv); Spearman(gain, KL) across heads."""

    corpus: str | None = None  # corpus spec (data.prepare.corpus_from_spec); None = pydoc topics
    out: str = "results/causal_map"  # run directory
    heads: tuple[str, ...] = field(default=(), metadata={"metavar": "LxHy"})  # () = every head
    alphas: tuple[float, ...] = (0.5, 2.0)  # query scales of the map
    norm_ablation: str | None = None  # norm_ablation.csv of `ablate-norm` to join on (layer, head)
    n_sequences: int = 16  # measured sequences (the same as ablate-norm's at the same sizes)
    seq_len: int = 128  # tokens per sequence
    n_select: int = 16  # sequences set aside first, so the measured ones match ablate-norm's
    min_position: int = 1  # query positions before this are not averaged
    max_rows: int = 32  # rows (sequence copies, one head's intervention each) per forward pass
    n_boot: int = 2000  # bootstrap resamples (documents for effects, heads for Spearman)
    ci: float = 0.95  # interval level

    def validate(self) -> None:
        _check_heads_run(self)
        from spectra_lens.validate import check_alphas  # imports torch

        check_alphas(self.alphas)
        if 1.0 in tuple(self.alphas):
            raise SpectraError(f"alphas of the map must not include 1 (no intervention), got {list(self.alphas)}")



# --------------------------------------------------------------------------- length

__all__ += ["LengthConfig"]


@dataclass(frozen=True, kw_only=True)
class LengthConfig(RunOptions):
    """How each head's query norm and attention entropy change with position over long
    documents: per head and log-position bin, mean ln‖q‖, entropy and its bound log(t+1), max
    attention, sink mass and the local gain −Var_p(s); per head the slope of ln‖q‖ (and of
    H − log(t+1)) on ln t with a document-clustered interval."""

    corpus: str = "kjv-books"  # corpus spec; a document is one unit of the clustered intervals
    out: str = "results/length"  # run directory: manifest, tables, figures
    seq_len: int = 2048  # the first seq_len tokens of each document (BOS included where used)
    n_documents: int = 4  # documents of at least seq_len tokens, spread evenly over the corpus
    bins_per_octave: int = 2  # log-position bins: edges 2^(k / bins_per_octave)
    min_position: int = 1  # positions before this (the sink/BOS token) are left out
    attention: str = "blocked"  # eager (hook_pattern), blocked (query blocks), auto: blocked above BLOCKED_ABOVE
    ci: float = 0.95  # level of the document-clustered intervals

    def validate(self) -> None:
        super().validate()
        from spectra_lens.validate import check_int, check_min_position  # imports torch

        check_int("seq_len", self.seq_len, minimum=8)
        check_int("n_documents", self.n_documents, minimum=2)
        check_int("bins_per_octave", self.bins_per_octave)
        check_min_position(self.min_position, self.seq_len)
        if self.min_position < 1:
            raise SpectraError(f"min_position must be >= 1 (ln t is undefined at t = 0), got {self.min_position}")
        if self.attention not in CHOICES["attention"]:
            raise SpectraError(f"attention must be one of {CHOICES['attention']}, got {self.attention!r}")
        if not 0 < self.ci < 1:
            raise SpectraError(f"ci must lie strictly between 0 and 1, got {self.ci!r}")

"""The `spectra-lens` command, generated from the config dataclasses of `spectra_lens.config`.

Each subcommand has one flag per field of its config class (`--seq-len` for `seq_len`), with
the help text of `FLAG_HELP` below (one text per field name, so a flag means the same thing in
every subcommand) and the field's default. `-v`/`--log-level`, `--no-progress` and `--version`
are the same everywhere. Building the parser imports neither torch nor the experiments: a
subcommand's module is imported only to run it, so `--help` answers at once.

A subcommand's module provides `command(config, *, progress: bool) -> int`: it runs, prints a
short summary and returns the exit status; `SpectraError` becomes `error: ...` and status 2.
"""

import argparse
import dataclasses
import difflib
import importlib
import inspect
import logging
import os
import re
import sys
import time
import types
import typing
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

from spectra_lens import config as C
from spectra_lens.present import display

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


# --------------------------------------------------------------------------- flag help
# One flag per config field; its help text is looked up
# here by field name, so a flag means the same thing in every subcommand; a field may override
# it with `field(metadata={"help": ...})` where its meaning is specific to one command.

FLAG_HELP: dict[str, str] = {
    "model": "Hugging Face model id (local cache, or the hub when online) or local model directory",
    "corpus": "corpus: 'default', 'kjv' (narrative, a document per chapter), 'kjv-books' (the same, "
              "a document per book), 'chatterbot' (dialog), a text file or glob, FILE.jsonl[:FIELD], hf:NAME[:SPLIT[:FIELD]], or a prepared shard directory",
    "out": "output directory of the run: manifest, tables, figures",
    "seq_len": "tokens per sequence, BOS included where the model uses one",
    "n_sequences": "sequences of seq_len tokens taken from the corpus",
    "shard_size": "sequences per shard file: the unit of resuming, consistency and replication",
    "batch_size": "sequences per forward pass",
    "max_rows": "rows (sequence copies, one per alpha) per forward pass of the exact path; "
                "bounds memory",
    "min_position": "query positions before this one (the sink/BOS token) are left out",
    "top_mass": "attention mass of the k_eff_top90 metric; 'none' skips it (a faster capture)",
    "n_boot": "bootstrap resamples of whole documents (percentile intervals of r)",
    "records": "also write per-token Parquet records, ~16 kB per token on the default model "
               "(the statistics use per-document moments)",
    "n_folds": "disjoint random document folds for the consistency check",
    "fd_sequences": "sequences (from distinct documents) for the finite-difference gain, an identity "
                    "check of -Var_p(s) by 2 real passes per head; 0 skips it",
    "fdr_alpha": "Benjamini-Hochberg false discovery rate across all heads",
    "consistency_threshold": "share of document folds that must agree for a head to count as consistent",
    "equivalence_margin": "equivalence margin of the agreement verdict: the slope/gain ratio must "
                          "lie within 1 +- this (two one-sided tests)",
    "top_heads": "strongest heads shown in the query-norm vs entropy scatter",
    "attention": "how attention is captured: eager (the model's full [head, T, T] pattern), blocked "
                 "(recomputed in query blocks from q, k, v: memory O(block x T), no pattern), or "
                 f"auto (blocked for sequences longer than {C.BLOCKED_ABOVE} tokens, else eager)",
    "target_layer": "layer of the studied head",
    "target_head": "the studied head in the target layer",
    "control_layer": "layer of the control head",
    "control_head": "the control head in the control layer",
    "alphas": "query scales alpha, separated by spaces or commas or in repeated flags; 1 is the "
              "unscaled model",
    "n_select": "held-out sequences, before the measured ones, that choose the default heads",
    "ci": "confidence level of the intervals",
    "rotation_multiples": "rotation angles of the target's query, in units of its natural direction "
                          "spread (median angle to its mean direction on held-out sequences)",
    "models": "models to include (specs as for --model; 'default' = the embedded model), separated "
              "by spaces or in repeated flags",
    "corpora": "corpora to include (as for --corpus), separated by spaces or in repeated flags",
    "gain_sequences": "sequences of the gain experiment in every cell",
    "run_gain": "also run the gain experiment (EXP2) in every cell",
    "run_causal": "also run the norm ablation (ablate-norm) and the causal map in every cell",
    "causal_sequences": "measured sequences of the norm ablation and the causal map in every cell",
    "causal_seq_len": "tokens per sequence of the norm ablation and the causal map",
    "causal_select": "selection sequences (other documents) of the norm ablation and the causal map",
    "causal_heads": "heads of the norm ablation and the causal map, spread evenly over the model's "
                    "layers and heads; 0 = every head",
    "causal_alphas": "query scales of the causal map in every cell (not 1)",
    "ablation_baselines": "also mean-ablate each head's output and rotate its query in the norm ablation",
    "seed": "random seed: bootstrap resamples, replication split, sampling",
    "dtype": "dtype of the model weights; metrics are always computed in float32",
    "device": "torch device, e.g. cpu or cuda:0",
    "device_map": "spread the model over devices (Hugging Face device_map): auto, balanced, sequential, "
                  "or JSON {\"model.layers.0\": 0, ...}; hooks and metrics run on each layer's device",
    "overwrite": ("replace what the output already holds (a finished run or a different shard set "
                  "in --out, an existing --csv or report --out file and its PDF) instead of refusing"),
    "images": "image copies of every figure (png, svg, png,svg or none), drawn by Chrome/Chromium "
              "in one batch at the end of the run; without a browser the figures stay HTML only",
    "pdf": "also print the page to a PDF beside it (same name, .pdf), with Chrome/Chromium",
    "prepend_bos": "start each sequence with the tokenizer's BOS token",
    "min_tokens": "skip documents shorter than this many tokens",
    "file_format": "shard file format",
    "results_dir": "directory holding run directories (or one run directory); symlinks are followed",
    "plotlyjs": "load plotly.js from this path or URL ('inline': embed it in the page)",
    "n_repeated": "random-token sequences shown twice (induction and positional scores)",
    "half_len": "random tokens per copy of a repeated sequence",
    "window": "keys i - window + 1 ... i count as local to query i",
    "agreement": "agreement.csv to join on (layer, head)",
    "gain": "gain_summary.csv to join on (layer, head)",
    "prompt": "the text to continue",
    "scale": "scale head y of layer x by ALPHA, e.g. L15H8=2.0; several heads separated by spaces "
             "or in repeated flags",
    "kind": "what --scale scales: q the head's effective query, k the key of the kv head it reads "
            "(its whole group), logit a temperature on its attention logits",
    "mode": "greedy continuation, seeded sampling, or both",
    "max_new_tokens": "tokens to generate",
    "temperature": "sampling temperature",
    "top_k": "sample from the k most likely tokens only",
    "eos_stop": "stop a continuation at the end-of-text token",
    "csv": "also write the per-token table to this CSV file",
    "head": "the head: L{layer}H{head}, e.g. L15H8",
    "n_documents": "documents of at least seq_len tokens, spread evenly over the corpus; each "
                   "contributes its first seq_len tokens and is one unit of the intervals",
    "bins_per_octave": "log-position bins per doubling of the position t (bin edges 2^(k/B))",
    "types": "head_types.csv of `spectra-lens head-types` to read this head's scores from",
    "heads": "a head to include, e.g. L15H8; repeat the flag for several",
    "baselines": "also run mean ablation of each head's output and a rotation of its query",
    "norm_ablation": "norm_ablation.csv of `spectra-lens ablate-norm` to join on (layer, head)",
}

# What a default of None means, by field name.
NONE_MEANS: dict[str, str] = {
    "fd_sequences": f"4 where the pattern is eager, 0 above {C.BLOCKED_ABOVE} tokens (blocked capture)",
    "model": "the embedded SmolLM2-135M-Instruct, a Q4_1 GGUF dequantized to float32",
    "corpus": "CPython's reference documentation",
    "device": "CUDA when present, else CPU",
    "target_layer": "the middle layer, n_layers // 2",
    "target_head": "the head of the target layer with the most negative analytic gain -Var_p(s) "
                   "on the held-out selection sequences",
    "control_layer": "any layer",
    "control_head": "the head whose r(log ||q||, entropy) on the held-out sequences is nearest 0 with "
                    "the tightest document interval (any layer, or the control layer when given)",
    "top_mass": "none",
    "n_sequences": "every full sequence of the corpus",
    "prepend_bos": "when the tokenizer has a BOS token",
    "min_tokens": "keep every document",
    "agreement": "no join",
    "gain": "no join",
    "scale": "no scaling: the plain model in both rows",
    "top_k": "the whole vocabulary",
    "csv": "not written",
    "types": "measured on the page's text",
    "prompt": "the first 16 tokens of the text",
    "out": "RESULTS_DIR/report.html",
    "models": "the embedded default model",
    "corpora": "default kjv (reference documentation and narrative prose)",
    "plotlyjs": "one copy written beside the page, which the runs' figure pages load too",
    "heads": "every head of the model",
    "norm_ablation": "no join",
}

TUPLE_NOTE: dict[str, str] = {"alphas": ", log-spaced, including 1"}


@dataclass(frozen=True)
class Command:
    """One subcommand: its config class (in `spectra_lens.config`) and the module that runs it."""

    config: str
    module: str
    help: str


COMMANDS: dict[str, Command] = {
    "observe": Command("ObservationalConfig", "spectra_lens.experiments.observational",
                       "EXP0: query norm vs attention entropy over a corpus"),
    "intervene": Command("InterventionConfig", "spectra_lens.experiments.intervention",
                         "EXP1: scale a head's queries on the real forward pass"),
    "gain": Command("GainConfig", "spectra_lens.experiments.gain",
                    "EXP2: entropy sensitivity to query scale, every head"),
    "qk-control": Command("QKConfig", "spectra_lens.experiments.qk_control",
                          "EXP3: scale keys instead of queries"),
    "study": Command("StudyConfig", "spectra_lens.experiments.study",
                     "EXP0 + agreement (+ gain) over several models and corpora: one table"),
    "prepare": Command("PrepareConfig", "spectra_lens.experiments.prepare",
                       "tokenize a corpus into shards with a manifest"),
    "report": Command("ReportConfig", "spectra_lens.experiments.report", "one HTML page from a results directory"),
    "generate": Command("GenerateConfig", "spectra_lens.experiments.generate",
                        "continue a prompt with and without head scalings, side by side"),
    "head-types": Command("HeadTypesConfig", "spectra_lens.experiments.head_types",
                          "label every head: sink, previous-token, induction, ..."),
    "head": Command("HeadPageConfig", "spectra_lens.experiments.head_page",
                    "one HTML page for one head (e.g. L15H8)"),
    "merge": Command("MergeConfig", "spectra_lens.experiments.merge",
                     "EXP0 or EXP2 tables from the shares of a run (SLURM array, several machines)"),
    "ablate-norm": Command("AblateNormConfig", "spectra_lens.experiments.ablate_norm",
                           "replace every head's query norm by its reference norm; downstream effects"),
    "causal-map": Command("CausalMapConfig", "spectra_lens.experiments.causal_map",
                          "scale every head's query; downstream KL and loss against its gain"),
    "length": Command("LengthConfig", "spectra_lens.experiments.length",
                      "query norm and entropy against position over long documents"),
}

PROG = "spectra-lens"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _version() -> str:
    from spectra_lens import __version__

    return __version__


# --------------------------------------------------------------------------- usage errors


def _suggest(word: str, candidates) -> str:
    """' (did you mean X?)' for the closest of `candidates`, or ''."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: the message, a "did you mean" for a mistyped flag or
    subcommand, and where the help is; no usage block (it is 10+ lines)."""

    def flags(self) -> list[str]:
        return [o for a in self._actions for o in a.option_strings if o.startswith("--")]

    def error(self, message: str):
        m = re.match(r"unrecognized arguments: (.*)", message)
        if m:
            words = m.group(1).split()
            unknown = [w for w in words if w.startswith("-")] or words
            hint = _suggest(unknown[0].split("=")[0], self.flags()) if unknown[0].startswith("-") else ""
            message = f"unrecognized argument{'s' if len(words) > 1 else ''} {' '.join(words)}{hint}"
        m = re.match(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if m:
            choices = [c.strip(" '\"") for c in m.group(3).split(",")]
            what = "command" if m.group(1) == "COMMAND" else m.group(1)
            message = (f"unknown {what} {m.group(2)!r}{_suggest(m.group(2), choices)} "
                       f"(choose from {', '.join(choices)})")
        what = "commands" if self.prog == PROG else "flags"
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} "
                     f"('{self.prog} --help' lists the {what})\n")


# --------------------------------------------------------------------------- flag generation


def _escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse %-formats help strings


def _unwrap(hint) -> tuple[object, bool]:
    """(type without None, whether None is allowed) of an annotation like `int | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported annotation {hint!r}")
        return args[0], True
    return hint, False


def _number(kind: type, *, allow_none: bool):
    """argparse type: a `kind` value, or None for 'none' when allowed."""

    def parse(text: str):
        if allow_none and text.strip().lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(
                f"expected {what}{' or none' if allow_none else ''}, got {text!r}") from None

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _number_list(kind: type):
    """argparse type of one token of a list flag: numbers separated by commas or spaces."""

    def parse(text: str) -> list:
        out = []
        for part in text.replace(",", " ").split():
            try:
                out.append(kind(part))
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected numbers, got {part!r}") from None
        return out

    parse.__name__ = f"{kind.__name__} list"
    return parse


def _show(name: str, value) -> str:
    """A default as the help text shows it."""
    if value is None:
        return NONE_MEANS.get(name, "none")
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        if not value:
            return NONE_MEANS.get(name, "none")
        if len(value) > 4:
            return f"{len(value)} values from {min(value):g} to {max(value):g}" + TUPLE_NOTE.get(name, "")
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _add_field(p: argparse.ArgumentParser, f: dataclasses.Field, hint, default) -> None:
    name = f.name
    text = f.metadata.get("help") or FLAG_HELP.get(name)
    if not text:
        raise TypeError(f"config field {name!r} has no help text: add it to FLAG_HELP in spectra_lens.experiments.cli")
    kind, optional = _unwrap(hint)
    kw: dict = {"dest": name}
    if f.metadata.get("positional"):
        many = typing.get_origin(kind) is tuple  # one or more values
        p.add_argument(name, help=_escape(text), metavar=f.metadata.get("metavar", name.upper()),
                       **({"nargs": "+"} if many else {}))
        return
    flag = "--" + name.replace("_", "-")
    if kind is bool:
        kw["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is tuple:  # a list flag: --x A B and --x A --x B both give (A, B)
        item = typing.get_args(kind)[0]
        kw.update(action="extend", nargs="+")
        if item is not str:  # numbers: a token may also hold several, separated by commas
            kw.update(type=_number_list(item), metavar=name[0].upper())
    elif kind in (int, float):
        kw.update(type=_number(kind, allow_none=optional), metavar="N" if kind is int else "X")
    elif kind is not str:
        raise TypeError(f"config field {name!r}: unsupported type {hint!r}")
    if name in C.CHOICES:
        kw["choices"] = C.CHOICES[name]
    if "metavar" in f.metadata:
        kw["metavar"] = f.metadata["metavar"]
    # a list flag starts empty (argparse would extend a non-empty default); `parse` puts the
    # field's default back when the flag is not given
    kw["default"] = None if kw.get("action") == "extend" else default
    kw["help"] = _escape(f"{text} (default: {_show(name, default)})")
    p.add_argument(flag, **kw)
    if "off" in f.metadata:  # a second flag that sets the field to its "off" value
        off_flag, off_value = f.metadata["off"]
        p.add_argument(off_flag, dest=name, action="store_const", const=off_value,
                       help=_escape(f"same as {flag} {off_value} (default: off)"))


def _common_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="show the library's progress messages: -v INFO, -vv DEBUG (default: off)")
    g.add_argument("--log-level", choices=LOG_LEVELS, default=None, type=str.upper,
                   help="log level of spectra_lens' messages; overrides -v (default: WARNING)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bars (default: off, bars are shown)")
    g.add_argument("--version", action="version", version=f"{PROG} {_version()}",
                   help="print the version and exit")


def config_class(name: str) -> type:
    return getattr(C, COMMANDS[name].config)


def add_command(sub, name: str) -> argparse.ArgumentParser:
    cmd, cls = COMMANDS[name], config_class(name)
    doc = inspect.cleandoc(cls.__doc__ or cmd.help)
    p = sub.add_parser(name, help=cmd.help, description=doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        _add_field(p, f, hints[f.name], defaults[f.name])
    _common_options(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: one subparser per entry of COMMANDS."""
    p = Parser(
        prog=PROG, description="Measure and causally test how query norm controls attention "
                               "entropy in every head of a transformer.",
        epilog=f"'{PROG} COMMAND --help' lists the flags of a command.")
    p.add_argument("--version", action="version", version=f"{PROG} {_version()}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for name in COMMANDS:
        add_command(sub, name)
    return p


# --------------------------------------------------------------------------- running


def flag_names(message: str, cls: type) -> str:
    """A library message as the command line's user reads it: the fields of `cls` it names
    become flags ("n_sequences must be ..." -> "--n-sequences must be ...", "pass
    overwrite=True" -> "pass --overwrite", "images='svg'" -> "--images svg")."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init and not f.metadata.get("positional")}
    flag = {n: "--" + n.replace("_", "-") for n in fields}
    names = "|".join(sorted(map(re.escape, fields), key=len, reverse=True))
    if not names:
        return message

    def assigned(m: re.Match) -> str:
        name, value = m.group(1), m.group(2).strip("'\"")
        if value == "True":
            return flag[name]
        if value == "False":
            return "--no-" + flag[name][2:]
        return f"{flag[name]} {value}"

    # name=value (a keyword argument spelled in a message)
    message = re.sub(rf"(?<![\w.\-/])({names})=('[^']*'|\"[^\"]*\"|[\w.+\-]+)", assigned, message)
    # a field named as the subject of a rule, or any field spelled with an underscore
    message = re.sub(rf"(?<![\w.\-/'\"])({names})(?= must\b| must be\b)",
                     lambda m: flag[m.group(1)], message)
    under = "|".join(sorted((re.escape(n) for n in fields if "_" in n), key=len, reverse=True))
    if under:
        message = re.sub(rf"(?<![\w.\-/'\"])({under})(?![\w/])", lambda m: flag[m.group(1)], message)
    return message


# Other libraries' progress bars (huggingface_hub downloads, transformers' "Loading weights" and
# GGUF conversion, datasets): off under ours, which cover the same steps. Read when those
# libraries are imported, which the command line does after setting them.
_QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


@contextmanager
def quiet_third_party(progress: bool = True):
    """Third-party progress bars off while a command runs; with `progress=False` every tqdm bar
    (`TQDM_DISABLE`), ours included. Variables the user has set are kept."""
    env = dict(_QUIET_ENV, **({} if progress else {"TQDM_DISABLE": "1"}))
    old = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    if "transformers" in sys.modules:  # imported already (a second command in one process)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)


def check_heads_early(cfg) -> None:
    """Layer/head indices of `cfg` against the model's config, before its weights load."""
    heads = []
    for role in ("target", "control"):
        layer, head = getattr(cfg, f"{role}_layer", None), getattr(cfg, f"{role}_head", None)
        if layer is not None or head is not None:
            heads.append((f"--{role}-layer/--{role}-head", layer, head))
    if isinstance(getattr(cfg, "head", None), str):
        from spectra_lens.validate import HeadRef

        heads.append((cfg.head, *HeadRef.parse(cfg.head)))
    for text in getattr(cfg, "scale", ()) or ():
        from spectra_lens.generate import parse_scale

        heads.append((f"--scale {text}", *parse_scale(text)[:2]))
    if heads:
        from spectra_lens.models import check_heads

        check_heads(getattr(cfg, "model", None), heads)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line, without the source line underneath (it reads like a traceback)."""
    return f"warning: {' '.join(str(message).split())}\n"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` of a command: the one-line warning written above any live progress
    bar (`display.write`), not into the middle of the bar's line."""
    display.write(_one_line_warning(message, category, filename, lineno, line), file=file)


class _BarSafeHandler(logging.Handler):
    """Log records on stderr (as it is at each record), written above any live progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            display.write(self.format(record))
        except Exception:
            self.handleError(record)


@contextmanager
def one_line_warnings():
    """Warnings as one line each (`_one_line_warning`), printed above any live progress bar;
    Python's own formatter and printer are put back on exit."""
    was = warnings.formatwarning, warnings.showwarning
    warnings.formatwarning, warnings.showwarning = _one_line_warning, _show_warning
    try:
        yield
    finally:
        warnings.formatwarning, warnings.showwarning = was


def configure_logging(verbose: int = 0, level: str | None = None) -> int:
    """Messages of spectra_lens at `level` (else WARNING, INFO with -v, DEBUG with -vv);
    other libraries stay at WARNING unless DEBUG is asked for."""
    if level is None:
        level = LOG_LEVELS[max(0, 2 - verbose)]
    value = getattr(logging, level)
    logging.basicConfig(level=logging.DEBUG if value == logging.DEBUG else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", handlers=[_BarSafeHandler()])
    logging.getLogger("spectra_lens").setLevel(value)
    return value


def parse(argv: list[str]) -> tuple[str, object, argparse.Namespace]:
    """(command, config, the common options) from `argv`; argparse exits on a usage error."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's parser, which knows its flags
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    values = vars(args).copy()
    name = values.pop("command")
    for key in ("verbose", "log_level", "no_progress"):
        values.pop(key)
    cls = config_class(name)
    for f in dataclasses.fields(cls):  # list flags: tokens may each hold several numbers
        if f.name in values and values[f.name] is None and typing.get_origin(
                _unwrap(typing.get_type_hints(cls)[f.name])[0]) is tuple:
            del values[f.name]  # not given: the field's default
        elif isinstance(values.get(f.name), list):
            values[f.name] = tuple(x for token in values[f.name] for x in
                                   (token if isinstance(token, list) else [token]))
    return name, cls(**values), args


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a usage or input error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        name, cfg, args = parse(argv)
    except SystemExit as e:  # --help, --version, or a usage error argparse has printed
        return e.code if isinstance(e.code, int) else 2
    configure_logging(args.verbose, args.log_level)
    from spectra_lens.errors import SpectraError, run_command

    def command(_argv) -> int:
        t0 = time.perf_counter()
        try:
            check_heads_early(cfg)
            # torch, transformers, scipy and the experiment: a few seconds before any bar
            with display.note_if_slow(f"{name}: importing torch and the experiment's code ...",
                                      enabled=not args.no_progress):
                module = importlib.import_module(COMMANDS[name].module)
            status = module.command(cfg, progress=not args.no_progress)
        except SpectraError as e:  # the library's message, with flags for the fields it names
            raise SpectraError(flag_names(str(e), type(cfg))) from e
        logging.getLogger("spectra_lens.experiments.cli").info("%s finished in %.1f s", name, time.perf_counter() - t0)
        return int(status or 0)

    # a user error: one line, exit 2; Ctrl-C: one line, exit 130; warnings: one line each,
    # above the progress bars
    with one_line_warnings(), quiet_third_party(not args.no_progress):
        return run_command(command, argv)


if __name__ == "__main__":
    sys.exit(main())

"""The `spectra-lens` command: one subcommand per experiment, each the experiment's own CLI."""

import importlib
import sys

__all__ = ["main"]

# subcommand -> (module with main(argv), one-line help)
COMMANDS = {
    "observe": ("spectra_lens.experiments.observational", "EXP0: query norm vs attention entropy over a corpus"),
    "intervene": ("spectra_lens.experiments.intervention", "EXP1: scale a head's queries on the real forward pass"),
    "gain": ("spectra_lens.experiments.gain", "EXP2: entropy sensitivity to query scale, every head"),
    "qk-control": ("spectra_lens.experiments.qk_control", "EXP3: scale keys instead of queries"),
    "prepare": ("spectra_lens.experiments.prepare", "tokenize a corpus into shards with a manifest"),
    "report": ("spectra_lens.report", "one HTML page from a results directory"),
    "generate": ("spectra_lens.generate", "continue a prompt with and without head scalings, side by side"),
    "head-types": ("spectra_lens.experiments.head_types", "label every head: sink, previous-token, induction, ..."),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: spectra-lens COMMAND [options]   (spectra-lens COMMAND --help)\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; expected one of {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())

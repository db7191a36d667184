"""The command line generated from the configs: every flag documented with its default, one
meaning per flag name, parsing into configs, logging levels, and no torch import for --help."""

import argparse
import dataclasses
import logging
import os
import re
import subprocess
import sys

import pytest
from spectra_lens.experiments import cli

import spectra_lens
from spectra_lens import config

COMMANDS = list(cli.COMMANDS)
SKIP = {"-h", "--help", "--version"}
_DEFAULT = re.compile(r"\s*\(default: [^()]*(\([^()]*\)[^()]*)*\)$")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _flags(p: argparse.ArgumentParser) -> dict[str, str]:
    """{first option string: help text} of every optional flag."""
    return {next(o for o in a.option_strings if o.startswith("--")): " ".join((a.help or "").split())
            for a in p._actions if a.option_strings and not SKIP & set(a.option_strings)}


@pytest.mark.parametrize("name", COMMANDS)
def test_every_flag_of_every_subcommand_has_help_and_a_default(name, capsys):
    assert cli.main([name, "--help"]) == 0
    page = " ".join(capsys.readouterr().out.split())
    assert page.startswith(f"usage: spectra-lens {name} ")
    flags = _flags(_subparsers()[name])
    fields = {f.name for f in dataclasses.fields(cli.config_class(name))}
    for flag, text in flags.items():
        assert flag in page
        assert len(text) > 12 and _DEFAULT.search(text), f"{name} {flag}: {text!r}"
    for field in fields:  # one flag per config field (a positional for the report's directory)
        assert f"--{field.replace('_', '-')}" in flags or field.upper() in page, field
    assert {"--log-level", "--verbose", "--no-progress"} <= set(flags)


def test_a_flag_means_the_same_thing_in_every_subcommand():
    meaning: dict[str, dict[str, str]] = {}
    for name, p in _subparsers().items():
        for flag, text in _flags(p).items():
            meaning.setdefault(flag, {})[name] = _DEFAULT.sub("", text)
    shared = {f: m for f, m in meaning.items() if len(m) > 1}
    assert {"--batch-size", "--seq-len", "--n-sequences", "--model", "--corpus"} <= set(shared)
    for flag, per_command in shared.items():
        if flag == "--out":  # where each command writes: a run, a shard set, a page
            continue
        assert len(set(per_command.values())) == 1, (flag, per_command)


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert cli.main(["gain", "--version"]) == 0
    out = capsys.readouterr().out.split("\n")
    assert out[0] == out[1] == f"spectra-lens {spectra_lens.__version__}"


def test_flags_parse_into_the_config():
    name, cfg, args = cli.parse(["gain", "--alphas", "0.5,1", "2", "--target-head", "3",
                                 "--batch-size", "4", "-vv", "--no-progress"])
    assert name == "gain" and isinstance(cfg, config.GainConfig)
    assert cfg.alphas == (0.5, 1.0, 2.0) and cfg.target_head == 3 and cfg.batch_size == 4
    assert cfg.target_layer is None and cfg == dataclasses.replace(
        config.GainConfig(), alphas=(0.5, 1.0, 2.0), target_head=3, batch_size=4)
    assert args.verbose == 2 and args.no_progress
    _, obs, _ = cli.parse(["observe", "--top-mass", "none", "--n-sequences", "16"])
    assert obs.top_mass is None and obs.n_sequences == 16
    _, rep, _ = cli.parse(["report", "results", "--out", "page.html"])
    assert rep == config.ReportConfig(results_dir="results", out="page.html")
    _, prep, _ = cli.parse(["prepare", "--no-prepend-bos", "--file-format", "npy"])
    assert prep.prepend_bos is False and prep.file_format == "npy" and prep.out == "results/shards"
    assert prep.shard_size == config.ObservationalConfig().shard_size


@pytest.mark.parametrize("argv", [["gain", "--batch-size", "two"], ["gain", "--alphas", "1,x"],
                                  ["observe", "--dtype", "int8"], ["nope"], []])
def test_usage_errors_return_2(argv, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("spectra-lens") and ": error: " in err and err.count("\n") == 1, err


def test_log_levels():
    lib = logging.getLogger("spectra_lens")
    try:
        assert cli.configure_logging(0) == logging.WARNING
        assert not lib.isEnabledFor(logging.INFO)
        cli.configure_logging(1)
        assert lib.isEnabledFor(logging.INFO) and not lib.isEnabledFor(logging.DEBUG)
        assert logging.getLogger("spectra_lens.models").isEnabledFor(logging.INFO)
        assert cli.configure_logging(0, "DEBUG") == logging.DEBUG
        assert cli.configure_logging(2, "ERROR") == logging.ERROR  # --log-level wins over -v
    finally:
        lib.setLevel(logging.NOTSET)


def test_help_and_import_do_not_import_torch():
    """--help builds the parser from the configs alone; `import spectra_lens` is lazy too."""
    code = ("import sys, spectra_lens; from spectra_lens.experiments import cli; "
            "status = cli.main(['gain', '--help']); "
            "assert status == 0, status; "
            "heavy = sorted(m for m in ('torch', 'transformers', 'transformer_lens', 'pandas', "
            "'plotly', 'experiments') if m in sys.modules) + sorted(m for m in sys.modules if "
            "m.startswith('spectra_lens.experiments.') and m != 'spectra_lens.experiments.cli'); "
            "assert not heavy, heavy; "
            "assert spectra_lens.SpectraError.__name__ == 'SpectraError'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "--batch-size" in done.stdout


_CAPTURE = ("import os, sys, spectra_lens, torch; "
            "from spectra_lens.models import bridge_from_hf; from spectra_lens.testing import tiny_hf_model; "
            "m = bridge_from_hf(tiny_hf_model('llama_gqa')); "
            "t = torch.randint(0, m.cfg.d_vocab, (4, 24), generator=torch.Generator().manual_seed(0)); "
            "tm = spectra_lens.capture_metrics(m, t); "
            "torch.save({k: getattr(tm, k) for k in ('entropy', 'q_norm', 'max_attn')}, sys.argv[1]); "
            "print(os.environ.get('OMP_WAIT_POLICY'))")


def test_import_lets_idle_openmp_threads_sleep_and_the_numbers_do_not_change(tmp_path):
    """`import spectra_lens` before torch sets OMP_WAIT_POLICY=PASSIVE (a value the user set is
    kept): idle threads stop competing for shared cores. The captured metrics are the same bit
    for bit either way."""
    import torch

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    got = {}
    for policy in (None, "ACTIVE"):
        run_env = env if policy is None else {**env, "OMP_WAIT_POLICY": policy}
        path = tmp_path / f"{policy}.pt"
        done = subprocess.run([sys.executable, "-c", _CAPTURE, str(path)], capture_output=True,
                              text=True, env=run_env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == (policy or "PASSIVE")
        got[policy] = torch.load(path)
    for name, value in got[None].items():
        torch.testing.assert_close(value, got["ACTIVE"][name], rtol=0, atol=0, equal_nan=True)


def test_lazy_package_exports_every_public_name():
    assert sorted(spectra_lens.__all__) == sorted(spectra_lens._EXPORTS)
    assert set(spectra_lens.__all__) <= set(dir(spectra_lens))
    with pytest.raises(AttributeError, match="no_such_name"):
        spectra_lens.no_such_name  # noqa: B018


def test_every_config_field_has_help_text():
    for name in COMMANDS:
        for f in dataclasses.fields(cli.config_class(name)):
            assert f.metadata.get("help") or cli.FLAG_HELP.get(f.name), (name, f.name)


def test_report_follows_symlinked_run_directories(tmp_path, capsys):
    from spectra_lens.experiments.report import find_runs

    elsewhere = tmp_path / "scratch" / "gain-run"
    elsewhere.mkdir(parents=True)
    (elsewhere / "manifest.json").write_text('{"experiment": "gain", "status": "running"}')
    results = tmp_path / "results"
    results.mkdir()
    (results / "gain").symlink_to(elsewhere, target_is_directory=True)
    (results / "loop").symlink_to(results, target_is_directory=True)  # walked once, no hang
    runs = find_runs(results)
    assert [(r.experiment, r.path) for r in runs] == [("gain", results / "gain")]
    assert cli.main(["report", str(results), "--out", str(tmp_path / "page.html")]) == 0
    assert "gain (running)" in capsys.readouterr().out and (tmp_path / "page.html").exists()


def test_run_options_are_declared_once_and_exist_wherever_they_apply():
    """Every experiment config composes `config.RunOptions`; a command that loads a model has
    the device options, one that draws figures has --images and --no-images."""
    flags = {name: set(_flags(p)) for name, p in _subparsers().items()}
    for name in ("observe", "intervene", "gain", "qk-control", "head-types"):
        assert issubclass(cli.config_class(name), config.RunOptions), name
        assert {"--model", "--dtype", "--device", "--device-map", "--out", "--overwrite", "--seed",
                "--images", "--no-images"} <= flags[name], name
    for name in ("study", "generate", "head"):  # load a model
        assert {"--dtype", "--device", "--device-map"} <= flags[name], name
    for name in ("study", "merge"):  # write runs with figures
        assert {"--out", "--overwrite", "--images", "--no-images"} <= flags[name], name
    for cls in (config.ObservationalConfig, config.GainConfig, config.StudyConfig):
        declared = {k for k in vars(cls).get("__annotations__", {})}
        assert not declared & {"dtype", "device", "device_map", "overwrite", "images"}, cls


def test_list_flags_take_spaces_and_repeats_alike():
    """`--models a b --models c` gives (a, b, c); numbers may also be separated by commas; a list
    flag not given keeps the field's default (argparse would extend a non-empty default)."""
    _, cfg, _ = cli.parse(["study", "--models", "a", "b", "--models", "c", "--corpora", "kjv"])
    assert cfg.models == ("a", "b", "c") and cfg.corpora == ("kjv",)
    _, cfg, _ = cli.parse(["gain", "--alphas", "0.5", "1", "--alphas", "2,4"])
    assert cfg.alphas == (0.5, 1.0, 2.0, 4.0)
    assert cli.parse(["gain"])[1].alphas == config.ALPHAS_21
    assert cli.parse(["intervene"])[1].alphas == config.ALPHAS_9
    _, cfg, _ = cli.parse(["generate", "the cat", "--scale", "L1H2=2", "L0H0=3", "--scale", "L2H1=.5"])
    assert cfg.scale == ("L1H2=2", "L0H0=3", "L2H1=.5") and cfg.prompt == "the cat"
    assert cli.parse(["merge", "a", "b"])[1].run_dir == ("a", "b")


def test_the_library_never_imports_the_experiments():
    """No module of the library imports an experiment module, by an import statement or by
    name (importlib); the command line lives with the experiments."""
    import ast
    from pathlib import Path

    root = Path(spectra_lens.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [node.value] if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and " " not in node.value else []
            if any(n == "spectra_lens.experiments" or n.startswith("spectra_lens.experiments.")
                   for n in names):
                offenders.append(str(path.relative_to(root)))
    assert offenders == []


def test_no_import_cycle_among_the_library_modules():
    """The module-level imports of spectra_lens/ form a DAG (imports inside functions are the
    deliberate lazy ones and are left out)."""
    import ast
    from pathlib import Path

    root = Path(spectra_lens.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = graph.setdefault(name, set())
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spectra_lens"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("spectra_lens"))
    for name in graph:
        graph[name] = {d for d in graph[name] if d in graph and d != name
                       and not name.startswith(d + ".")}  # a package's own __init__ is not a cycle
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for d in sorted(graph[node]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, d]))
            if d not in state:
                visit(d, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])

"""The tiny model every test of runs/ gives the command line as `--model DIR`."""

from pathlib import Path

import cli_processes as procs
import pytest


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (GQA) with its word-level tokenizer, saved once for the session."""
    return procs.save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))

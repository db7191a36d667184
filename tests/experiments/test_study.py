"""The study driver (experiments/study.py): cells over models × corpora, one table and figure."""

import json

import pandas as pd
import pytest
import torch
from spectra_lens.experiments import study

from spectra_lens.config import StudyConfig
from spectra_lens.data.shards import write_shards
from spectra_lens.errors import SpectraError


def _shards(path, seed):
    tokens = torch.randint(1, 97, (8, 12), generator=torch.Generator().manual_seed(seed))
    write_shards(tokens, path, shard_size=4, tokenizer_name="tiny", corpus=f"random {seed}")
    return str(path)


def test_study_runs_every_cell_and_writes_one_table_and_figure(tmp_path, tiny):
    model, _ = tiny("llama_gqa")
    corpora = (_shards(tmp_path / "a", 1), _shards(tmp_path / "b", 2))
    cfg = StudyConfig(models=("tiny",), corpora=corpora, out=str(tmp_path / "study"),
                            n_sequences=8, seq_len=12, batch_size=4, gain_sequences=4)
    result = study.run(cfg, models={"tiny": model}, progress=False)
    table = pd.read_csv(tmp_path / "study" / "study_table.csv")
    assert list(table.columns) == list(study.STUDY_COLUMNS)
    assert len(table) == 2 and set(table["corpus"]) == set(corpora)
    assert (table["n_heads"] == 8).all()
    assert table["median_r_logq_entropy"].between(-1, 1).all()
    assert table["median_gain_entropy"].notna().all() and (table["median_causal_gain"] <= 0).all()
    assert (tmp_path / "study" / "figures" / "study_comparison.html").exists()
    assert table["median_obs_slope"].notna().all() and table["spearman_slope_gain"].between(-1, 1).all()
    manifest = json.loads((tmp_path / "study" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "median_obs_slope" in manifest["definitions"]
    for obs_dir in table["observational_dir"]:
        assert (tmp_path / "study").as_posix() in obs_dir
    assert "StudyResult" in repr(result) and "<table" in result._repr_html_()


def test_study_config_is_checked():
    with pytest.raises(SpectraError, match="models"):
        StudyConfig(models=("",)).validate()
    assert StudyConfig().cells() == (("default",), ("default", "kjv"))
    with pytest.raises(SpectraError, match="distinct"):
        StudyConfig(corpora=("kjv", "kjv")).validate()
    with pytest.raises(SpectraError, match="n_sequences"):
        StudyConfig(n_sequences=0).validate()


def test_study_command_line_is_generated_from_its_config():
    from spectra_lens.experiments.cli import parse

    name, cfg, _ = parse(["study", "--models", "default", "--models", "Qwen2.5-Coder-0.5B-Instruct",
                          "--corpora", "kjv", "--no-run-gain", "--n-sequences", "32"])
    assert name == "study" and cfg.models == ("default", "Qwen2.5-Coder-0.5B-Instruct")
    assert cfg.corpora == ("kjv",) and cfg.run_gain is False and cfg.n_sequences == 32

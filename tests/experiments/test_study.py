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
    """8 sequences of 12 tokens, one document each."""
    tokens = torch.randint(1, 97, (8, 12), generator=torch.Generator().manual_seed(seed))
    write_shards(tokens, path, shard_size=4, tokenizer_name="tiny", corpus=f"random {seed}",
                 documents=list(range(8)))
    return str(path)


def test_study_runs_every_cell_and_writes_one_table_and_figure(tmp_path, tiny):
    model, _ = tiny("llama_gqa")
    corpora = (_shards(tmp_path / "a", 1), _shards(tmp_path / "b", 2))
    cfg = StudyConfig(models=("tiny",), corpora=corpora, out=str(tmp_path / "study"),
                      n_sequences=8, seq_len=12, batch_size=4, gain_sequences=4,
                      causal_sequences=4, causal_seq_len=12, causal_select=2, causal_heads=5)
    result = study.run(cfg, models={"tiny": model}, progress=False)
    table = pd.read_csv(tmp_path / "study" / "study_table.csv")
    assert list(table.columns) == list(study.STUDY_COLUMNS)
    assert len(table) == 2 and set(table["corpus"]) == set(corpora)
    assert (table["n_heads"] == 8).all()
    assert table["median_r_logq_entropy"].between(-1, 1).all()
    assert table["median_gain_entropy"].notna().all() and (table["median_causal_gain"] <= 0).all()
    assert (tmp_path / "study" / "figures" / "study_comparison.html").exists()
    assert table["median_obs_slope"].notna().all() and table["spearman_slope_gain"].between(-1, 1).all()
    # the norm counterfactual, the norm ablation and the causal map, per cell
    assert table["median_norm_share"].notna().all()
    assert (table["ablation_n_heads"] == 5).all() and (table["ablation_n_sequences"] == 4).all()
    assert (table["max_norm_ablation_kl"] >= table["median_norm_ablation_kl"]).all()
    assert (table["median_norm_ablation_kl"] >= 0).all()
    assert table["frac_norm_ablation_loss_excludes_0"].between(0, 1).all()
    assert table["median_norm_minus_rotation_kl"].notna().all()
    for a in ("a0.5", "a2"):
        assert table[f"map_spearman_gain_kl_{a}"].between(-1, 1).all()
        assert table[f"map_spearman_norm_kl_{a}"].between(-1, 1).all()
        assert (table[f"map_median_kl_{a}"] >= 0).all()
    for _, row in table.iterrows():
        ablation = pd.read_csv(f"{row['ablate_dir']}/norm_ablation.csv")
        heads = set(ablation["head_label"])
        assert len(heads) == 5 and heads == set(pd.read_csv(f"{row['map_dir']}/causal_map.csv")["head_label"])
    manifest = json.loads((tmp_path / "study" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "median_obs_slope" in manifest["definitions"]
    assert "median_norm_ablation_kl" in manifest["definitions"]
    for obs_dir in table["observational_dir"]:
        assert (tmp_path / "study").as_posix() in obs_dir
    assert "StudyResult" in repr(result) and "<table" in result._repr_html_()


def test_spread_heads_and_the_columns_follow_the_alphas():
    assert study.spread_heads(30, 9, 0) == () and study.spread_heads(2, 4, 8) == ()
    heads = study.spread_heads(30, 9, 24)
    assert len(heads) == 24 and heads[0] == "L0H0" and heads[-1] == "L29H8"
    assert len({h.split("H")[0] for h in heads}) >= 20, "spread over the layers"
    cols = study.study_columns((0.25, 4.0))
    assert "map_spearman_gain_kl_a0.25_ci_low" in cols and "map_median_kl_a4" in cols
    assert "map_spearman_gain_kl_a2" not in cols and cols[-4:] == study._DIR_COLUMNS


def test_study_config_is_checked():
    with pytest.raises(SpectraError, match="models"):
        StudyConfig(models=("",)).validate()
    assert StudyConfig().cells() == (("default",), ("default", "kjv"))
    with pytest.raises(SpectraError, match="distinct"):
        StudyConfig(corpora=("kjv", "kjv")).validate()
    with pytest.raises(SpectraError, match="n_sequences"):
        StudyConfig(n_sequences=0).validate()
    with pytest.raises(SpectraError, match="causal_alphas"):
        StudyConfig(causal_alphas=(0.5, 1.0)).validate()
    with pytest.raises(SpectraError, match="causal_sequences"):
        StudyConfig(causal_sequences=1).validate()


def test_study_command_line_is_generated_from_its_config():
    from spectra_lens.experiments.cli import parse

    name, cfg, _ = parse(["study", "--models", "default", "--models", "Qwen2.5-Coder-0.5B-Instruct",
                          "--corpora", "kjv", "--no-run-gain", "--n-sequences", "32",
                          "--causal-heads", "24", "--causal-alphas", "0.5,2", "--no-ablation-baselines"])
    assert name == "study" and cfg.models == ("default", "Qwen2.5-Coder-0.5B-Instruct")
    assert cfg.corpora == ("kjv",) and cfg.run_gain is False and cfg.n_sequences == 32
    assert cfg.causal_heads == 24 and cfg.causal_alphas == (0.5, 2.0) and cfg.ablation_baselines is False
    assert cfg.run_causal is True and cfg.fd_sequences is None
    assert parse(["study", "--fd-sequences", "0"])[1].fd_sequences == 0

"""Head types: the scores on hand-made patterns, the label rule, and a planted circuit whose
previous-token and induction heads (weights set by hand) are labelled as such."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from spectra_lens.experiments.head_types import run

from spectra_lens.capture import count_hooks
from spectra_lens.config import HeadTypesConfig
from spectra_lens.errors import SpectraError
from spectra_lens.head_types import (
    LABELS,
    THRESHOLDS,
    DiagnosticInputs,
    _repeated_scores,
    _text_scores,
    by_label,
    diagnostic_inputs,
    head_type_scores,
    join_heads,
    label_heads,
)
from spectra_lens.testing import (
    PLANTED_INDUCTION_HEAD,
    PLANTED_PREV_TOKEN_HEAD,
    planted_circuit_model,
)


def _one_hot(rows: list[int], n: int) -> torch.Tensor:
    """A [1, 1, n, n] pattern with all of row i's mass on key rows[i]."""
    p = torch.zeros(1, 1, n, n)
    p[0, 0, torch.arange(n), torch.tensor(rows)] = 1.0
    return p


def test_text_scores_of_hand_made_patterns():
    n = 8
    sink = _text_scores(_one_hot([0] * n, n), window=4)
    assert sink["sink_score"].item() == 1.0 and sink["prev_token_score"].item() == 0.0
    assert sink["local_score"].item() == 0.0 and sink["entropy_norm"].item() == 0.0
    prev = _text_scores(_one_hot([0] + list(range(n - 1)), n), window=4)
    assert prev["prev_token_score"].item() == 1.0 and prev["local_score"].item() == 1.0
    assert prev["sink_score"].item() == pytest.approx(1 / 7)  # only row 1's previous token is 0
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    u = _text_scores(uniform[None, None], window=4)
    assert u["entropy_norm"].item() == pytest.approx(1.0)
    assert u["mean_entropy"].item() == pytest.approx(np.mean(np.log(np.arange(2, n + 1))))


def test_induction_and_positional_scores_of_hand_made_patterns():
    T, first = 5, 1
    n = first + 2 * T
    target = [0] * (first + T) + [i - T + 1 for i in range(first + T, n)]
    ind = _repeated_scores(_one_hot(target, n).repeat(3, 1, 1, 1), T, first)
    assert torch.allclose(ind["induction_score"], torch.ones(3, 1))
    assert torch.allclose(ind["positional_score"], torch.ones(3, 1))  # the same on every sequence
    prev = _repeated_scores(_one_hot([0] + list(range(n - 1)), n), T, first)
    assert prev["induction_score"].item() == 0.0
    # content-dependent rows: each sequence attends somewhere else
    p = torch.stack([_one_hot([0] + [max(0, i - s) for i in range(1, n)], n)[0] for s in (1, 2)])
    assert _repeated_scores(p, T, first)["positional_score"].mean().item() == pytest.approx(0.6)


def test_label_rule_first_match_wins():
    rows = pd.DataFrame([
        dict(induction_score=0.5, prev_token_score=0.9, sink_score=0.9, local_score=0.9,
             entropy_norm=0.1, positional_score=0.9),
        dict(induction_score=0.1, prev_token_score=0.6, sink_score=0.9, local_score=0.9,
             entropy_norm=0.1, positional_score=0.9),
        dict(induction_score=0.0, prev_token_score=0.1, sink_score=0.7, local_score=0.0,
             entropy_norm=0.2, positional_score=0.9),
        dict(induction_score=0.0, prev_token_score=0.3, sink_score=0.1, local_score=0.6,
             entropy_norm=0.2, positional_score=0.2),
        dict(induction_score=0.0, prev_token_score=0.0, sink_score=0.1, local_score=0.1,
             entropy_norm=0.95, positional_score=0.95),
        dict(induction_score=0.0, prev_token_score=0.0, sink_score=0.1, local_score=0.1,
             entropy_norm=0.5, positional_score=0.85),
        dict(induction_score=0.0, prev_token_score=0.0, sink_score=0.1, local_score=0.1,
             entropy_norm=0.5, positional_score=0.5),
    ])
    assert list(label_heads(rows)) == list(LABELS)
    assert [t[0] for t in THRESHOLDS] + ["mixed"] == list(LABELS)
    with pytest.raises(SpectraError, match="missing"):
        label_heads(rows.drop(columns="sink_score"))


@pytest.fixture(scope="module")
def planted():
    return planted_circuit_model()


def test_planted_previous_token_and_induction_heads_are_labelled(planted):
    text = torch.randint(1, 97, (4, 40), generator=torch.Generator().manual_seed(5))
    inputs = diagnostic_inputs(planted, text, n_repeated=4, half_len=20)
    assert inputs.first == 0 and inputs.repeated.shape == (4, 40)  # no tokenizer: no BOS
    types = head_type_scores(planted, inputs)
    assert len(types) == 8 and set(types["label"]) <= set(LABELS)
    label = {(r.layer, r.head): r.label for r in types.itertuples()}
    assert label[PLANTED_PREV_TOKEN_HEAD] == "previous-token"
    assert label[PLANTED_INDUCTION_HEAD] == "induction"
    others = {k: v for k, v in label.items() if k not in (PLANTED_PREV_TOKEN_HEAD, PLANTED_INDUCTION_HEAD)}
    assert set(others.values()) == {"diffuse"}  # zero weights: uniform attention
    row = types.set_index(["layer", "head"])
    assert row.loc[PLANTED_PREV_TOKEN_HEAD, "prev_token_score"] > 0.95
    assert row.loc[PLANTED_INDUCTION_HEAD, "induction_score"] > 0.8
    assert row.loc[PLANTED_INDUCTION_HEAD, "prev_token_score"] < 0.2
    assert row["analytic_gain"].idxmin() == PLANTED_INDUCTION_HEAD
    assert count_hooks(planted) == 0


def test_join_and_by_label_answer_which_type_has_the_most_negative_gain():
    types = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
                          "label": ["previous-token", "diffuse", "diffuse", "induction"],
                          "analytic_gain": [-0.1, 0.0, 0.0, -0.7]})
    gain = pd.DataFrame({"layer": [1, 0, 1, 0], "head": [1, 1, 0, 0], "gain_entropy": [-0.9, 0.1, 0.0, -0.2],
                         "analytic_gain": [-0.71, 0.0, 0.0, -0.1]})
    joined = join_heads(types, gain, suffixes=("_gain",))
    assert list(joined.columns) == ["layer", "head", "label", "analytic_gain", "gain_entropy", "analytic_gain_gain"]
    assert joined.loc[3, "gain_entropy"] == -0.9
    summary = by_label(joined, "gain_entropy")
    assert summary.iloc[0]["label"] == "induction" and summary.iloc[0]["mean_rank"] == 1.0
    assert summary.set_index("label").loc["diffuse", "n"] == 2
    with pytest.raises(SpectraError, match="more than one row"):
        join_heads(types, pd.concat([gain, gain]))
    with pytest.raises(SpectraError, match="'head'"):
        join_heads(types, gain.drop(columns="head"))


def test_head_types_run_writes_the_joined_tables_and_figures(planted, tmp_path):
    heads = pd.DataFrame({"layer": np.repeat([0, 1], 4), "head": np.tile(np.arange(4), 2)})
    gain = heads.assign(gain_entropy=np.linspace(-1, 0.4, 8), analytic_gain=np.linspace(-0.9, 0.3, 8))
    agreement = heads.assign(obs_slope=np.linspace(-0.5, 0.5, 8), gain_analytic=np.linspace(-1, 0, 8),
                             verdict="agree")
    gain.to_csv(tmp_path / "gain_summary.csv", index=False)
    agreement.to_csv(tmp_path / "agreement.csv", index=False)
    text = torch.randint(1, 97, (4, 40), generator=torch.Generator().manual_seed(5))
    cfg = HeadTypesConfig(out=str(tmp_path / "run"), n_sequences=4, seq_len=40, n_repeated=4, half_len=20,
                          agreement=str(tmp_path / "agreement.csv"), gain=str(tmp_path / "gain_summary.csv"))
    result = run(cfg, model=planted, tokens=text, progress=False)
    out = tmp_path / "run"
    types = pd.read_csv(out / "head_types.csv")
    assert len(types) == 8 and {"label", "gain_entropy", "obs_slope", "verdict", "analytic_gain_gain"} <= set(types.columns)
    assert types.set_index(["layer", "head"]).loc[PLANTED_INDUCTION_HEAD, "label"] == "induction"
    summary = pd.read_csv(out / "head_types_by_label.csv")
    assert set(summary["value"]) == {"analytic_gain", "obs_slope", "gain_analytic", "gain_entropy"}
    own = summary[summary["value"] == "analytic_gain"]
    assert own.iloc[0]["label"] == "induction" and own.iloc[0]["mean_rank"] == 1.0
    figures = {p.stem for p in (out / "figures").glob("*.html")}
    assert {"head_types_map", "head_type_scores", "analytic_gain_by_type", "gain_entropy_by_type"} <= figures
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["label_rule"]
    assert "induction" in repr(result) and count_hooks(planted) == 0
    with pytest.raises(SpectraError, match="readable CSV"):
        run(HeadTypesConfig(out=str(tmp_path / "bad"), gain=str(tmp_path / "nope.csv")), model=planted, tokens=text)


def _tl_scores(model, tokens: torch.Tensor) -> dict[str, np.ndarray]:
    """TransformerLens's own head_detector scores ("mul", no exclusions) of every head on each
    sequence of `tokens`, from the bridge's cached patterns: [layer, head], mean over sequences."""
    from transformer_lens.head_detector import (
        compute_head_attention_similarity_score,
        get_duplicate_token_head_detection_pattern,
        get_induction_head_detection_pattern,
    )

    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    out = {k: np.zeros((len(tokens), n_layers, n_heads)) for k in ("induction", "duplicate")}
    for b, seq in enumerate(tokens):
        with torch.no_grad():
            _, cache = model.run_with_cache(seq[None], return_type=None)
        detect = {"induction": get_induction_head_detection_pattern(seq[None]),
                  "duplicate": get_duplicate_token_head_detection_pattern(seq[None])}
        for layer in range(n_layers):
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0].float()
            for head in range(n_heads):
                for k, d in detect.items():
                    out[k][b, layer, head] = compute_head_attention_similarity_score(
                        pattern[head], d, exclude_bos=False, exclude_current_token=False,
                        error_measure="mul")
    return {k: v.mean(0) for k, v in out.items()}


@pytest.mark.parametrize("first", [0, 1])
def test_induction_and_duplicate_scores_are_head_detectors_times_rows_over_targets(planted, first):
    """Ours divide the mass on the targets by the T rows of the second copy, TransformerLens's
    by all first + 2T rows: with distinct random tokens, theirs = T / (first + 2T) · ours."""
    T, n_rep = 12, 3
    g = torch.Generator().manual_seed(7)
    blocks = torch.stack([torch.randperm(90, generator=g)[:T] + 2 for _ in range(n_rep)])
    lead = torch.ones(n_rep, first, dtype=torch.long)  # token 1: never in a block
    repeated = torch.cat([lead, blocks, blocks], dim=1)
    text = torch.randint(1, 97, (2, 16), generator=g)
    types = head_type_scores(planted, DiagnosticInputs(text, repeated, T, first), gain=False)
    tl = _tl_scores(planted, repeated)
    n_layers, n_heads = planted.cfg.n_layers, planted.cfg.n_heads
    for ours, theirs in (("induction_score", "induction"), ("duplicate_token_score", "duplicate")):
        got = types[ours].to_numpy().reshape(n_layers, n_heads)
        np.testing.assert_allclose(tl[theirs], T / (first + 2 * T) * got, rtol=1e-5, atol=1e-7)
    ind = types.set_index(["layer", "head"]).loc[PLANTED_INDUCTION_HEAD, "induction_score"]
    assert ind > 0.8  # the comparison is made where the score is large, not only near 0
    assert tl["induction"][PLANTED_INDUCTION_HEAD] == pytest.approx(ind * T / (first + 2 * T), rel=1e-5)


def test_duplicate_token_score_of_a_hand_made_pattern():
    T, first = 5, 1
    n = first + 2 * T
    target = [0] * (first + T) + [i - T for i in range(first + T, n)]
    s = _repeated_scores(_one_hot(target, n), T, first)
    assert s["duplicate_token_score"].item() == 1.0 and s["induction_score"].item() == 0.0

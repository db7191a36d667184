"""TransformerLens-style conveniences: text wherever tokens are accepted, the token-labelled
attention figure, HTML representations of every result type, labelled progress bars."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from spectra_lens import (
    KeyScale,
    QueryScale,
    analytic_gain,
    attention_layout,
    capture_metrics,
    head_curves,
    intervention_effects,
)
from spectra_lens.errors import SpectraError
from spectra_lens.models import bridge_from_hf
from spectra_lens.present.figures import attention_pattern, head_attention, token_labels
from spectra_lens.testing import tiny_hf_model

WORDS = "the cat sat on a mat and dog ran to park while bird sang".split()
TEXT = "the cat sat on a mat and the dog ran to the park"


@pytest.fixture(scope="module")
def model():
    """A tiny Llama (GQA) bridge with a whitespace word-level tokenizer: text works end to end."""
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>",
                                  eos_token="<eos>")
    return bridge_from_hf(tiny_hf_model("llama_gqa"), tok)


def test_strings_are_accepted_wherever_tokens_are(model):
    tokens = model.to_tokens(TEXT)
    assert tokens.shape == (1, 14) and int(tokens[0, 0]) == 1  # BOS, as the model prepends it
    by_text, by_ids = capture_metrics(model, TEXT), capture_metrics(model, tokens)
    torch.testing.assert_close(by_text.entropy, by_ids.entropy)
    two = ["the cat sat on a mat", "the dog ran to a park"]
    assert capture_metrics(model, two).entropy.shape[0] == 2
    torch.testing.assert_close(analytic_gain(model, TEXT), analytic_gain(model, tokens))
    curves = head_curves(model, two, [0.5, 1.0, 2.0])
    torch.testing.assert_close(curves.metrics.entropy,
                               head_curves(model, model.to_tokens(two), [0.5, 1.0, 2.0]).metrics.entropy)
    effects = intervention_effects(model, TEXT, [0.5, 2.0], QueryScale.scan(1, 0), layers=[1])
    assert effects.loss.shape == (2, 1)


def test_strings_of_different_token_lengths_are_padded_and_masked(model):
    m = capture_metrics(model, ["the cat sat", "the dog"])  # 4 and 3 tokens with BOS
    alone = capture_metrics(model, "the dog")
    torch.testing.assert_close(m.entropy[1, ..., :3], alone.entropy[0])
    assert torch.isnan(m.entropy[1, ..., 3]).all() and not torch.isnan(m.entropy[0]).any()
    with pytest.raises(SpectraError, match="texts get their own"):
        capture_metrics(model, "the cat", pad_id=2)
    no_tokenizer = bridge_from_hf(tiny_hf_model("gpt2"))
    with pytest.raises(SpectraError, match="no tokenizer"):
        capture_metrics(no_tokenizer, "the cat")


def test_attention_figure_is_labelled_with_tokens_and_shows_norm_and_entropy(model):
    fig = head_attention(model, TEXT, layer=1, head=2)
    heat, norm, ent, bound = fig.data
    strings = model.to_str_tokens(TEXT)
    assert list(fig.layout.yaxis.ticktext) == token_labels(strings)
    assert fig.layout.yaxis.ticktext[2] == "2: 'cat'"
    m = capture_metrics(model, TEXT, patterns_for=[(1, 2)])
    np.testing.assert_allclose(np.asarray(heat.z), m.patterns[(1, 2)][0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(norm.x, m.q_norm[0, 1, 2].numpy(), rtol=1e-6)
    np.testing.assert_allclose(ent.x, m.entropy[0, 1, 2].numpy(), rtol=1e-6)
    np.testing.assert_allclose(bound.x, np.log(np.arange(len(strings)) + 1.0))
    assert (np.asarray(ent.x) <= np.asarray(bound.x) + 1e-5).all()  # H ≤ log(t + 1)
    np.testing.assert_allclose(np.triu(np.asarray(heat.z), 1), 0, atol=1e-7)  # causal
    with pytest.raises(SpectraError, match="head must be"):
        head_attention(model, TEXT, layer=1, head=4)


def test_attention_pattern_checks_its_shapes():
    with pytest.raises(SpectraError, match=r"\[3, 3\]"):
        attention_pattern(np.eye(2), ["a", "b", "c"], [1, 2, 3], [0, 0, 0], layer=0, head=0)
    labels = token_labels(["the", "the", " x", "a" * 40])
    assert len(set(labels)) == 4 and labels[2] == "2: ' x'" and labels[3].endswith("...")


def test_every_result_type_has_an_html_representation(model, tmp_path):
    from spectra_lens.data.corpus import default_corpus
    from spectra_lens.data.shards import write_shards

    two = ["the cat sat on a mat", "the dog ran to a park"]
    curves = head_curves(model, two, [0.5, 1.0, 2.0])
    effects = intervention_effects(model, two, [0.5, 2.0], KeyScale.scan(1, 0), patterns_for=[(1, 0)])
    shards = write_shards(model.to_tokens(two), tmp_path / "shards", shard_size=1, tokenizer_name="tiny")
    cases = {
        "AttentionLayout": (attention_layout(model), "2 × 4"),
        "TokenMetrics": (capture_metrics(model, TEXT), "k_eff_top90"),
        "HeadSweep": (curves, "sharpest heads"),
        "HeadMetrics": (curves.metrics, "mean entropy"),
        "ExactSweep": (effects, "kl_from_unscaled"),
        "ShardManifest": (shards, "2 × 7"),
        "Corpus": (default_corpus(), "Corpus"),
    }
    for name, (obj, expected) in cases.items():
        page = obj._repr_html_()
        assert name in page and expected in page, (name, page[:300])
        assert page.count("<table") == page.count("</table>")


def test_progress_bars_are_labelled_and_stay_on_screen(model, capsys):
    intervention_effects(model, TEXT, [0.5, 2.0], QueryScale.scan(1, 3), layers=[1], progress=True)
    intervention_effects(model, TEXT, [0.5, 2.0], KeyScale.scan(0, 1), layers=[1], progress=True)
    head_curves(model, TEXT, [0.5, 1.0, 2.0], method="exact", layers=[0], progress=True)
    err = capsys.readouterr().err
    final = [line.rsplit("\r", 1)[-1] for line in err.splitlines() if line.strip()]
    assert any(line.startswith("QueryScale L1H3 at 2 α") and "100%" in line for line in final), final
    assert any(line.startswith("KeyScale L0 KV1 at 2 α") and "100%" in line for line in final), final
    assert any(line.startswith("α-curves (exact)") and "100%" in line for line in final)


def test_model_load_shows_its_stages_and_manifests_record_quantization(tmp_path, capsys):
    from spectra_lens.models import load_model, weights_info

    tiny_hf_model("gpt2").save_pretrained(tmp_path / "tiny")
    model = load_model(str(tmp_path / "tiny"), progress=True)
    final = [line.rsplit("\r", 1)[-1] for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert any(line.startswith(f"load {tmp_path / 'tiny'}") and "2/2" in line for line in final), final
    assert weights_info(str(tmp_path / "tiny"), model) == {"format": "huggingface", "quantization": None}
    default = weights_info(None)
    assert default["quantization"] == "Q4_1" and default["dequantized"] is True
    assert default["file"].endswith(".Q4_1.gguf")


def _screen(err: str) -> list[str]:
    """What a terminal shows of `err`: each line as its last carriage-return segment."""
    return [line.rsplit("\r", 1)[-1] for line in err.split("\n")]


def test_a_message_written_while_a_bar_is_live_is_its_own_line(capsys):
    from spectra_lens.present import display

    bar = display.progress_bar(total=3, desc="work", unit="seq", tick=None)
    bar.update(1)
    display.write("warning: something to know\n")
    bar.update(2)
    bar.close()
    err = capsys.readouterr().err
    lines = err.split("\n")
    said = [line for line in lines if "something to know" in line]
    assert len(said) == 1, err
    # the bar was cleared before the message: on screen the line is the message alone
    assert said[0].rsplit("\r", 1)[-1] == "warning: something to know", repr(said[0])
    # and drawn again after it, to the end
    after = "\n".join(lines[lines.index(said[0]) + 1:])
    assert "work:" in after and _screen(err)[-2].startswith("work: 100%"), repr(err)


def test_a_bar_redraws_while_a_long_step_runs_and_stops_when_closed(capsys):
    import time

    from spectra_lens.present import display

    bar = display.progress_bar(total=1, desc="slow first step", tick=0.05)
    time.sleep(0.4)
    drawn = capsys.readouterr().err.count("slow first step")
    assert drawn >= 3, drawn  # redrawn (elapsed time) though nothing advanced
    bar.update(1)
    bar.close()
    capsys.readouterr()
    time.sleep(0.2)
    assert capsys.readouterr().err == ""  # the redraw stopped with the bar
    off = display.progress_bar(total=1, desc="slow first step", enabled=False, tick=0.01)
    time.sleep(0.1)
    off.close()
    assert capsys.readouterr().err == ""  # a disabled bar draws nothing, not even redraws


def test_a_slow_step_gets_one_note_and_a_quick_or_disabled_one_none(capsys):
    import time

    from spectra_lens.present import display

    with display.note_if_slow("importing things ...", after=0.05):
        time.sleep(0.3)
    assert capsys.readouterr().err == "importing things ...\n"
    with display.note_if_slow("importing things ...", after=0.5):
        pass
    with display.note_if_slow("importing things ...", after=0.01, enabled=False):
        time.sleep(0.1)
    display.note("loaded", enabled=False)
    time.sleep(0.6)
    assert capsys.readouterr().err == ""
    display.note("loaded")
    assert capsys.readouterr().err == "loaded\n"

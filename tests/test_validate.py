"""spectra_lens.validate: the one home of every input rule, as the configs, the pipeline and the
library apply it."""

import pytest
import torch

from spectra_lens.config import GainConfig, InterventionConfig, ObservationalConfig
from spectra_lens.errors import SpectraError
from spectra_lens.validate import HeadRef, check_alphas, check_min_position, check_vocab


def test_the_alpha_grid_rule_is_the_same_in_every_config():
    for bad in ((1.0, True), (1.0, "2"), (1.0, None)):
        with pytest.raises(SpectraError, match="must be a number"):
            check_alphas(bad)
    for bad, words in (((0.5, 0.5, 2.0), "distinct"), ((1.0, -2.0, 2.0), "> 0"), ((), "empty")):
        with pytest.raises(SpectraError, match=words):
            check_alphas(bad)
        for cls in (InterventionConfig, GainConfig):  # the same rule, the same message
            with pytest.raises(SpectraError, match=words):
                cls(alphas=bad).validate()
    with pytest.raises(SpectraError, match="at least 3"):
        GainConfig(alphas=(0.5, 1.0)).validate()
    InterventionConfig(alphas=(0.5, 1.0)).validate()  # a comparison needs no slope
    assert check_alphas((2, 0.5, 1), at_least=3) == (0.5, 1.0, 2.0)


def test_min_position_has_one_bound_everywhere():
    """At least two query positions must remain: [0, seq_len - 1)."""
    assert check_min_position(6, 8) == 6
    for bad in (7, -1, 1.5, True):
        with pytest.raises(SpectraError, match="min_position"):
            check_min_position(bad, 8)
    for bad in (7, -1):
        for cls in (ObservationalConfig, GainConfig):
            with pytest.raises(SpectraError, match="min_position"):
                cls(seq_len=8, min_position=bad).validate()


def test_check_vocab_names_the_range_and_the_source():
    check_vocab(torch.tensor([[0, 96]]), 97)
    check_vocab(torch.zeros(0, 4, dtype=torch.long), 97)
    with pytest.raises(SpectraError, match=r"the prompt's tokens hold token ids in \[0, 97\]; expected "
                                           r"ids in \[0, 97\)"):
        check_vocab(torch.tensor([[0, 97]]), 97, "the prompt's tokens")


def test_head_ref_parses_every_spelling_and_prints_one():
    for text in ("L15H8", "l15h8", "L15_H8", " L15 H8 "):
        assert HeadRef.parse(text) == (15, 8) and str(HeadRef.parse(text)) == "L15H8"
    assert HeadRef(15, 8).file_tag == "L15_H8" and HeadRef.parse((3, 1)) == HeadRef(3, 1)
    for bad in ("15H8", "L15", "L-1H2", ""):
        with pytest.raises(SpectraError, match="expected a head like 'L15H8'"):
            HeadRef.parse(bad)

"""`DocumentMoments`, the per-document sufficient statistics: merging is concatenation, a
resample of documents is counts × moments, and storage through the one npz container."""

import numpy as np
import pandas as pd
import pytest
from document_records import VARS, records

from spectra_lens.errors import SpectraError
from spectra_lens.io import write_npz
from spectra_lens.stats.inference import _cov
from spectra_lens.stats.moments import MOMENTS_FORMAT, DocumentMoments, moments_from_records


def test_merging_shards_is_concatenation():
    rng = np.random.default_rng(1)
    tokens = records(rng)
    whole = moments_from_records(tokens, VARS)
    # Split by sequence, so that one document's sequences land in different parts.
    parts = [moments_from_records(tokens[tokens["sequence"] % 3 == k], VARS) for k in range(3)]
    merged = DocumentMoments.concat(parts)
    np.testing.assert_array_equal(merged.documents, whole.documents)
    np.testing.assert_allclose(merged.n, whole.n)
    np.testing.assert_allclose(merged.mean, whole.mean, atol=1e-12)
    np.testing.assert_allclose(merged.m2, whole.m2, atol=1e-9)


def test_save_and_load_round_trip(tmp_path):
    m = moments_from_records(records(np.random.default_rng(2)), VARS)
    m.save(tmp_path / "shard_00000.npz")
    back = DocumentMoments.load(tmp_path / "shard_00000.npz")
    assert back.variables == m.variables and back.meta == m.meta
    for name in ("documents", "layers", "heads", "n", "mean", "m2"):
        np.testing.assert_array_equal(getattr(back, name), getattr(m, name))
    assert [p.name for p in tmp_path.iterdir()] == ["shard_00000.npz"]  # no temporary left
    (tmp_path / "bad.npz").write_bytes(b"not a file")
    with pytest.raises(SpectraError, match="unreadable"):
        DocumentMoments.load(tmp_path / "bad.npz")


def test_load_refuses_another_format_or_a_newer_version(tmp_path):
    arrays = {k: np.zeros(1) for k in ("documents", "layers", "heads", "n", "mean", "m2")}
    write_npz(tmp_path / "other.npz", {"format": "something.else", "version": 1}, **arrays)
    with pytest.raises(SpectraError, match=f"is not a {MOMENTS_FORMAT} file"):
        DocumentMoments.load(tmp_path / "other.npz")
    write_npz(tmp_path / "newer.npz", {"format": MOMENTS_FORMAT, "version": 99}, **arrays)
    with pytest.raises(SpectraError, match="got 'spectra_lens.document_moments' v99"):
        DocumentMoments.load(tmp_path / "newer.npz")


def test_bootstrap_is_resampling_documents():
    """A resample's moments (counts × moments) equal the moments of the resampled tokens."""
    tokens = records(np.random.default_rng(4), n_docs=5)
    m = moments_from_records(tokens, VARS)
    s, _ = m.augmented()
    counts = np.array([2.0, 0.0, 1.0, 0.0, 2.0])
    picked = pd.concat([tokens[tokens["document"] == 100 + d].assign(document=1000 * k + d)
                        for d, c in enumerate(counts) for k in range(int(c))])
    direct = moments_from_records(picked, VARS)
    sb = np.tensordot(counts, s, axes=1)
    sd, _ = direct.augmented()
    np.testing.assert_allclose(sb[..., 0, 0], sd.sum(axis=0)[..., 0, 0])
    np.testing.assert_allclose(_cov(sb), _cov(sd.sum(axis=0)), rtol=1e-10, atol=1e-9)


def test_ctrl_c_inside_the_npz_write_stays_a_keyboard_interrupt(tmp_path, monkeypatch):
    """A Ctrl-C while NumPy writes one array of the zip: zipfile's close in NumPy's clean-up
    raises ValueError ("open writing handle"), which hid the interrupt and turned an interrupted
    run into a crash. save() raises the KeyboardInterrupt and writes nothing."""
    import zipfile

    m = moments_from_records(records(np.random.default_rng(2)), VARS)
    close = zipfile._ZipWriteFile.close
    calls = []

    def interrupted_close(self):
        calls.append(1)
        if len(calls) == 2:  # the second array's handle: interrupted before it closes
            raise KeyboardInterrupt
        return close(self)

    monkeypatch.setattr(zipfile._ZipWriteFile, "close", interrupted_close)
    with pytest.raises(KeyboardInterrupt):
        m.save(tmp_path / "shard_00000.npz")
    assert len(calls) >= 2 and list(tmp_path.iterdir()) == []

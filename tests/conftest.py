"""Shared fixtures: one tiny random-init bridge per architecture family, built once per session.

jaxtyping's import hook (the same one `pytest --jaxtyping-packages=spectra_lens,beartype.beartype`
installs) is set up here, before anything imports spectra_lens, so every jaxtyping annotation in
the library is checked with beartype while the tests run. Set SPECTRA_LENS_NO_TYPECHECK=1 to
run without it (e.g. to time the library as users run it).
"""

import os
import sys

import jaxtyping

_TYPECHECKER = "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))"

if os.environ.get("SPECTRA_LENS_NO_TYPECHECK") != "1":
    if "spectra_lens" in sys.modules:  # imported by a plugin first: checking is impossible
        import warnings

        warnings.warn("spectra_lens was imported before tests/conftest.py; shape checks are off", stacklevel=1)
    elif not any("spectra_lens" in getattr(f, "modules", ()) for f in sys.meta_path):
        # Not installed yet (pytest's --jaxtyping-packages would install the same finder).
        # PEP 484's numeric tower, so that an int is accepted where a float is annotated.
        jaxtyping.install_import_hook(["spectra_lens"], _TYPECHECKER)

# Runs write HTML figures only (no browser start per run); tests/present/test_images.py turns images on.
os.environ.setdefault("SPECTRA_NO_IMAGES", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from spectra_lens.capture import count_hooks  # noqa: E402
from spectra_lens.layout import attention_layout  # noqa: E402
from spectra_lens.testing import tiny_model  # noqa: E402

# The tiny models are far too small for intra-op threads to pay off, and on a shared 2-core
# machine OpenMP's spinning threads made the suite ~5x slower (19 s vs 96 s measured).
torch.set_num_threads(int(os.environ.get("SPECTRA_LENS_TEST_THREADS", "1")))


class TinyModels:
    """family -> (bridge, layout), each built on first use and shared by the whole session.

    Tests must leave a model as they found it (no hooks attached); `get` checks that.
    """

    def __init__(self):
        self._cache: dict[str, tuple] = {}

    def __call__(self, family: str):
        if family not in self._cache:
            model = tiny_model(family)
            self._cache[family] = (model, attention_layout(model))
        model, layout = self._cache[family]
        assert count_hooks(model) == 0, f"a previous test left hooks on the {family} model"
        return model, layout


@pytest.fixture(scope="session")
def tiny() -> TinyModels:
    """`model, layout = tiny("llama_gqa")`: session-cached tiny bridges of every family."""
    return TinyModels()


@pytest.fixture(scope="session")
def tokens() -> torch.Tensor:
    """A fixed [batch=2, pos=10] token batch inside every tiny model's vocabulary (97)."""
    return torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(1234))


def pytest_collection_modifyitems(config, items):
    """With SPECTRA_LENS_NUMBA=0 (how `docs/MUTANTS.md` mutates the NumPy kernels) the compiled
    kernels are off: tests marked `numba`, and cases with `backend="compiled"`, are skipped.
    Where numba is installed and not turned off they run (`test_numba_is_installed` fails
    where it is missing)."""
    from spectra_lens.kernels import compiled

    if compiled.AVAILABLE:
        return
    skip = pytest.mark.skip(reason="the compiled kernels are off (SPECTRA_LENS_NUMBA=0 or no numba)")
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.get_closest_marker("numba") or params.get("backend") == "compiled":
            item.add_marker(skip)

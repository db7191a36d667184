# Two commands do everything on a fresh machine:
#   make observe   set up .venv and run the observational experiment on the embedded default
#   make test      set up .venv and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= results/observational

.PHONY: setup observe test notebooks bench report clean

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) ./scripts/setup.sh
	touch $@

setup: $(VENV)/.installed

observe: setup
	$(VENV)/bin/spectra-lens observe --out $(OUT)

test: setup
	$(PY) -m pytest

notebooks: setup
	SPECTRA_NB_SMALL=0 $(PY) -m pytest tests/test_notebooks.py

report: setup
	$(PY) -m spectra_lens.cli report $(or $(RESULTS),results)

bench: setup
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) results .pytest_cache

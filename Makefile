# Two commands do everything on a fresh machine:
#   make observe   set up .venv and run the observational experiment on the embedded default
#   make test      set up .venv and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= results/observational

.PHONY: setup observe test notebooks bench report findings clean clean-results mutants

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
	$(PY) -m spectra_lens.experiments.cli report $(or $(RESULTS),results)

# docs/FINDINGS.md from the runs under results/findings/ (runs what is missing; see the script)
findings: setup
	$(PY) scripts/findings.py

bench: setup
	$(PY) -m bench.run

# The environment and caches only: results are kept (`make clean-results` removes them).
clean:
	rm -rf $(VENV) .pytest_cache

clean-results:
	rm -rf results

# Mutation testing of the functions that decide results, with the fast test subset named in
# pyproject.toml [tool.mutmut]; docs/MUTANTS.md lists the survivors and why each is
# equivalent. `make mutants MUTANT_FUNCTIONS='spectra_lens.stats.decisions.*'` widens or narrows it.
MUTANT_FUNCTIONS ?= \
	'spectra_lens.stats.decisions.x_verdict__*' 'spectra_lens.stats.decisions.x_agreement__*' \
	'spectra_lens.stats.decisions.x_fold_consistency__*' \
	'spectra_lens.stats.decisions.x_document_replication__*' \
	'spectra_lens.sweep.x__output_effects__*' 'spectra_lens.sweep.x__next_token_nll__*' \
	'spectra_lens.sweep.x__masked_mean__*' 'spectra_lens.interventions.*QueryScale*hooks__*' \
	'spectra_lens.kernels.blocked.x__top_count_sorted__*' \
	'spectra_lens.kernels.blocked.x__top_counts_sorted__*'

mutants: setup
	$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install -q -e ".[mutation]"
	rm -rf mutants
	SPECTRA_LENS_NO_TYPECHECK=1 $(VENV)/bin/mutmut run --max-children 2 $(MUTANT_FUNCTIONS)
	$(VENV)/bin/mutmut results


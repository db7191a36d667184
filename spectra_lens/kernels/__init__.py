"""Fast engines of the metrics in :mod:`spectra_lens.metrics`, each tested against the definitions."""

"""Run directories (lock, manifest, provenance, declared outputs) and the shared experiment pipeline."""

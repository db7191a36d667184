"""Corpus sources -> fixed-length token shards with document ids."""

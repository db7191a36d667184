"""Statistics of attention metrics, computed from per-document sufficient statistics.

The independent unit is the DOCUMENT. Tokens of one document, and the sequences cut from it,
are not independent: every test clusters by document (CR2 with Bell–McCaffrey degrees of
freedom by default), the bootstrap resamples documents, and a per-token test that treats
tokens as independent is reported only to compare. Every statistic is a function of the
per-(document, head) moment matrices, so analysis memory is O(documents × heads) and merging
shards, runs or ranks is concatenation.

- `spectra_lens.stats.moments`: `DocumentMoments`, the per-document sufficient statistics
  (count, mean, centred second moments), their storage and merging.
- `spectra_lens.stats.inference`: the one Pearson correlation, partial correlations, the
  document-clustered Wald test, the document bootstrap, Benjamini–Hochberg FDR, t intervals.
- `spectra_lens.stats.decisions`: per-head tables and their rules: `head_statistics`, the
  agreement of the observational slope with the causal gain and its verdict, consistency across
  document folds, replication on held-out documents.
- `spectra_lens.stats.fits`: fits of a metric against ln α (the gain over a grid of scales).
"""

"""`spectra-lens prepare`: tokenize a corpus into fixed-length sequence shards with a manifest.

    spectra-lens prepare --corpus default --out shards/ --seq-len 128 --n-sequences 512

`--corpus` takes what `spectra_lens.data.prepare.corpus_from_spec` does: "default" (CPython's reference
documentation), "hf:NAME[:SPLIT[:FIELD]]", "PATH.jsonl[:FIELD]", a text file or glob, or a
directory of prepared shards (re-sharded). The tokenizer is the model's, without its weights.
Flags and defaults: `spectra_lens.config.PrepareConfig`.
"""


from spectra_lens.config import PrepareConfig

__all__ = ["command"]


def command(cfg: PrepareConfig, *, progress: bool = True) -> int:
    """Write the shards of `cfg`; print where. SpectraError for bad input."""
    from spectra_lens.data.prepare import prepare
    from spectra_lens.models import DEFAULT_MODEL, load_tokenizer

    cfg.validate()
    tokenizer = load_tokenizer(cfg.model)
    manifest = prepare(
        cfg.corpus, tokenizer, cfg.out,
        seq_len=cfg.seq_len, n_sequences=cfg.n_sequences, shard_size=cfg.shard_size,
        prepend_bos=cfg.prepend_bos, min_tokens=cfg.min_tokens,
        tokenizer_name=cfg.model or DEFAULT_MODEL, file_format=cfg.file_format,
        overwrite=cfg.overwrite,
    )
    print(f"{manifest.n_sequences} sequences of {manifest.seq_len} tokens in "
          f"{len(manifest.shards)} shards: {manifest.path}")
    return 0


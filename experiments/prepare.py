"""Command line: tokenize a corpus into fixed-length sequence shards with a manifest.

    python -m experiments.prepare --corpus default --out shards/ --seq-len 128 \\
        --n-sequences 512 --shard-size 128 --model HuggingFaceTB/SmolLM2-135M-Instruct

`--corpus` takes what `spectra_lens.shards.corpus_from_spec` does: "default" (CPython's reference
documentation), "hf:NAME[:SPLIT[:FIELD]]", "PATH.jsonl[:FIELD]", a text file or glob, or a
directory of prepared shards (re-sharded). The tokenizer is the model's, without its weights.
"""

import argparse
import logging
import sys

from spectra_lens.errors import SpectraError
from spectra_lens.shards import prepare

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    """The argument parser; each flag maps to one argument of `spectra_lens.shards.prepare`."""
    p = argparse.ArgumentParser(prog="python -m experiments.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="default",
                   help="corpus spec (default: CPython's reference documentation)")
    p.add_argument("--out", required=True, help="shard directory to write")
    p.add_argument("--model", default=None,
                   help="model whose tokenizer to use: HF name or local directory "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, BOS included")
    p.add_argument("--n-sequences", type=int, default=None,
                   help="sequences to write (default: every full sequence of the corpus)")
    p.add_argument("--shard-size", type=int, default=256, help="sequences per shard file")
    p.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start each sequence with BOS (default: if the tokenizer has one)")
    p.add_argument("--min-tokens", type=int, default=None,
                   help="skip documents shorter than this many tokens")
    p.add_argument("--format", choices=["safetensors", "npy"], default="safetensors",
                   dest="file_format", help="shard file format")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different shard set already in --out")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a user error)."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from spectra_lens.models import DEFAULT_MODEL, load_tokenizer

    try:
        tokenizer = load_tokenizer(args.model)
        manifest = prepare(
            args.corpus, tokenizer, args.out,
            seq_len=args.seq_len, n_sequences=args.n_sequences, shard_size=args.shard_size,
            prepend_bos=args.prepend_bos, min_tokens=args.min_tokens,
            tokenizer_name=args.model or DEFAULT_MODEL, file_format=args.file_format,
            overwrite=args.overwrite,
        )
    except SpectraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{manifest.n_sequences} sequences of {manifest.seq_len} tokens in "
          f"{len(manifest.shards)} shards: {manifest.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

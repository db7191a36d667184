"""Benchmarks of spectra_lens (not tests): costs as ratios against the bare forward pass.

    python -m bench.run            # full run (~25 min on 2 CPU cores), writes bench/results.json
                                   # and BENCHMARKS.md
    python -m bench.run --quick    # ~2-3 min smoke version, writes bench/results-quick.json
    python -m bench.run --only scaling analysis --merge   # rerun sections into results.json
    python -m bench.report         # re-render BENCHMARKS.md from bench/results.json

Every ratio is measured within one run, with the variants interleaved repetition by repetition,
so that a change of machine load hits all of them alike. Peak memory is measured in a fresh
subprocess per configuration (`bench.memory`).
"""

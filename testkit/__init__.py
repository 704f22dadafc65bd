"""Fakes and process helpers shared by tests/ and bench/; never imported by Veil itself.

Not part of the installed distribution: tests and benchmarks run from the repository root,
where this package is importable.
"""

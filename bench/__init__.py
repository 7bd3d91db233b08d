"""Benchmarks for fastdistill (run with ``pytest bench``; see bench/README.md).

A package so that its test modules import as ``bench.*`` and never clash with ``tests/``.
"""

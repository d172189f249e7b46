"""Benchmarks: one command each, a printed table, outputs under ``bench/out/``."""

"""Benchmarks run on demand: python -m pytest tests/benchmarks -m benchmark -s"""

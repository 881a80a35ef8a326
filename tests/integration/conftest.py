"""Fixtures of the simulator integration tests: tiny_data and tiny_polypgen live in tests/conftest.py."""

"""The conformance suite: one set of tests every driver must pass (see conftest.py)."""

"""Benchmarks against raw baselines (``python -m bench``; see ``bench/README.md``)."""

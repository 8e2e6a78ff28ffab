"""Fixtures shared by the trainer tests: see tests/conftest.py (the tiny Llama is shared with
the Slurm tests)."""

"""Fixtures for the training tests (the helpers live in train_helpers.py)."""

import os

os.environ.setdefault("MKL_CBWR", "AUTO")  # alignment-independent MKL results (bit-exact resume test)

from train_helpers import corpus, tiny_config  # noqa: F401  (pytest fixtures)

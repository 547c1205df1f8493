"""Fixtures for the connectivity / diff / patching tests: tiny float64 models and the offline tokenizer."""

from circuits_attribution.testing_fixtures import *  # noqa: F403

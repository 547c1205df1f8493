"""Fixtures for the RelP engine tests: tiny random models, offline tokenizer, linear oracle."""

from circuits_attribution.testing_fixtures import *  # noqa: F403

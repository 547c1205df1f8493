"""Fixtures of the differential reader tests: the tiny models (for `circuits graph --labels`)."""

from circuits_attribution.testing_fixtures import *  # noqa: F403

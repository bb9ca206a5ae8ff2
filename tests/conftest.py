"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The `tiny` toy world (three sources, a pivot and a reward model, a few training steps each),
    built once per test session into a temporary cache (about a second)."""
    from polyfuse.toyworld import ToyWorldConfig, build_world

    return build_world(ToyWorldConfig.preset("tiny"), cache_dir=tmp_path_factory.mktemp("toyworld"), progress=False)

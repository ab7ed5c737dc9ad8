"""Shared fixtures: small openpi-shaped LoRA checkpoints written by Orbax."""

import pathlib

import pytest

from openpi_merge.testing import synthetic


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Returns a function (model, value_suffix=True, **kw) -> step dir of a tiny synthetic LoRA checkpoint.

    Checkpoints are written once per session and shared: tests must not modify them (merges must not either, which
    the end-to-end tests check by hashing).
    """
    cache = {}

    def make(model: str, value_suffix: bool = True, **kwargs) -> pathlib.Path:
        key = (model, value_suffix, tuple(sorted(kwargs.items())))
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"{model}-{'value' if value_suffix else 'plain'}")
            cache[key] = synthetic.write_checkpoint(directory, model=model, value_suffix=value_suffix, **kwargs)
        return cache[key]

    return make

"""Wraps the shipped config `openpi_merge/configs/example.py` (`--config=example` from anywhere)."""

from openpi_merge.configs.example import get_config

__all__ = ["get_config"]

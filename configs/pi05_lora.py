"""Wraps the shipped config `openpi_merge/configs/pi05_lora.py` (`--config=pi05_lora` from anywhere)."""

from openpi_merge.configs.pi05_lora import get_config

__all__ = ["get_config"]

"""Wraps the shipped config `openpi_merge/configs/pi0_lora.py` (`--config=pi0_lora` from anywhere)."""

from openpi_merge.configs.pi0_lora import get_config

__all__ = ["get_config"]

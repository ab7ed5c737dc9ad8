"""Merge configs shipped with openpi-merge, addressable by name: ``--config=pi0_lora``."""

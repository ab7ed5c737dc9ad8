"""Merge a pi0 LoRA fine-tune (openpi's stock LoRA variants) into a checkpoint for the base pi0 config."""

import ml_collections

from openpi_merge import config


def get_config() -> ml_collections.ConfigDict:
    return config.make_config("pi0")

"""Merge a pi0-FAST LoRA fine-tune (openpi's stock LoRA variants) into a checkpoint for the base pi0_fast config."""

import ml_collections

from openpi_merge import config


def get_config() -> ml_collections.ConfigDict:
    return config.make_config("pi0_fast")

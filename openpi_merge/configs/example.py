"""The built-in example: writes a tiny synthetic pi0 LoRA checkpoint and merges it, no download.

Pass another model as the config argument: ``--config=example:pi05``. The input is kept next to the output.
"""

import ml_collections

from openpi_merge import config


def get_config(model: str = "pi0") -> ml_collections.ConfigDict:
    example = config.make_config(model)
    example.input = f"example:{model}"
    example.output = f"merged_example_{model}"
    example.overwrite = True
    return example

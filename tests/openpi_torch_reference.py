"""openpi's ``PI0Pytorch`` (small variants of tests/openpi_torch.py) on given inputs: the LeRobot tier's reference.

Run by another Python than the test's, the torch tier's (openpi's PyTorch model needs transformers 4.53.2 with openpi's
replacements, LeRobot 0.6.1 transformers 5):

    python tests/openpi_torch_reference.py DTYPES STEPS INPUTS MODEL:WEIGHTS:OUTPUT [MODEL:WEIGHTS:OUTPUT ...]

DTYPES and STEPS (numbers of Euler steps) are comma-separated; INPUTS an ``.npz`` holding ``noise`` and the observation
of ``openpi_torch.observation`` flattened as ``image/<key>``, ``image_mask/<key>``, ``state``, ``tokenized_prompt``,
``tokenized_prompt_mask``; each WEIGHTS a ``model.safetensors`` in openpi's layout. Each OUTPUT (``.npz``) gets one
float32 array of actions per dtype and number of steps, named ``<dtype>-<steps>``: ``PI0Pytorch`` of MODEL built with
that dtype and loaded from WEIGHTS by openpi's ``load_pytorch``. Exits 3 with the reason on stderr when openpi's
PyTorch model cannot run in this Python.
"""

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import openpi_torch


def main(dtypes: str, steps: str, inputs: str, *jobs: str) -> int:
    why = openpi_torch.available()
    if why is not None:
        print(why, file=sys.stderr)
        return 3
    data = dict(np.load(inputs))
    obs: dict = {"image": {}, "image_mask": {}}
    for key, value in data.items():
        if "/" in key:
            group, name = key.split("/", 1)
            obs[group][name] = value
        elif key != "noise":
            obs[key] = value
    with openpi_torch.small_variants():
        for job in jobs:
            model, weights, output = job.split(":")
            actions = {}
            for dtype in dtypes.split(","):
                policy = openpi_torch.torch_model(openpi_torch.pi0_config(model, dtype), pathlib.Path(weights))
                for n in steps.split(","):
                    actions[f"{dtype}-{n}"] = openpi_torch.torch_actions(policy, obs, data["noise"], int(n))
            np.savez(output, **actions)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

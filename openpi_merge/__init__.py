"""openpi-merge: fold the LoRA adapters of an openpi (pi0, pi0.5, pi0-FAST) fine-tune into its base weights."""

__version__ = "0.1.0"

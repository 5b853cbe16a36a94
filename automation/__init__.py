"""GitOps fine-tuning of chat models: the `automation` CLI and its stages."""

__version__ = "0.1.0"

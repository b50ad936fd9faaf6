"""oral: generate LoRA adapters for language models from a prompt."""

__version__ = "0.1.0"

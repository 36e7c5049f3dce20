"""lightning_mobillm: server-assisted fine-tuning of LLMs from mobile devices, on PyTorch Lightning."""

__version__ = "0.1.0"

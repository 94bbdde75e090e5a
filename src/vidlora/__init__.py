"""vidlora: LoRA fine-tuning of Video-LLaVA-style video+image language models."""

__version__ = "0.1.0"

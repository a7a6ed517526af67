"""sllm: fine-tune LoRA adapters as managed jobs and serve them beside their base model."""

__version__ = "0.1.0"

"""Base models, tokenizers, LoRA wiring and the tiny offline base model."""

"""AIGC Platform: preprocess, fine-tune, sweep and serve generative text models on one Ray cluster."""

__version__ = "0.1.0"
__all__ = ["__version__"]

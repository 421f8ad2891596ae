"""transformers-cheers: the Hugging Face-native implementation of Cheers (arXiv 2603.12793)."""

__version__ = "0.1.0"

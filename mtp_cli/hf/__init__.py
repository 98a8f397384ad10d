"""Hugging Face transformers interop: the name/layout mapping and config translation."""

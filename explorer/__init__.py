"""ROME Explorer: locate (causal tracing) and edit (ROME) factual associations in language models."""

__version__ = "0.1.0"

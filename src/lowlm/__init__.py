"""lowlm: a language model for a low-resource language on a modest budget."""

__version__ = "0.1.0"

"""snvbert: genotype imputation with a retrieval-augmented BERT-style transformer."""

__version__ = "0.1.0"

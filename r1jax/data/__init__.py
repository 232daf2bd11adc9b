"""Tokenizers and the grain pipelines that turn tasks into prompt batches and SFT rows."""

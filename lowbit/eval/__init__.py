"""Evaluation: embedded corpora, perplexity, sizes and peak memory, the comparison table."""

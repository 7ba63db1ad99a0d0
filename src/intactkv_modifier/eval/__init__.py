"""Evaluation helpers shared by the examples and benchmarks: real text and perplexity."""

"""Evaluation: perplexity on held-out text, exact-match accuracy on held-out arithmetic, HumanEval pass@1."""

"""Evaluation: perplexity (rolling log-likelihood) and, later, benchmark tasks and judging."""

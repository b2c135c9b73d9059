"""Training data: text sources (the bundled corpus among them)."""

"""Checkpoint formats: Hugging Face safetensors folders (hf.py, hf_config.py)."""

from ember.checkpoint.hf import CheckpointError, load_model, save_model

__all__ = ["CheckpointError", "load_model", "save_model"]

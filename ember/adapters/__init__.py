"""Parameter-efficient adapters that change the one Transformer by module swap (LoRA)."""

from ember.adapters.lora import (LoRAConfig, LoRAError, LoRALinear, adapters_disabled, apply_lora,
                                 merge_and_unload, merge_lora, trainable_summary, unmerge_lora)

__all__ = ["LoRAConfig", "LoRAError", "LoRALinear", "adapters_disabled", "apply_lora", "merge_and_unload",
           "merge_lora", "trainable_summary", "unmerge_lora"]

"""Training: the shapes world, tokenizer training, pretraining the tiny-shapes model, and LoRA fine-tuning.

Read in the book's order: `shapes` (scenes, prompts and answers), `tokenizer_training`, then `pretrain`; `lora`
(low-rank adapters) for fine-tuning. Only `lora`'s names are imported here: it needs nothing but PyTorch.
"""

from .lora import LoraLinear, LoraSettings, apply_lora, lora_parameters, lora_state_dict, lora_targets, merge_lora

__all__ = ["LoraLinear", "LoraSettings", "apply_lora", "lora_parameters", "lora_state_dict", "lora_targets",
           "merge_lora"]

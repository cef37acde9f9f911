"""What a fine-tuning run trains: the whole model, all but the tower, the decoder's attention, or low-rank adapters.

    full           every weight (big_vision's transfer configs)
    freeze-vision  the tower and the projector frozen (the Hugging Face guide)
    attention      only the decoder's attention projections q, k, v, o (big_vision's fine-tuning colab)
    lora           the base frozen, low-rank adapters on the decoder's projections (`lora.apply_lora`)

`select_trainable` sets `requires_grad` accordingly and returns the parameters the optimiser gets.
"""

from __future__ import annotations

from torch import nn

from ..errors import PaliGemmaError
from .lora import LoraSettings, apply_lora

METHODS = ("full", "freeze-vision", "attention", "lora")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _trains(method: str, name: str) -> bool:
    """Whether the parameter `name` of the plain model trains under `method` (LoRA: none of them)."""
    if method == "full":
        return True
    if method == "freeze-vision":
        return not name.startswith(("vision_tower.", "multi_modal_projector."))
    if method == "attention":
        parts = name.split(".")
        return name.startswith("language_model.layers.") and "self_attn" in parts and parts[-2] in ATTENTION_PROJECTIONS
    return False


def select_trainable(model: nn.Module, method: str, lora: LoraSettings | None = None, seed: int = 0
                     ) -> list[nn.Parameter]:
    """Freeze what `method` leaves alone (adding LoRA's adapters for 'lora'); the trainable parameters, in order."""
    if method not in METHODS:
        raise PaliGemmaError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(_trains(method, name))
    if method == "lora":
        apply_lora(model, lora or LoraSettings(), seed=seed)
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters, each shared tensor counted once."""
    parameters = list(model.parameters())  # nn.Module.parameters() already yields a tied tensor once
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)

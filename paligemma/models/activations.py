"""The activation functions named in PaliGemma configs. PaliGemma uses GELU with the tanh approximation throughout."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from ..errors import PaliGemmaError

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_fast": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,  # exact; GemmaConfig maps a Gemma "gelu" to the tanh form, as transformers does
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function a config's `hidden_act` names."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise PaliGemmaError(f"unsupported activation {name!r}; known: {', '.join(sorted(_ACTIVATIONS))}") from None

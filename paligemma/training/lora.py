"""Low-rank adapters (LoRA), written out by hand: fine-tune a few million numbers instead of three billion.

A frozen projection `W` [out, in] gets a trainable update of rank `r`, `W + (alpha / r) * B @ A`, with `A` [r, in]
and `B` [out, r]. `B` starts at zero, so the adapted model starts as the base model exactly; only `A` and `B`
learn, which is what lets the 3B model be fine-tuned on one GPU. The layer computes the two paths separately,

    y = base(x) + B(A(dropout(x))) * alpha / r

and `merge_lora` folds the update into `W` once training is done, leaving a plain model with its original names.
The module names and the numerics follow peft's LoRA (the tests check logits and gradients against it); the
adapter's own weights are kept in float32 when the base is in half precision, as peft does and as big_vision keeps
its trainable weights. `paligemma.io.adapter` saves and loads adapters in peft's folder format.

    settings = LoraSettings(rank=8)                 # the Hugging Face guide's r=8 on q, k, v, o, gate, up, down
    apply_lora(model, settings, seed=0)             # in place: base frozen, lora_A / lora_B trainable
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=2e-5)
    ...
    merge_lora(model).save_pretrained("merged")     # or paligemma.save_adapter(model, "adapter", base)

A model with adapters in place has state-dict names such as `...q_proj.base_layer.weight`: save it with
`save_adapter`, or merge it before `save_pretrained`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PaliGemmaError

LANGUAGE_MODEL, VISION_TOWER = "language_model", "vision_tower"
# The linear layers of each part that an adapter may wrap (the tied output head never: it is the embedding table).
LINEAR_LAYERS = {
    LANGUAGE_MODEL: ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    VISION_TOWER: ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}


@dataclass(frozen=True)
class LoraSettings:
    """Which layers get adapters and how large they are.

    The defaults are those of the Hugging Face PaliGemma guide: rank 8 on the decoder's seven projections, and
    peft's default alpha of 8, so the update is added with a scale alpha / rank of 1. The guide's list of names,
    matched by peft as suffixes, also catches SigLIP's q/k/v projections (11.3 M trainable parameters for 3B-224
    instead of the decoder's 9.8 M); here `parts` says where adapters go, the decoder alone unless told otherwise.
    """

    #: r, the rank of the update B @ A
    rank: int = 8
    #: the update is scaled by alpha / rank
    alpha: float = 8.0
    #: dropout on the adapter's input (training only)
    dropout: float = 0.0
    #: the names of the linear layers to adapt, within each of `parts`
    target_modules: tuple[str, ...] = LINEAR_LAYERS[LANGUAGE_MODEL]
    #: where adapters go, "language_model" (Gemma), "vision_tower" (SigLIP) or both
    parts: tuple[str, ...] = (LANGUAGE_MODEL,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))  # lists welcome, stored as tuples
        object.__setattr__(self, "parts", tuple(self.parts))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise PaliGemmaError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise PaliGemmaError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise PaliGemmaError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        unknown_parts = [part for part in self.parts if part not in LINEAR_LAYERS]
        if not self.parts or unknown_parts:
            raise PaliGemmaError(f"LoRA parts must be some of {', '.join(LINEAR_LAYERS)}, got {list(self.parts)}")
        known = {name for part in self.parts for name in LINEAR_LAYERS[part]}
        unknown = [name for name in self.target_modules if name not in known]
        if not self.target_modules or unknown:
            raise PaliGemmaError(f"LoRA target_modules must be some of {', '.join(sorted(known))} "
                                 f"(in {', '.join(self.parts)}), got {list(self.target_modules)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def selects(self, name: str) -> bool:
        """Whether the module called `name` (as in `model.named_modules()`) is one of the targets."""
        part, leaf = name.split(".", 1)[0], name.rsplit(".", 1)[-1]
        return part in self.parts and leaf in self.target_modules and leaf in LINEAR_LAYERS[part]


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: `base(x) + B(A(dropout(x))) * alpha / rank`."""

    def __init__(self, base_layer: nn.Linear, settings: LoraSettings, generator: torch.Generator | None = None):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.rank, self.alpha, self.scaling = settings.rank, settings.alpha, settings.scaling
        weight = base_layer.weight
        # Half-precision bases get float32 adapters: the update is small, and its training needs the precision.
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.lora_A = nn.Linear(base_layer.in_features, settings.rank, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(settings.rank, base_layer.out_features, bias=False, device=weight.device, dtype=dtype)
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.reset_adapter(generator)
        self.train(base_layer.training)  # a new module trains by default: take the mode of the layer it replaces

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @torch.no_grad()
    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        """A as `nn.Linear` draws its weights (kaiming-uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))); B zero."""
        bound = 1 / math.sqrt(self.in_features)
        drawn = torch.empty(self.lora_A.weight.shape).uniform_(-bound, bound, generator=generator)  # [r, in]
        self.lora_A.weight.copy_(drawn)  # drawn on the CPU: a seed gives the same A on any device
        self.lora_B.weight.zero_()  # [out, r]: the adapted layer starts equal to the base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # [..., in] -> [..., out]
        low_rank = self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))  # [..., in] -> [..., r]
        update = self.lora_B(low_rank) * self.scaling  # [..., r] -> [..., out]
        return (result + update).to(result.dtype)  # summed in the wider dtype, rounded once (as peft does)

    @torch.no_grad()
    def merged_base(self) -> nn.Linear:
        """The base layer with the update folded in: W += (alpha / r) * B @ A, computed in float32 or wider."""
        weight = self.base_layer.weight
        wide = torch.promote_types(weight.dtype, torch.float32)
        delta = (self.lora_B.weight.to(wide) @ self.lora_A.weight.to(wide)) * self.scaling  # [out, r] @ [r, in]
        weight.copy_((weight.to(wide) + delta).to(weight.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def lora_targets(model: nn.Module, settings: LoraSettings) -> list[str]:
    """The names of the linear layers of `model` that `settings` selects, in the model's order."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and settings.selects(name)]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def apply_lora(
    model: nn.Module, settings: LoraSettings, seed: int = 0, modules: Iterable[str] | None = None
) -> list[str]:
    """Freeze every parameter of `model`, then wrap each target in a `LoraLinear` (in place, A drawn from `seed`).

    Returns the names of the wrapped layers. `modules` names them outright (as a saved adapter does) instead of
    `settings.target_modules` and `settings.parts`; each must be an `nn.Linear` of the model.
    """
    if any(isinstance(module, LoraLinear) for module in model.modules()):
        raise PaliGemmaError("the model already has LoRA adapters: merge them first or start from the base model")
    names = lora_targets(model, settings) if modules is None else list(modules)
    if not names:
        raise PaliGemmaError(f"no linear layer of the model matches LoRA targets {list(settings.target_modules)} "
                             f"in {list(settings.parts)}")
    for name in names:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise PaliGemmaError(f"cannot add LoRA to {name}: the model has no such module") from None
        if not isinstance(layer, nn.Linear):
            raise PaliGemmaError(f"cannot add LoRA to {name}: it is a {type(layer).__name__}, not a linear layer")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name in names:  # in the model's order, so a seed always gives the same A in the same layer
        _replace(model, name, LoraLinear(model.get_submodule(name), settings, generator))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every `LoraLinear` of `model`, by name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' weights (every lora_A and lora_B): what the optimizer trains."""
    return [p for layer in lora_layers(model).values() for p in (layer.lora_A.weight, layer.lora_B.weight)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights by their names in the model (`...q_proj.lora_A.weight`), detached."""
    return {f"{name}.{matrix}.weight": getattr(layer, matrix).weight.detach()
            for name, layer in lora_layers(model).items() for matrix in ("lora_A", "lora_B")}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer back, in place; returns the model.

    The result has the original state-dict names and saves with `save_pretrained`. Parameters stay frozen.
    """
    for name, layer in lora_layers(model).items():
        _replace(model, name, layer.merged_base())
    return model

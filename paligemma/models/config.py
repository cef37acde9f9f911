"""Configurations for the vision tower, the language model and PaliGemma as a whole.

Each config is a plain dataclass. `from_dict` reads the contents of a Hugging Face `config.json` (or a part of one;
`paligemma.io.checkpoint.read_config` reads the file): real files are sparse and written by several generations of
`transformers`, so every missing field takes the value that `transformers` gives it, and older field names are
accepted.
`to_dict` writes the layout that current `transformers` reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import PaliGemmaError

# The two kinds of decoder layer (Gemma 2's `layer_types`): a sliding window, or the whole sequence.
SLIDING, FULL = "sliding_attention", "full_attention"

# What `transformers` fills in for a PaliGemma config whose sub-config is missing altogether.
_DEFAULT_VISION = dict(
    hidden_size=1152, intermediate_size=4096, num_hidden_layers=27, num_attention_heads=16, patch_size=14, image_size=224
)
_DEFAULT_TEXT = dict(
    hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1,
    vocab_size=257152,
)


def _known_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Keep the keys that name a field of the dataclass `cls`; the rest (metadata, unused options) is dropped."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {key: value for key, value in values.items() if key in names}


def _check_positive(config: object, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise PaliGemmaError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}")


@dataclass
class SiglipVisionConfig:
    """The SigLIP vision transformer. Defaults are those of `transformers`' `SiglipVisionConfig` (ViT-B/16)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_positive(self, "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_channels", "image_size", "patch_size")
        if self.hidden_size % self.num_attention_heads:
            raise PaliGemmaError(
                f"vision hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.patch_size > self.image_size:
            raise PaliGemmaError(f"vision patch_size {self.patch_size} is larger than image_size {self.image_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        """Patches per image, (image_size / patch_size) squared; 256 for 224 pixels and 14-pixel patches."""
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SiglipVisionConfig":
        return cls(**_known_fields(cls, values))

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "siglip_vision_model", **dataclasses.asdict(self), "vision_use_head": False}


@dataclass
class GemmaConfig:
    """The Gemma decoder. Defaults are those of `transformers`' `GemmaConfig` (Gemma 7B)."""

    vocab_size: int = 256000
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 256
    hidden_act: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2

    def __post_init__(self) -> None:
        _check_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise PaliGemmaError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise PaliGemmaError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act == "gelu":  # the official releases say "gelu" but mean the tanh approximation
            self.hidden_act = "gelu_pytorch_tanh"

    @property
    def num_key_value_groups(self) -> int:
        """The number of query heads that share one key/value head (8 for Gemma 2B's multi-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GemmaConfig":
        values = dict(values)
        # Older files name the activation `hidden_activation`; it took precedence over `hidden_act`.
        if values.get("hidden_activation") is not None:
            values["hidden_act"] = values["hidden_activation"]
        # Current files nest the rotary settings; older ones put `rope_theta` at the top level.
        rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise PaliGemmaError(f"unsupported rotary embedding type {rope.get('rope_type', rope.get('type'))!r}")
        if "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
            if values.get(key) is None:
                values.pop(key, None)
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = values["eos_token_id"][0]
        return cls(**_known_fields(cls, values))

    model_type = "gemma"

    @property
    def layer_sliding_windows(self) -> list[int | None]:
        """The sliding window of each layer, None where it sees the whole sequence (every layer, in Gemma)."""
        return [None] * self.num_hidden_layers

    @property
    def sliding_layers_window(self) -> int | None:
        """The window of the sliding layers (one size for all of them), or None when every layer is global."""
        windows = {w for w in self.layer_sliding_windows if w is not None}
        if len(windows) > 1:
            raise PaliGemmaError(f"sliding layers with different windows {sorted(windows)} are not supported")
        return windows.pop() if windows else None

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["rope_parameters"] = {"rope_type": "default", "rope_theta": values.pop("rope_theta")}
        return {"model_type": self.model_type, **values}



@dataclass
class Gemma2Config(GemmaConfig):
    """The Gemma 2 decoder (PaliGemma 2). Defaults are those of `transformers`' `Gemma2Config` (Gemma 2 2B).

    What Gemma 2 adds: two more RMSNorms per layer (after attention and around the MLP), attention scores
    soft-capped by `attn_logit_softcapping` before the mask, output logits soft-capped by
    `final_logit_softcapping`, the attention scale query_pre_attn_scalar^-0.5 instead of head_dim^-0.5, and
    a sliding window of `sliding_window` tokens on the layers `layer_types` marks "sliding_attention"
    (by default every other one, starting with the first).
    """

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = 30.0
    attn_logit_softcapping: float | None = 50.0

    model_type = "gemma2"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_types is None:
            self.layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= {SLIDING, FULL}:
            raise PaliGemmaError(
                f"layer_types must name {SLIDING!r} or {FULL!r} for each of the {self.num_hidden_layers} layers, "
                f"got {self.layer_types!r}"
            )
        if self.sliding_window is not None:
            _check_positive(self, "sliding_window")
        for name, optional in (("query_pre_attn_scalar", False), ("final_logit_softcapping", True),
                               ("attn_logit_softcapping", True)):
            value = getattr(self, name)
            if value is None and optional:  # no soft-capping
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise PaliGemmaError(f"Gemma2Config.{name} must be a positive number, got {value!r}")

    @property
    def layer_sliding_windows(self) -> list[int | None]:
        return [self.sliding_window if kind == SLIDING else None for kind in self.layer_types]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Gemma2Config":
        values = dict(values)
        # transformers' Gemma2Config reads only `hidden_activation`; a stray `hidden_act` in the file is ignored.
        values.pop("hidden_act", None)
        return super().from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        values = super().to_dict()
        values["hidden_activation"] = values.pop("hidden_act")  # Gemma 2's name for it
        return values


TEXT_CONFIGS: dict[str, type[GemmaConfig]] = {"gemma": GemmaConfig, "gemma2": Gemma2Config}


def text_config_from_dict(values: dict[str, Any]) -> GemmaConfig:
    """A `text_config` section -> GemmaConfig or Gemma2Config, as its `model_type` says (Gemma when it says nothing)."""
    model_type = values.get("model_type") or "gemma"
    if model_type not in TEXT_CONFIGS:
        raise PaliGemmaError(
            f"unsupported text model type {model_type!r} (this version reads {', '.join(map(repr, TEXT_CONFIGS))})"
        )
    return TEXT_CONFIGS[model_type].from_dict(values)


@dataclass
class PaliGemmaConfig:
    """SigLIP + linear projector + Gemma. The defaults describe PaliGemma-3B at 224 pixels, as in `transformers`."""

    vision_config: SiglipVisionConfig = field(default_factory=lambda: SiglipVisionConfig(**_DEFAULT_VISION))
    text_config: GemmaConfig = field(default_factory=lambda: GemmaConfig(**_DEFAULT_TEXT))
    image_token_index: int = 256000
    vocab_size: int = 257152
    projection_dim: int = 2048
    hidden_size: int = 2048
    dtype: str | None = None
    # {"quant_method": "paligemma", "scheme": "int8" | "int4", "group_size": int | None, "kept": [...]} for a folder
    # written by a quantized model (`paligemma.quantization`); None for wide weights.
    quantization: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # Accept plain dicts, as `PaliGemmaConfig(vision_config={...}, text_config={...})` in the docs does.
        if self.vision_config is None:
            self.vision_config = SiglipVisionConfig(**_DEFAULT_VISION)
        elif isinstance(self.vision_config, dict):
            self.vision_config = SiglipVisionConfig.from_dict(self.vision_config)
        if self.text_config is None:
            self.text_config = GemmaConfig(**_DEFAULT_TEXT)
        elif isinstance(self.text_config, dict):
            self.text_config = text_config_from_dict(self.text_config)
        _check_positive(self, "projection_dim")
        if not isinstance(self.image_token_index, int) or self.image_token_index < 0:
            raise PaliGemmaError(f"image_token_index must be a non-negative integer, got {self.image_token_index!r}")
        if self.projection_dim != self.text_config.hidden_size:
            raise PaliGemmaError(
                f"projection_dim {self.projection_dim} must equal the text hidden_size {self.text_config.hidden_size}: "
                "projected image features take the place of token embeddings"
            )

    @property
    def num_image_tokens(self) -> int:
        """The number of `<image>` tokens that stand for one image: one per patch."""
        return self.vision_config.num_patches

    @property
    def image_token_in_vocab(self) -> bool:
        """Whether the `<image>` id has a row in the embedding table (not in PaliGemma 2, where pad is embedded)."""
        return self.image_token_index < self.text_config.vocab_size

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PaliGemmaConfig":
        if values.get("model_type", "paligemma") != "paligemma":
            raise PaliGemmaError(f"config.json describes a {values['model_type']!r} model, not 'paligemma'")
        values = dict(values)
        # Older files carry `torch_dtype`; current ones `dtype`.
        values["dtype"] = values.get("dtype") or values.get("torch_dtype")
        quantization = values.pop("quantization_config", None)
        if quantization is not None:
            method = quantization.get("quant_method") if isinstance(quantization, dict) else None
            if method != "paligemma" or quantization.get("scheme") not in ("int8", "int4"):
                raise PaliGemmaError(f"config.json describes weights quantized by {method!r}, which this library "
                                     "does not read (it reads its own int8 and int4 folders)")
            values["quantization"] = quantization
        return cls(**_known_fields(cls, values))

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` layout of current `transformers` (also read by older versions)."""
        text = self.text_config.to_dict()
        text["num_image_tokens"] = self.num_image_tokens
        text["use_bidirectional_attention"] = True
        vision = self.vision_config.to_dict()
        vision["projection_dim"] = self.projection_dim
        values = {
            "architectures": ["PaliGemmaForConditionalGeneration"],
            "model_type": "paligemma",
            "image_token_index": self.image_token_index,
            "vocab_size": self.vocab_size,
            "projection_dim": self.projection_dim,
            "hidden_size": self.hidden_size,
            "tie_word_embeddings": self.text_config.tie_word_embeddings,
            "bos_token_id": self.text_config.bos_token_id,
            "eos_token_id": self.text_config.eos_token_id,
            "pad_token_id": self.text_config.pad_token_id,
            "text_config": text,
            "vision_config": vision,
        }
        if self.dtype is not None:
            values["dtype"] = self.dtype
        if self.quantization is not None:
            values["quantization_config"] = dict(self.quantization)
        return values

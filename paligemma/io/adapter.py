"""LoRA adapters on disk, in peft's folder format: `adapter_config.json` and `adapter_model.safetensors`.

peft names each weight by the module it adapts in the transformers model, under `base_model.model.`, without the
adapter's name: transformers 5 (what is written here, and what peft 0.21 writes) and the older layouts (read too) are

    base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight     transformers >= 4.52
    base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight     transformers < 4.52
    base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj.lora_B.weight
    base_model.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.lora_B.weight

so a library name is the key less `base_model.model.model.` and the `.lora_A.weight` ending (`layout.to_library_name`
reads the older ones). The config's `target_modules` is a regular expression that peft matches against every
module name: plain names would be matched as suffixes and catch SigLIP's q/k/v projections too.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ..errors import PaliGemmaError
from ..training.lora import LoraLinear, LoraSettings, apply_lora, lora_layers, lora_parameters
from .layout import TIED_HEAD, to_library_name, write_json
from .safetensors import SafetensorsFile, write_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # peft's: the PeftModel's base_model (a LoraModel), then its .model
PEFT_FORMAT_VERSION = "0.21.2"  # the peft release whose files these mirror
MATRICES = ("lora_A", "lora_B")
# A decoder or tower layer's projection, as the library names it: language_model.layers.3.self_attn.q_proj
LAYER_MODULE = re.compile(
    r"(?P<part>language_model|vision_tower)\.(?:.*\.)?layers\.(?P<layer>\d+)\.[^.]+\.(?P<leaf>[^.]+)"
)
# Settings that change what a LoRA layer computes, which this library does not implement (peft's defaults are off).
UNSUPPORTED = ("use_dora", "use_rslora", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
               "modules_to_save", "trainable_token_indices", "target_parameters")


def transformers_module(name: str) -> str:
    """The library's module name -> the same module's name in a transformers 5 PaliGemma."""
    return "lm_head" if f"{name}.weight" == TIED_HEAD else f"model.{name}"


def peft_key(name: str, matrix: str) -> str:
    """The library's module name and 'lora_A' or 'lora_B' -> the key peft writes for a transformers 5 PaliGemma."""
    return f"{KEY_PREFIX}{transformers_module(name)}.{matrix}.weight"


def library_module(key: str) -> tuple[str, str] | None:
    """A key of any peft layout -> (the library's module name, 'lora_A' or 'lora_B'); None if it is not one."""
    match = re.fullmatch(re.escape(KEY_PREFIX) + r"(?P<module>.+)\.(?P<matrix>lora_A|lora_B)\.weight", key)
    if match is None:
        return None
    return to_library_name(match["module"] + ".weight").removesuffix(".weight"), match["matrix"]


def target_pattern(model: nn.Module) -> str:
    """A regular expression that peft's `re.fullmatch` finds true of exactly the adapted modules, in transformers'
    naming of any version: one alternative per part and set of layers, listing the projections."""
    adapted_names = set(lora_layers(model))
    available, adapted = defaultdict(set), defaultdict(set)  # (part, projection) -> layer indices
    exact = []  # adapted modules outside the decoder's and tower's layers (the projector, say): named in full
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, LoraLinear)):
            continue
        match = LAYER_MODULE.fullmatch(name)
        if match:
            available[match["part"], match["leaf"]].add(int(match["layer"]))
            if name in adapted_names:
                adapted[match["part"], match["leaf"]].add(int(match["layer"]))
        elif name in adapted_names:
            exact.append(re.escape(transformers_module(name).removeprefix("model.")))
    groups = defaultdict(list)  # (part, pattern of the layer indices) -> projections
    for (part, leaf), layers in adapted.items():
        every = layers == available[part, leaf]
        groups[part, r"\d+" if every else "(?:" + "|".join(map(str, sorted(layers))) + ")"].append(leaf)
    alternatives = [rf"{part}\.(?:.*\.)?layers\.{layers}\.[^.]+\.(?:{'|'.join(leaves)})"
                    for (part, layers), leaves in groups.items()]
    return r"(?:.*\.)?(?:" + "|".join(alternatives + exact) + ")"


def _uniform(model: nn.Module) -> LoraSettings:
    """The rank, alpha and dropout that every adapter of the model shares (peft's config has one of each)."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise PaliGemmaError("the model has no LoRA adapters to save: call apply_lora or load_adapter first")
    values = {(layer.rank, layer.alpha, layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else 0.0)
              for layer in layers}
    if len(values) > 1:
        raise PaliGemmaError(f"the adapters differ in (rank, alpha, dropout): {sorted(values)}; peft's format has one")
    rank, alpha, dropout = values.pop()
    return LoraSettings(rank=rank, alpha=alpha, dropout=dropout)


def adapter_config(model: nn.Module, base_model_name_or_path: str | Path | None = None) -> dict:
    """The contents of adapter_config.json for the model's adapters: every field peft 0.21.2's LoraConfig writes."""
    settings = _uniform(model)
    return {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None,
        "auto_mapping": {"base_model_class": "PaliGemmaForConditionalGeneration",
                         "parent_library": "transformers.models.paligemma.modeling_paligemma"},
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "bias": "none", "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
        "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "kasa_config": None, "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
        "loftq_config": {}, "lora_alpha": settings.alpha, "lora_bias": False, "lora_dropout": settings.dropout,
        "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
        "monteclora_config": None, "peft_type": "LORA", "peft_version": PEFT_FORMAT_VERSION, "qalora_group_size": 16,
        "r": settings.rank, "rank_pattern": {}, "revision": None, "target_modules": target_pattern(model),
        "target_parameters": None, "task_type": None, "trainable_token_indices": None, "use_bdlora": None,
        "use_dora": False, "use_qalora": False, "use_rslora": False, "velora_config": None,
    }


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | Path | None = None) -> None:
    """Write the model's adapters as peft does (`PeftModel.from_pretrained` loads the folder); each file atomically."""
    directory = Path(directory)
    config = adapter_config(model, base_model_name_or_path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {peft_key(name, matrix): getattr(layer, matrix).weight.detach()
               for name, layer in lora_layers(model).items() for matrix in MATRICES}
    write_safetensors(directory / WEIGHTS_NAME, tensors)
    write_json(directory / CONFIG_NAME, config)


def read_adapter_config(directory: Path) -> LoraSettings:
    """The rank, alpha and dropout of a peft LoRA folder's config, after checking that this library can run it."""
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise PaliGemmaError(f"adapter folder not found: {directory}")
    if not path.is_file():
        raise PaliGemmaError(f"{CONFIG_NAME} is missing from the adapter folder {directory}")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PaliGemmaError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise PaliGemmaError(f"{path} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise PaliGemmaError(f"{path} has peft_type {config.get('peft_type')!r}; only 'LORA' adapters can be loaded")
    unsupported = [key for key in UNSUPPORTED if config.get(key)]
    unsupported += ["bias"] if config.get("bias", "none") != "none" else []
    if unsupported:
        raise PaliGemmaError(f"{path} uses {', '.join(unsupported)}, which this library's LoRA does not implement")
    try:
        return LoraSettings(rank=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout") or 0.0)
    except KeyError as error:
        raise PaliGemmaError(f"{path} has no {error.args[0]!r}") from None
    except (PaliGemmaError, TypeError) as error:
        raise PaliGemmaError(f"{path}: {error}") from None


def read_adapter_weights(directory: Path) -> tuple[SafetensorsFile, dict[str, dict[str, str]]]:
    """The weights file and, for each adapted module (library name), the keys of its lora_A and lora_B."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickled = (directory / "adapter_model.bin").exists()
        note = " (it holds adapter_model.bin: only safetensors are read)" if pickled else ""
        raise PaliGemmaError(f"{WEIGHTS_NAME} is missing from the adapter folder {directory}{note}")
    file = SafetensorsFile(path)
    modules: dict[str, dict[str, str]] = defaultdict(dict)
    for key in file.entries:
        found = library_module(key)
        if found is None:
            raise PaliGemmaError(f"unexpected tensor {key} in {path}: only lora_A and lora_B weights are read")
        modules[found[0]][found[1]] = key
    if not modules:
        raise PaliGemmaError(f"{path} holds no LoRA weights")
    for name, keys in modules.items():
        if set(keys) != set(MATRICES):
            raise PaliGemmaError(f"{path} has {', '.join(keys)} but not both lora_A and lora_B for {name}")
    return file, dict(modules)


def _check_shapes(model: nn.Module, file: SafetensorsFile, modules: dict[str, dict[str, str]], rank: int) -> None:
    """Every adapted module exists in the model as a linear layer, and A, B have the shapes [r, in], [out, r]."""
    wrong = []
    for name, keys in modules.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise PaliGemmaError(f"the adapter's {keys['lora_A']} names {name}, not a module of this model") from None
        if not isinstance(layer, nn.Linear):
            raise PaliGemmaError(f"the adapter's {keys['lora_A']} names {name}, which is not a linear layer")
        expected = {"lora_A": (rank, layer.in_features), "lora_B": (layer.out_features, rank)}
        wrong += [f"{key} {list(file.shape(key))} (this model needs {list(expected[matrix])})"
                  for matrix, key in keys.items() if file.shape(key) != expected[matrix]]
    if wrong:
        shown = "; ".join(wrong[:3]) + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        raise PaliGemmaError(f"adapter weights of the wrong shape for this model (r={rank}): {shown}")


def load_adapter(model: nn.Module, directory: str | Path, trainable: bool = False) -> list[str]:
    """Add the LoRA adapters of a peft folder (ours, or one peft wrote) to exactly the modules it names, in place.

    Returns their names. The base stays frozen; the adapters are frozen too unless `trainable` (to train on).
    """
    directory = Path(directory)
    settings = read_adapter_config(directory)
    file, modules = read_adapter_weights(directory)
    _check_shapes(model, file, modules, settings.rank)
    names = apply_lora(model, settings, modules=[name for name, _ in model.named_modules() if name in modules])
    layers = lora_layers(model)
    with torch.no_grad():
        for name, keys in modules.items():
            for matrix, key in keys.items():
                weight = getattr(layers[name], matrix).weight
                weight.copy_(file.tensor(key, weight.dtype, weight.device))
    for parameter in lora_parameters(model):
        parameter.requires_grad_(trainable)
    return names

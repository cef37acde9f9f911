"""SigLIP, the vision tower: a plain pre-LayerNorm vision transformer.

pixels [b, 3, H, W] -> patches [b, N, d] (+ learned positions) -> encoder layers -> LayerNorm -> [b, N, d]

PaliGemma uses every patch's final state, so there is no class token and no pooling head.
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import get_activation
from .attention import DotProductAttention
from .config import SiglipVisionConfig


class SiglipVisionEmbeddings(nn.Module):
    """Cut the image into patches, project each to a vector (one strided convolution), add a learned position."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [b, d, grid, grid]
        patches = patches.flatten(2).transpose(1, 2)  # [b, grid*grid, d], row by row from the top left
        return patches + self.position_embedding.weight  # the same position table for every image


class SiglipAttention(nn.Module):
    """Multi-head self-attention over all patches (no mask: every patch sees every other)."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.attend = DotProductAttention(self.head_dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        heads = (batch, length, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(heads).transpose(1, 2)  # [b, n, d] -> [b, heads, n, head_dim]
        k = self.k_proj(x).view(heads).transpose(1, 2)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        out = self.attend(q, k, v).reshape(batch, length, -1)  # [b, n, heads, head_dim] -> [b, n, d]
        return self.out_proj(out)


class SiglipMLP(nn.Module):
    """Two linear layers with GELU between them, applied to each patch on its own."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    """x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x))."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    """The stack of encoder layers (its own module, for the checkpoint's `encoder.layers.N` names)."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))


class SiglipVisionModel(nn.Module):
    """Pixels [b, 3, H, W] in [-1, 1] -> one feature vector per patch [b, num_patches, hidden_size]."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)

"""Vision transformers (vit_t, vit_s, vit_b) with arcface_torch's parameter names, shapes and forward computation.

A 9x9, stride-9 patch embedding turns a 112x112 face into 12x12 = 144 tokens (the last 4 pixel rows and columns are
never seen), a learned position embedding is added, and pre-norm encoder blocks (8 heads, ReLU6 MLP of 4x width,
stochastic depth rising linearly to 0.1) follow. There is no class token: the final LayerNorm's 144 tokens are
flattened and a head of linear, BN, linear, BN makes the embedding. While training, a random 10% of the tokens skip
the encoder and are replaced by a learned mask token before the head.

Precision follows arcface_torch, whose ViT ignores `fp16`: on CUDA the qkv/output projections and the MLP always run
under autocast, the softmax attention always in float32, the final norm and head in the caller's precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kd_plugin.networks._amp import cuda_autocast
from kd_plugin.networks.registry import register_network, without_dropout

IMAGE_SIZE = 112
PATCH_SIZE = 9
# (token width, number of blocks, checkpoint the blocks while training)
VARIANTS = {
    "vit_t": (256, 12, False),
    "vit_s": (512, 12, False),
    "vit_b": (512, 24, True),
}


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    """(value, value) for an int; a 2-sequence unchanged."""
    if isinstance(value, int):
        return value, value
    first, second = value
    return first, second


class DropPath(nn.Module):
    """Stochastic depth: while training, zero a residual branch for whole samples and rescale the kept ones."""

    def __init__(self, rate: float = 0.0) -> None:
        """`rate`: probability of dropping the branch for a sample."""
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The branch, with whole samples zeroed at random while training."""
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        """Rate shown in the module's repr."""
        return f"rate={self.rate}"


class PatchEmbed(nn.Module):
    """Non-overlapping square patches projected to tokens by a strided conv: (N,3,H,W) -> (N, patches, dim)."""

    def __init__(self, image_size: int | tuple[int, int] = IMAGE_SIZE, patch_size: int | tuple[int, int] = PATCH_SIZE,
                 in_channels: int = 3, dim: int = 768) -> None:
        """Build the projection for a fixed input size."""
        super().__init__()
        self.image_size = _pair(image_size)
        self.patch_size = _pair(patch_size)
        self.num_patches = (self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1])
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens in row-major patch order."""
        if tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"input images are {tuple(x.shape[-2:])}, this network takes {self.image_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention without qkv bias; the attention itself is computed in float32."""

    def __init__(self, dim: int, heads: int = 8, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        """Build the fused qkv and output projections."""
        super().__init__()
        self.heads = heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over the tokens of each sample."""
        batch, tokens, dim = x.shape
        with cuda_autocast(x, True):
            qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        # half-precision softmax over many tokens is what upstream avoids here; an enclosing autocast is switched off
        with cuda_autocast(x, False):
            q, k, v = qkv.float().unbind(0)
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
            out = out.transpose(1, 2).reshape(batch, tokens, dim)
        with cuda_autocast(x, True):
            return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """Linear, ReLU6, dropout, linear, dropout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        """Build the two linear layers."""
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the feed-forward layer token-wise."""
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x)), each branch under stochastic depth."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0) -> None:
        """Build one block."""
        super().__init__()
        # registration order matters: it is the order of the checkpoint keys
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply both residual branches."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        with cuda_autocast(x, True):
            return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """(N, 3, 112, 112) normalised faces -> (N, embedding_size) raw embeddings."""

    def __init__(self, embedding_size: int = 512, dim: int = 512, depth: int = 12, heads: int = 8,
                 image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE, mlp_ratio: float = 4.0,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 mask_ratio: float = 0.1, checkpoint_blocks: bool = False) -> None:
        """Build the patch embedding, the encoder and the flattened-token head."""
        super().__init__()
        self.dim = dim
        self.mask_ratio = mask_ratio
        self.checkpoint_blocks = checkpoint_blocks
        self.patch_embed = PatchEmbed(image_size, patch_size, 3, dim)
        self.num_patches = self.patch_embed.num_patches
        # pos_embed must be registered before mask_token: direct parameters lead the checkpoint in this order
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            EncoderBlock(dim, heads, mlp_ratio, drop=drop_rate, attn_drop=attn_drop_rate, drop_path=rate)
            for rate in rates)
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(
            nn.Linear(dim * self.num_patches, dim, bias=False),
            nn.BatchNorm1d(dim, eps=2e-5),
            nn.Linear(dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self._init_weights()

    def _init_weights(self) -> None:
        """arcface_torch's initialisation, so training from scratch starts where upstream does."""
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _keep_random_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A random subset of each sample's tokens, and the permutation that puts tokens back in place."""
        batch, tokens, dim = x.shape
        kept = int(tokens * (1 - self.mask_ratio))
        shuffle = torch.rand(batch, tokens, device=x.device).argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        index = shuffle[:, :kept].unsqueeze(-1).expand(-1, -1, dim)
        return torch.gather(x, 1, index), restore

    def _refill(self, x: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Append mask tokens for the dropped positions and undo the shuffle."""
        batch, kept, dim = x.shape
        filler = self.mask_token.to(x.dtype).expand(batch, restore.shape[1] - kept, dim)
        full = torch.cat([x, filler], dim=1)
        return torch.gather(full, 1, restore.unsqueeze(-1).expand(-1, -1, dim))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened normalised tokens, (N, patches * dim)."""
        batch = x.shape[0]
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        restore = None
        if self.training and self.mask_ratio > 0:
            x, restore = self._keep_random_tokens(x)
        for block in self.blocks:
            if self.checkpoint_blocks and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x.float())
        if restore is not None:
            x = self._refill(x, restore)
        return x.reshape(batch, self.num_patches * self.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch."""
        return self.feature(self.forward_features(x))


def build_vit(name: str, embedding_size: int = 512) -> VisionTransformer:
    """The ViT called `name` (vit_t, vit_s or vit_b)."""
    dim, depth, checkpoint_blocks = VARIANTS[name]
    return VisionTransformer(embedding_size=embedding_size, dim=dim, depth=depth, heads=8, drop_path_rate=0.1,
                             mask_ratio=0.1, checkpoint_blocks=checkpoint_blocks)


# arcface_torch's ViTs ignore fp16 (see the module docstring)
@register_network("vit_t")
@without_dropout
def vit_t(*, embedding_size: int, fp16: bool) -> VisionTransformer:
    """arcface_torch's ViT-T."""
    return build_vit("vit_t", embedding_size)


@register_network("vit_s")
@without_dropout
def vit_s(*, embedding_size: int, fp16: bool) -> VisionTransformer:
    """arcface_torch's ViT-S."""
    return build_vit("vit_s", embedding_size)


@register_network("vit_b")
@without_dropout
def vit_b(*, embedding_size: int, fp16: bool) -> VisionTransformer:
    """arcface_torch's ViT-B."""
    return build_vit("vit_b", embedding_size)

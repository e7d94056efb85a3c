"""Swin Transformer encoder for SAR masked-image pretraining and dense fine-tuning.

Built from timm's :class:`timm.models.swin_transformer.SwinTransformer` (not copied code): its
patch embedding, stages and final norm are reused as they are; this module adds what SimMIM and
UPerNet need and timm's Swin lacks:

- a learnable **absolute position embedding** (SimMIM's ``ape=True``), added after patch embedding;
- a **token hook** between patch embedding and position embedding, where SimMIM replaces masked
  tokens by its mask token (as in the official SimMIM ``SwinTransformerForSimMIM``);
- **NCHW outputs**: the final feature map and the per-stage intermediates (timm works in NHWC).

Parameter names (the encoder ``state_dict`` is what pretraining exports for fine-tuning)::

    patch_embed.proj.{weight,bias}     Conv2d(in_chans, C0, patch, stride=patch)
    patch_embed.norm.{weight,bias}     LayerNorm(C0) (Swin's patch_norm)
    absolute_pos_embed                 (1, (img/patch)^2, C0), row-major token order, as in the
                                       official Swin/SimMIM checkpoints
    layers.{i}.downsample.*            PatchMerging at the *start* of stages 1..3 (timm layout;
                                       the Microsoft layout has it at the end of stages 0..2)
    layers.{i}.blocks.{j}.*            Swin blocks (norm1,
                                       attn.{qkv,proj,relative_position_bias_table},
                                       norm2, mlp.{fc1,fc2})
    norm.{weight,bias}                 LayerNorm(C3) after the last stage

Stage ``i`` outputs ``num_features[i] = embed_dim * 2^i`` channels at stride ``patch * 2^i``; at
256 px with patch 4 the stage grids are 64, 32, 16, 8. timm shrinks a stage's window to its grid
(and drops the shift) where the grid is not larger than the window, so window 8 is exact at 8x8.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.layers import trunc_normal_
from timm.models.swin_transformer import SwinTransformer
from torch import Tensor, nn

__all__ = ["SwinEncoder", "swin_base", "swin_tiny"]

TokenFn = Callable[[Tensor], Tensor]


class SwinEncoder(nn.Module):
    """Hierarchical Swin encoder with absolute position embedding, NCHW outputs.

    Args:
        embed_dim: channels ``C0`` of the patch embedding (stage ``i`` has ``C0 * 2^i``).
        depths: number of Swin blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window side in tokens.
        patch_size: patch embedding stride in pixels (one token = ``patch_size`` px).
        img_size: input side in pixels; inputs must be exactly ``img_size x img_size`` (the absolute
            position embedding and the precomputed shifted-window masks are sized for it).
        in_chans: input channels (1 for HH).
        drop_path_rate: stochastic depth rate, linearly increasing over blocks (timm rule).
        absolute_pos_embed: add the learnable absolute position embedding (trunc-normal, std .02).
        **timm_kwargs: passed to :class:`SwinTransformer` (e.g. ``mlp_ratio``, ``qkv_bias``,
            ``attn_drop_rate``, ``proj_drop_rate``).

    Attributes:
        num_features: channels of each stage output, ``[C0, 2 C0, 4 C0, 8 C0]``.
        reductions: stride of each stage output in pixels, ``[4, 8, 16, 32]`` for patch 4.
        grid_size: token grid ``(img/patch, img/patch)`` after patch embedding.
    """

    def __init__(
        self,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int = 8,
        patch_size: int = 4,
        img_size: int = 256,
        in_chans: int = 1,
        drop_path_rate: float = 0.0,
        absolute_pos_embed: bool = True,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {depths} and num_heads {num_heads} must have equal length")
        if img_size % patch_size:
            raise ValueError(
                f"img_size ({img_size}) must be divisible by patch_size ({patch_size})"
            )
        # timm builds and initialises everything (trunc-normal .02 linears, zero biases); we keep
        # its modules under the same attribute names but not the classifier head, and do not
        # subclass: timm's `num_features` is an int used by its head code, ours is a per-stage list.
        swin = SwinTransformer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            embed_dim=embed_dim,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            drop_path_rate=drop_path_rate,
            strict_img_size=True,
            **timm_kwargs,
        )
        self.patch_embed = swin.patch_embed  # (B, C, H, W) -> (B, H/p, W/p, C0), NHWC, normed
        self.layers = swin.layers  # nn.Sequential of SwinTransformerStage, NHWC in/out
        self.norm = swin.norm  # LayerNorm(C3)

        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depths = tuple(depths)
        self.num_heads = tuple(num_heads)
        self.window_size = window_size
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)
        self.num_features: list[int] = [embed_dim * 2**i for i in range(len(depths))]
        self.reductions: list[int] = [patch_size * 2**i for i in range(len(depths))]
        self.feature_info = [dict(info) for info in swin.feature_info]

        num_tokens = self.grid_size[0] * self.grid_size[1]
        if absolute_pos_embed:
            # (1, L, C0) like the official Swin/SimMIM `absolute_pos_embed`, for checkpoint porting.
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        else:
            self.register_parameter("absolute_pos_embed", None)

    # -- embedding ---------------------------------------------------------------------------------

    def forward_embed(self, x: Tensor, mask_token_fn: TokenFn | None = None) -> Tensor:
        """Patch embedding, optional token hook, absolute position embedding.

        Args:
            x: ``(B, in_chans, img, img)`` normalised image.
            mask_token_fn: applied to the ``(B, H/p, W/p, C0)`` NHWC tokens right after patch
                embedding and before the position embedding (SimMIM: replace masked tokens by the
                mask token, so masked positions carry ``mask_token + pos_embed``).

        Returns:
            ``(B, H/p, W/p, C0)`` NHWC tokens: the input of stage 0.
        """
        x = self.patch_embed(x)  # (B, Hp, Wp, C0)
        if mask_token_fn is not None:
            x = mask_token_fn(x)  # (B, Hp, Wp, C0)
        if self.absolute_pos_embed is not None:
            _, hp, wp, c = x.shape
            x = x + self.absolute_pos_embed.view(1, hp, wp, c).to(x.dtype)  # row-major L = Hp*Wp
        return x

    # -- full passes -------------------------------------------------------------------------------

    def forward_features(self, x: Tensor, mask_token_fn: TokenFn | None = None) -> Tensor:
        """Final, normed feature map.

        Args:
            x: ``(B, in_chans, img, img)``.
            mask_token_fn: token hook, see :meth:`forward_embed`.

        Returns:
            ``(B, num_features[-1], img / reductions[-1], img / reductions[-1])`` NCHW, i.e.
            ``(B, 8 C0, H/32, W/32)`` for patch 4 and four stages.
        """
        x = self.forward_embed(x, mask_token_fn)  # (B, H/4, W/4, C0)
        x = self.layers(x)  # (B, H/32, W/32, C3)
        x = self.norm(x)
        return x.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW

    def forward_intermediates(
        self,
        x: Tensor,
        mask_token_fn: TokenFn | None = None,
        norm: bool = False,
    ) -> list[Tensor]:
        """Post-embedding map and every stage output, NCHW (for UPerNet-style decoders).

        Args:
            x: ``(B, in_chans, img, img)``.
            mask_token_fn: token hook, see :meth:`forward_embed`.
            norm: apply the final ``norm`` to the last stage output (as timm's ``norm=True``).

        Returns:
            ``[embed, stage0, stage1, stage2, stage3]``: ``embed`` is the stage-0 input (patch
            embedding + position embedding) ``(B, C0, H/4, W/4)``; stage ``i`` is
            ``(B, num_features[i], H / reductions[i], W / reductions[i])``.
        """
        x = self.forward_embed(x, mask_token_fn)  # (B, H/4, W/4, C0)
        outs = [x]
        last = len(self.layers) - 1
        for i, stage in enumerate(self.layers):
            x = stage(x)  # (B, H/(4*2^i), W/(4*2^i), C0*2^i)
            outs.append(self.norm(x) if norm and i == last else x)
        return [o.permute(0, 3, 1, 2).contiguous() for o in outs]  # NHWC -> NCHW

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`forward_features` without a token hook."""
        return self.forward_features(x)

    # -- optimiser / training helpers (timm conventions) -------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay (as SimMIM/Swin: APE and rel-pos tables)."""
        names = {"absolute_pos_embed"} if self.absolute_pos_embed is not None else set()
        names |= {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise lr decay (timm's ``param_groups_layer_decay``)."""
        return dict(
            stem=r"^patch_embed|^absolute_pos_embed",
            blocks=r"^layers\.(\d+)"
            if coarse
            else [
                (r"^layers\.(\d+).downsample", (0,)),
                (r"^layers\.(\d+)\.\w+\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute stage activations in the backward pass to save memory."""
        for stage in self.layers:
            stage.grad_checkpointing = enable


# Encoder sizes, shared by SimMIM (SwinEncoder) and MixMAE (training/models/mixmae.py).
SWIN_BASE: dict[str, Any] = dict(
    embed_dim=128,
    depths=(2, 2, 18, 2),
    num_heads=(4, 8, 16, 32),
    window_size=8,
    patch_size=4,
    img_size=256,
    in_chans=1,
)
SWIN_TINY: dict[str, Any] = dict(
    embed_dim=32,
    depths=(1, 1, 2, 1),
    num_heads=(1, 2, 4, 8),
    window_size=8,
    patch_size=4,
    img_size=256,
    in_chans=1,
)


def swin_base(**kwargs: Any) -> SwinEncoder:
    """Swin-B as in docs/design.md §4: embed 128, depths 2/2/18/2, heads 4/8/16/32, window 8,
    patch 4, 256 px, 1 channel (about 87 M parameters). ``kwargs`` override any argument."""
    return SwinEncoder(**{**SWIN_BASE, **kwargs})


def swin_tiny(**kwargs: Any) -> SwinEncoder:
    """A tiny Swin for tests and smoke runs on CPU: embed 32, depths 1/1/2/1, heads 1/2/4/8,
    window 8, patch 4, 256 px, 1 channel. Same stage layout as Swin-B (grids 64/32/16/8 at 256 px),
    with one shifted-window block (stage 2). ``kwargs`` override any argument."""
    return SwinEncoder(**{**SWIN_TINY, **kwargs})

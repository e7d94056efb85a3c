"""MixMAE / SAR-W-MixMAE (Liu et al. 2023; SAR weighting per docs/design.md §4).

::

    x (B, C, H, W) --patch_embed--> tokens (B, H/4, W/4, C0)
        mix image i with image B-1-i where m = 1          (one (g, g) mask per batch, 32-px units)
        + fixed 2-D sin-cos absolute position embedding
    --Swin stages, no shifted windows, attention only between tokens of the same source image
      (additive -inf mask in window attention), + norm--> z (B, L = (H/32)^2, C3)
    --linear C3 -> 512, mask tokens filled two complementary ways (2B, L, 512), + sin-cos positions,
      8 ViT blocks (512 wide, 16 heads), norm, linear 512 -> 32^2 C--> (2B, L, 32^2 C)
    --unmix--> pred (B, L, 32^2 C): both images of each pair reconstructed at every position
    loss = mean(W * (pred - t)^2),  t = per-32-px-patch normalised pixels, W = SAR weight (or 1)

The mixing, unmixing and loss are public functions in :mod:`training.mixing`.

Reused from timm vs written here
--------------------------------
The encoder *is* a :class:`~training.models.swin.SwinEncoder` (timm's ``PatchEmbed``,
``PatchMerging``, ``SwinTransformerBlock``/``WindowAttention`` modules, ``norm``), so its
``state_dict`` has exactly the keys fine-tuning loads; the decoder blocks are timm's ViT ``Block``;
the sin-cos tables are timm's ``build_sincos2d_pos_embed``; window partitioning is timm's
``window_partition``/``window_reverse``. Shifted windows are switched off with timm's own
``set_input_size`` after zeroing each block's target shift.

Written by hand: :func:`window_attention_block`, the ~10-line body of
``SwinTransformerBlock.forward`` (norm1 -> window partition -> ``WindowAttention`` -> reverse ->
residual -> MLP). timm's block cannot take a per-call attention mask: its ``forward(x)`` always uses
the mask it computed itself (the shifted-window buffer), while MixMAE's mask changes every batch.
The same timm submodules are called; only the mask is passed through to ``WindowAttention``, which
already accepts an additive ``(num_windows, N, N)`` mask. (Writing the per-batch mask into the
block's buffer would also work but is hidden state that breaks with concurrent/compiled use.)

Positions and export
--------------------
The fixed sin-cos encoder table is stored *in* ``encoder.absolute_pos_embed`` (the SwinEncoder
parameter, frozen: ``requires_grad=False``). ``model.encoder.state_dict()`` is therefore a plain
SwinEncoder state dict: a fine-tuning ``SwinEncoder(absolute_pos_embed=True)`` of the same sizes
(``swin_base()`` / ``swin_tiny()``) loads it with ``strict=True`` and starts from the sin-cos
table as its (learnable) APE, as MAE fine-tuning does with its pretrained sin-cos ``pos_embed``.
The decoder's sin-cos table is a non-persistent buffer (recomputed, not checkpointed).

Window sizes: the default is 8 in every stage, the fine-tuning Swin's window, so the relative
position tables load unchanged. At 256 px the stage grids are 64/32/16/8, so the last stage is one
8x8 window (global attention); timm shrinks any window larger than its stage grid to the grid. A
MixMAE-paper-like ``window_size=(16, 16, 16, 8)`` (global attention in stages 2 and 3) also works
but its ``relative_position_bias_table``s then only load into a SwinEncoder built with the same
windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch
from timm.layers import trunc_normal_
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from training.mixing import (
    dual_mask_fill,
    mask_to_grid,
    mix_pairs,
    mixmae_loss,
    mixmae_mask,
    normalize_patches,
    patchify,
    unmix_reconstruction,
    unpatchify,
)
from training.models.swin import SWIN_BASE, SWIN_TINY, SwinEncoder
from training.sar_weight import WEIGHT_DOMAINS, sar_intensity_weight

__all__ = [
    "MixMAE",
    "isolation_attn_mask",
    "mixmae_base",
    "mixmae_tiny",
    "window_attention_block",
]


def isolation_attn_mask(
    token_mask: Tensor, window_size: tuple[int, int], dtype: torch.dtype = torch.float32
) -> Tensor:
    """Additive window-attention mask that keeps the two images of a mixed sample apart.

    Args:
        token_mask: ``(G, G)`` bool mask on a stage's token grid (one per batch).
        window_size: the stage's (timm-clamped) window ``(wh, ww)``; must divide ``G``.
        dtype: dtype of the returned mask.

    Returns:
        ``(num_windows, N, N)``, ``N = wh * ww``, windows in timm's ``window_partition`` order:
        ``0`` where ``m_i == m_j``, ``-inf`` elsewhere. ``-inf`` (not timm's ``-100``) makes the
        cross-image softmax weights exactly zero; every query may attend to itself, so no row is
        fully masked.
    """
    g_h, g_w = token_mask.shape
    wh, ww = window_size
    if g_h % wh or g_w % ww:
        raise ValueError(f"window {window_size} must divide the token grid {(g_h, g_w)}")
    m = token_mask.to(torch.float32).view(1, g_h, g_w, 1)
    win = window_partition(m, (wh, ww)).view(-1, wh * ww)  # (nW, N)
    same = win[:, :, None] == win[:, None, :]  # (nW, N, N)
    out = torch.zeros(same.shape, dtype=dtype, device=token_mask.device)
    return out.masked_fill_(~same, float("-inf"))


def window_attention_block(
    block: SwinTransformerBlock, x: Tensor, attn_mask: Tensor | None = None
) -> Tensor:
    """``SwinTransformerBlock.forward`` without shift or padding, with an explicit attention mask.

    Args:
        block: a timm block (its ``norm1``, ``attn``, ``drop_path1``, ``norm2``, ``mlp`` and
            ``drop_path2`` are used as they are); its ``shift_size`` must be ``(0, 0)``.
        x: ``(B, H, W, C)`` NHWC tokens; ``H, W`` multiples of ``block.window_size``.
        attn_mask: ``(num_windows, N, N)`` additive mask (:func:`isolation_attn_mask`) or ``None``.

    Returns:
        ``(B, H, W, C)``; equal to ``block(x)`` when ``attn_mask`` is ``None``.
    """
    if any(block.shift_size):
        raise ValueError("window_attention_block needs a block without shifted windows")
    b, h, w, c = x.shape
    ws = block.window_size
    y = window_partition(block.norm1(x), ws).view(-1, ws[0] * ws[1], c)  # (B*nW, N, C)
    y = block.attn(y, mask=attn_mask)  # (B*nW, N, C)
    y = window_reverse(y.view(-1, ws[0], ws[1], c), ws, h, w)  # (B, H, W, C)
    x = x + block.drop_path1(y)
    x = x.reshape(b, h * w, c)
    x = x + block.drop_path2(block.mlp(block.norm2(x)))
    return x.reshape(b, h, w, c)


class MixMAE(nn.Module):
    """MixMAE with a shift-free Swin encoder and a ViT decoder; SAR-W-MixMAE with a weight.

    Args:
        embed_dim, depths, num_heads, window_size, patch_size, img_size, in_chans, drop_path_rate:
            encoder sizes, as :class:`SwinEncoder` (defaults: Swin-B, 256 px, 1 channel).
            ``window_size`` may be one int or one per stage.
        decoder_dim: decoder width (the linear ``C3 -> decoder_dim``).
        decoder_depth: number of decoder transformer blocks.
        decoder_heads: decoder attention heads.
        mask_ratio: fraction of mask units taken from the partner image, or a ``(low, high)``
            range drawn per batch (see :func:`training.mixing.mixmae_mask`).
        mask_unit: mask unit in pixels; a multiple of the encoder output stride (32), so that
            patch merging never merges tokens of two images and each decoder token is one source.
        weight_domain: ``"db"`` or ``"normalized"``: what :meth:`sar_weight` expects.
        weight_k: contrast exponent ``k`` of the SAR weight.
        norm_pix_loss: per-patch normalised targets (MAE/MixMAE default).
        **timm_kwargs: passed to timm's ``SwinTransformer`` via :class:`SwinEncoder`
            (``mlp_ratio``, ``qkv_bias``, ``attn_drop_rate``, ...).

    Attributes:
        encoder: the :class:`SwinEncoder` whose ``state_dict()`` is exported for fine-tuning.
        pred_patch: decoder patch in pixels (the encoder output stride, 32).
        grid: decoder token grid side, ``img_size / pred_patch``.
    """

    def __init__(
        self,
        embed_dim: int = 128,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        window_size: int | Sequence[int] = 8,
        patch_size: int = 4,
        img_size: int = 256,
        in_chans: int = 1,
        drop_path_rate: float = 0.0,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mask_ratio: float | tuple[float, float] = 0.5,
        mask_unit: int = 32,
        weight_domain: Literal["db", "normalized"] = "db",
        weight_k: float = 1.0,
        norm_pix_loss: bool = True,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        if weight_domain not in WEIGHT_DOMAINS:
            raise ValueError(
                f"weight_domain must be one of {WEIGHT_DOMAINS}, got {weight_domain!r}"
            )
        if embed_dim % 4 or decoder_dim % 4:
            raise ValueError("embed_dim and decoder_dim must be multiples of 4 (2-D sin-cos)")
        ws = tuple(window_size) if isinstance(window_size, Sequence) else window_size
        self.encoder = SwinEncoder(
            embed_dim=embed_dim,
            depths=depths,
            num_heads=num_heads,
            window_size=ws,
            patch_size=patch_size,
            img_size=img_size,
            in_chans=in_chans,
            drop_path_rate=drop_path_rate,
            absolute_pos_embed=True,
            **timm_kwargs,
        )
        enc = self.encoder
        self.pred_patch = enc.reductions[-1]  # 32 for patch 4 and four stages
        if mask_unit % self.pred_patch or img_size % mask_unit:
            raise ValueError(
                f"mask_unit ({mask_unit}) must be a multiple of the encoder stride "
                f"({self.pred_patch}) and divide img_size ({img_size})"
            )
        self.img_size = img_size
        self.in_chans = in_chans
        self.mask_unit = mask_unit
        self.mask_ratio = mask_ratio
        self.weight_domain = weight_domain
        self.weight_k = weight_k
        self.norm_pix_loss = norm_pix_loss
        self.grid = img_size // self.pred_patch
        self.grad_checkpointing = False

        # No shifted windows: zero each block's target shift and let timm recompute its window,
        # shift and (now absent) shift mask. Stages whose grid is <= the window get one window.
        self.stage_grids: list[int] = []
        for i, stage in enumerate(enc.layers):
            g = enc.grid_size[0] // 2**i
            self.stage_grids.append(g)
            for blk in stage.blocks:
                blk.target_shift_size = (0, 0)
                blk.set_input_size(blk.input_resolution, blk.window_size)
                if g % blk.window_size[0] or g % blk.window_size[1]:
                    raise ValueError(f"stage {i}: window {blk.window_size} must divide grid {g}")

        # Fixed 2-D sin-cos absolute positions, stored in the SwinEncoder's own APE parameter so
        # the exported state dict has SwinEncoder's keys; frozen during pretraining.
        pos = build_sincos2d_pos_embed(list(enc.grid_size), dim=embed_dim)  # (L0, C0) row-major
        with torch.no_grad():
            enc.absolute_pos_embed.copy_(pos[None])
        enc.absolute_pos_embed.requires_grad_(False)

        # -- decoder (MAE-style) --
        c3 = enc.num_features[-1]
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_embed = nn.Linear(c3, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer(
            "decoder_pos_embed",
            build_sincos2d_pos_embed([self.grid, self.grid], dim=decoder_dim)[None],  # (1, L, D)
            persistent=False,
        )
        self.decoder_blocks = nn.Sequential(
            *[
                Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.pred_patch**2 * in_chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        # As MixMAE/Swin: trunc-normal(.02) linears with zero bias, LayerNorm (1, 0), mask token
        # .02.
        trunc_normal_(self.mask_token, std=0.02)
        for mod in [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]:
            for m in mod.modules():
                if isinstance(m, nn.Linear):
                    trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    # -- masks -------------------------------------------------------------------------------------

    def random_mask(
        self, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """One ``(g, g)`` bool mask for a batch, ``g = img_size / mask_unit`` (True = partner)."""
        return mixmae_mask(self.img_size, self.mask_unit, self.mask_ratio, generator, device)

    def stage_attn_masks(
        self, mask: Tensor, dtype: torch.dtype = torch.float32
    ) -> list[Tensor | None]:
        """Per-stage ``(num_windows, N, N)`` isolation masks for a ``(g, g)`` unit mask.

        ``None`` for a stage whose windows each lie inside one mask unit (unit side in tokens a
        multiple of the window, e.g. stage 0 at 32-px units and window 8): nothing to separate
        there, and unmasked attention can use the faster kernels.
        """
        out: list[Tensor | None] = []
        for i, (g, stage) in enumerate(zip(self.stage_grids, self.encoder.layers, strict=True)):
            ws = stage.blocks[0].window_size if len(stage.blocks) else (g, g)
            unit = self.mask_unit // self.encoder.reductions[i]  # mask unit side in tokens
            if unit % ws[0] == 0 and unit % ws[1] == 0:
                out.append(None)
            else:
                out.append(isolation_attn_mask(mask_to_grid(mask, g), ws, dtype))
        return out

    # -- named stages ------------------------------------------------------------------------------

    def forward_encoder_intermediates(self, x: Tensor, mask: Tensor) -> list[Tensor]:
        """Mixed embedding and every stage output, NHWC, before the final norm.

        Args:
            x: ``(B, C, H, W)`` normalised images.
            mask: ``(g, g)`` bool unit mask (one per batch).

        Returns:
            ``[embed (B, H/4, W/4, C0), stage0, ..., stage3 (B, H/32, W/32, C3)]``.
        """
        tok_mask = mask_to_grid(mask.to(x.device), self.stage_grids[0])[..., None]  # (G0, G0, 1)
        # patch embed -> mix (hook before the APE, as SimMIM's mask token) -> + sin-cos APE
        h = self.encoder.forward_embed(x, lambda t: mix_pairs(t, tok_mask))  # (B, G0, G0, C0)
        outs = [h]
        attn_masks = self.stage_attn_masks(mask.to(x.device), dtype=h.dtype)
        for stage, attn_mask in zip(self.encoder.layers, attn_masks, strict=True):
            h = stage.downsample(h)  # PatchMerging: 2x2 tokens of one mask unit -> one image
            for blk in stage.blocks:
                if self.grad_checkpointing and torch.is_grad_enabled():
                    h = checkpoint(window_attention_block, blk, h, attn_mask, use_reentrant=False)
                else:
                    h = window_attention_block(blk, h, attn_mask)
            outs.append(h)  # (B, G_i, G_i, C_i)
        return outs

    def forward_encoder(self, x: Tensor, mask: Tensor) -> Tensor:
        """``(B, C, H, W)`` images, ``(g, g)`` mask -> normed tokens ``z`` ``(B, L, C3)``."""
        h = self.forward_encoder_intermediates(x, mask)[-1]  # (B, H/32, W/32, C3)
        return self.encoder.norm(h).flatten(1, 2)  # (B, L, C3), row-major

    def forward_decoder(self, z: Tensor, mask: Tensor) -> Tensor:
        """Dual-branch decoding.

        Args:
            z: ``(B, L, C3)`` encoder tokens of the mixed batch.
            mask: ``(g, g)`` bool unit mask.

        Returns:
            ``(2B, L, pred_patch^2 * C)``: branch A (rows ``0..B-1``) then branch B, see
            :func:`training.mixing.dual_mask_fill`; :func:`training.mixing.unmix_reconstruction`
            turns it into per-image predictions.
        """
        m = mask_to_grid(mask.to(z.device), self.grid).flatten()  # (L,)
        h = self.decoder_embed(z)  # (B, L, D)
        h = dual_mask_fill(h, m, self.mask_token)  # (2B, L, D)
        h = h + self.decoder_pos_embed.to(h.dtype)
        h = self.decoder_blocks(h)
        h = self.decoder_norm(h)
        return self.decoder_pred(h)  # (2B, L, P)

    def targets(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, L, P)`` targets (per-patch normalised if ``norm_pix_loss``)."""
        t = patchify(x, self.pred_patch)
        return normalize_patches(t)[0] if self.norm_pix_loss else t

    def forward_loss(self, x: Tensor, pred: Tensor, weight: Tensor | None = None) -> Tensor:
        """``mean(W * (pred - t)^2)``.

        Args:
            x: ``(B, C, H, W)`` original (unmixed) normalised images.
            pred: ``(B, L, P)`` unmixed predictions.
            weight: SAR intensity weight broadcastable to ``x`` (from :meth:`sar_weight`, of the
                original images), or ``None`` (plain MixMAE).
        """
        w = None
        if weight is not None:
            w = patchify(torch.broadcast_to(weight.to(x.device), x.shape), self.pred_patch)
        return mixmae_loss(pred, self.targets(x), w)

    def forward(
        self, x: Tensor, weight: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One (SAR-W-)MixMAE step.

        Args:
            x: ``(B, C, H, W)`` normalised images (the encoder input), ``B`` even for full pairs.
            weight: SAR intensity weight of ``x`` (see :meth:`sar_weight`), broadcastable to
                ``x``; ``None`` = plain MixMAE.
            mask: ``(g, g)`` bool mask; ``None`` draws one with :meth:`random_mask`.

        Returns:
            ``(loss, pred, mask)``: scalar loss, ``(B, L, pred_patch^2 C)`` unmixed predictions
            (per-patch normalised units if ``norm_pix_loss``; :meth:`pred_to_images` maps them
            back) and the ``(g, g)`` mask used.
        """
        if mask is None:
            mask = self.random_mask(device=x.device)
        z = self.forward_encoder(x, mask)  # (B, L, C3)
        pred = unmix_reconstruction(
            self.forward_decoder(z, mask), mask_to_grid(mask, self.grid).flatten()
        )
        loss = self.forward_loss(x, pred, weight)
        return loss, pred, mask

    # -- helpers -----------------------------------------------------------------------------------

    def sar_weight(self, x_db_or_normalized: Tensor) -> Tensor:
        """SAR intensity weight with this model's ``weight_domain`` and ``weight_k``.

        Pass the un-normalised dB images for ``weight_domain="db"`` (the default), the z-scored
        encoder input for ``"normalized"`` (the authors' code). Compute it after geometric
        augmentation, for the original (unmixed) images.
        """
        return sar_intensity_weight(x_db_or_normalized, k=self.weight_k, domain=self.weight_domain)

    def pred_to_images(self, x: Tensor, pred: Tensor) -> Tensor:
        """``(B, L, P)`` predictions -> ``(B, C, H, W)`` in the units of ``x`` (undoes the
        per-patch normalisation with the statistics of ``x``'s patches, as MAE's visualisation)."""
        if self.norm_pix_loss:
            _, mean, std = normalize_patches(patchify(x, self.pred_patch))
            pred = pred * std + mean
        return unpatchify(pred, self.pred_patch, self.in_chans)

    def figure_pair(
        self, x: Tensor, pred: Tensor, mask: Tensor, i: int = 0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_pair, mixed, recon_pair)`` of pair ``(i, B-1-i)`` for
        :func:`training.mixing.plot_mixmae_reconstruction` (``(2, C, H, W)``, ``(C, H, W)``,
        ``(2, C, H, W)``, detached)."""
        j = x.shape[0] - 1 - i
        mixed = mix_pairs(x, mask_to_grid(mask.to(x.device), self.img_size))[i]
        recon = self.pred_to_images(x, pred)
        return x[[i, j]].detach(), mixed.detach(), recon[[i, j]].detach()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Mask token, (frozen) APE and relative position tables skip weight decay."""
        return {"mask_token"} | {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute encoder block activations in the backward pass to save memory."""
        self.grad_checkpointing = enable


def mixmae_base(**kwargs: Any) -> MixMAE:
    """SAR-W-MixMAE with the Swin-B encoder of :func:`training.models.swin.swin_base` (embed 128,
    depths 2/2/18/2, heads 4/8/16/32, window 8, patch 4, 256 px, 1 channel) and the MixMAE decoder
    (512 wide, 8 blocks, 16 heads). ``kwargs`` override any argument."""
    return MixMAE(
        **{**SWIN_BASE, "decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16, **kwargs}
    )


def mixmae_tiny(**kwargs: Any) -> MixMAE:
    """A tiny MixMAE for tests and CPU smoke runs: the encoder of
    :func:`training.models.swin.swin_tiny` (embed 32, depths 1/1/2/1, heads 1/2/4/8, window 8,
    patch 4, 256 px, 1 channel) and a small decoder (64 wide, 1 block, 2 heads)."""
    return MixMAE(
        **{**SWIN_TINY, "decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 2, **kwargs}
    )

"""SimMIM / SAR-W-SimMIM masked image model (Xie et al. 2022; SAR weighting per docs/design.md §4).

::

    x (B, C, H, W) --patch_embed--> tokens (B, H/4, W/4, C0)
        masked tokens := mask_token            (token mask from ``training.masking.simmim_mask``)
        + absolute position embedding
    --Swin stages + norm--> z (B, C3, H/32, W/32)
    --1x1 conv--> (B, 32^2 C, H/32, W/32) --PixelShuffle(32)--> x_rec (B, C, H, W)
    loss = sum(M w |x - x_rec|) / (sum(M) + 1e-5) / C      over masked pixels M, weight w (or 1)

The forward pass is split into named stages like facebookresearch/mae: ``forward_encoder``,
``forward_decoder``, ``forward_loss``. ``encoder.state_dict()`` is what fine-tuning loads; the mask
token and decoder stay here.
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from training.masking import mask_to_pixels
from training.models.swin import SwinEncoder
from training.reconstruction import LOSS_KINDS, masked_reconstruction_loss

__all__ = ["SimMIM"]


class SimMIM(nn.Module):
    """SimMIM with a Swin encoder and a linear (1x1 conv + PixelShuffle) decoder.

    Args:
        encoder: a :class:`SwinEncoder` (its patch size is the token size of the mask).
        encoder_stride: total stride of the encoder output, in pixels (32 for 4 stages, patch 4).
        in_chans: image channels to reconstruct (must match the encoder's input).
        loss: pixel error, ``"l1"`` (SimMIM), ``"mse"`` or ``"huber"``.
        huber_delta: Huber transition point (units of the normalised input).
    """

    def __init__(
        self,
        encoder: SwinEncoder,
        encoder_stride: int = 32,
        in_chans: int = 1,
        loss: Literal["l1", "mse", "huber"] = "l1",
        huber_delta: float = 1.0,
    ) -> None:
        super().__init__()
        if encoder.reductions[-1] != encoder_stride:
            raise ValueError(
                f"encoder_stride ({encoder_stride}) must equal the encoder's output stride "
                f"({encoder.reductions[-1]})"
            )
        if encoder.in_chans != in_chans:
            raise ValueError(f"in_chans ({in_chans}) != encoder.in_chans ({encoder.in_chans})")
        if loss not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {LOSS_KINDS}, got {loss!r}")
        self.encoder = encoder
        self.encoder_stride = encoder_stride
        self.in_chans = in_chans
        self.patch_size = encoder.patch_size
        self.loss_kind = loss
        self.huber_delta = huber_delta

        # (1, 1, 1, C0): broadcast over the NHWC token map.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, encoder.embed_dim))
        trunc_normal_(self.mask_token, mean=0.0, std=0.02)
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features[-1], encoder_stride**2 * in_chans, kernel_size=1),
            nn.PixelShuffle(encoder_stride),
        )

    def replace_masked_tokens(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Put the mask token at masked positions.

        Args:
            tokens: ``(B, Hp, Wp, C0)`` NHWC patch embeddings.
            mask: ``(B, Hp, Wp)`` token mask, bool or {0, 1}, 1 = masked.

        Returns:
            ``(B, Hp, Wp, C0)``: ``mask_token`` where masked, ``tokens`` elsewhere. Replacement is
            exact (``torch.where``), so masked pixels cannot leak into the encoder.
        """
        if tuple(mask.shape) != tuple(tokens.shape[:3]):
            raise ValueError(
                f"mask {tuple(mask.shape)} must match the token grid {tuple(tokens.shape[:3])}"
            )
        m = mask.to(device=tokens.device, dtype=torch.bool).unsqueeze(-1)  # (B, Hp, Wp, 1)
        return torch.where(m, self.mask_token.to(tokens.dtype), tokens)

    def forward_encoder(self, x: Tensor, mask: Tensor) -> Tensor:
        """Encode with masked tokens replaced.

        Args:
            x: ``(B, C, H, W)`` normalised image.
            mask: ``(B, H/p, W/p)`` token mask (p = encoder patch size).

        Returns:
            ``z``: ``(B, C3, H/32, W/32)`` NCHW normed final features.
        """
        return self.encoder.forward_features(x, lambda t: self.replace_masked_tokens(t, mask))

    def forward_decoder(self, z: Tensor) -> Tensor:
        """``(B, C3, H/32, W/32)`` -> reconstruction ``(B, C, H, W)``."""
        return self.decoder(z)

    def forward_loss(
        self, x: Tensor, x_rec: Tensor, mask_px: Tensor, weight: Tensor | None = None
    ) -> Tensor:
        """Scalar loss over masked pixels; see ``training.reconstruction``.

        Args:
            x: ``(B, C, H, W)`` target.
            x_rec: ``(B, C, H, W)`` reconstruction.
            mask_px: ``(B, 1, H, W)`` pixel mask.
            weight: SAR intensity weight broadcastable to ``x``, or ``None`` (plain SimMIM).
        """
        return masked_reconstruction_loss(
            x, x_rec, mask_px, weight, kind=self.loss_kind, huber_delta=self.huber_delta
        )

    def forward(
        self, x: Tensor, mask: Tensor, weight: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Full SimMIM step.

        Args:
            x: ``(B, C, H, W)`` normalised image.
            mask: ``(B, H/p, W/p)`` token mask.
            weight: ``(B, C, H, W)`` (or broadcastable) SAR intensity weight; ``None`` = 1.

        Returns:
            ``(loss, x_rec)``: scalar loss and ``(B, C, H, W)`` reconstruction.
        """
        z = self.forward_encoder(x, mask)  # (B, C3, H/32, W/32)
        x_rec = self.forward_decoder(z)  # (B, C, H, W)
        mask_px = mask_to_pixels(mask, self.patch_size)  # (B, 1, H, W)
        loss = self.forward_loss(x, x_rec, mask_px, weight)
        return loss, x_rec

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """As SimMIM: the mask token, the APE and relative position tables skip weight decay."""
        return {"mask_token"} | {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

"""Refined UPerNet segmenter on a Swin encoder (docs/design.md §4; arXiv 2601.15705 §II, Table I).

::

    x (B, Cin, H, W)
    --SwinEncoder.forward_intermediates(norm=True)-->
        embed (B, C0, H/4)  s0 (B, C0, H/4)  s1 (B, 2C0, H/8)  s2 (B, 4C0, H/16)  s3 (B, 8C0, H/32)
    --UPerHead--> (B, C, H/4)
        PPM(1, 2, 3, 6) on s3; FPN top-down over s0..s3; every level resized to H/4;
        [(i) + projected embed]; concat -> 3x3 ConvGNAct (the fusion)
    --(ii) RefineUp: [3x3 ConvGNAct -> x2 bilinear] x log2(patch)--> (B, C/4, H)   or nothing
    --Dropout2d -> 1x1 classifier--> logits (B, K, H, W)   (at H/4 + one x4 bilinear without (ii))

Our reading of the two architectural refinements (the paper gives no code and one sentence each):

(i) *High-resolution feature injection* ("we explicitly include the highest-resolution
    post-patch-embedding feature map in the multi-scale decoder, together with early Swin stage
    features"). The map is the stage-0 *input*: patch embedding + absolute position embedding,
    ``(B, C0, H/4, W/4)``, i.e. the features before any attention has mixed (and smoothed) them.
    UPerNet already has one H/4 level (stage 0 output), so the embed map is added as an extra
    H/4 input of the multi-scale *fusion*: LayerNorm -> 1x1 ConvGNAct projection -> concatenated
    with the four resized FPN levels before the fusion 3x3 conv (4C -> C becomes 4C + C_h -> C).
    It does not enter the top-down path (that would blend it with upsampled coarse semantics
    before the fusion conv could weigh it). Table I's "adjusted utilization of Swin features" is
    not specified; we follow the official Swin-UPerNet backbone and LayerNorm every stage output
    before the head (stages 0-2 with new norms, stage 3 with the encoder's pretrained final norm,
    which also keeps ``encoder.norm`` in the graph for DDP).

(ii) *Progressive refine-up head* ("staged upsampling with intermediate convolutional refinement
    instead of a single large interpolation"). From the fused H/4 map, repeat
    [3x3 ConvGNAct refinement -> x2 bilinear upsample] until full resolution (twice for patch 4),
    then Dropout2d + the 1x1 classifier at full resolution. Channels halve at each step
    (C -> C/2 -> C/4 by default) to keep full-resolution activations affordable at batch 64.
    Without (ii) the classifier runs at H/4 and its logits are interpolated x4 (standard UPerNet).
    Note that a 1x1 classifier commutes with bilinear upsampling, so the last learned spatial
    refinement happens at H/2; a conv at full resolution would cost about 4x the head's FLOPs.

Conv blocks are Conv(bias=False) -> GroupNorm -> GELU (docs/design.md §4), not BatchNorm: GN is
independent of the per-GPU batch and of the 1x1 PPM bins.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from training.models.pretrained import load_encoder_weights
from training.models.swin import SwinEncoder, swin_base, swin_tiny

__all__ = [
    "PPM",
    "ConvGNAct",
    "RefineUp",
    "UPerHead",
    "UPerNetSegmenter",
    "build_segmenter",
]


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of an NCHW map to ``size`` (align_corners=False, as mmseg's ``resize``)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvGNAct(nn.Sequential):
    """Conv2d (no bias) -> GroupNorm -> GELU; ``(B, in, H, W) -> (B, out, H/stride, W/stride)``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel side; padding keeps the size ("same").
        gn_groups: wanted GroupNorm groups; the largest divisor of ``out_channels`` not above it is
            used (``gcd``), so narrow test heads still build.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, gn_groups: int = 32
    ) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.GroupNorm(math.gcd(gn_groups, out_channels), out_channels),
            nn.GELU(),
        )
        self.out_channels = out_channels


class PPM(nn.Module):
    """Pyramid pooling (PSPNet) on the last stage: ``(B, Cin, h, w) -> (B, Cin + n*C, h, w)``.

    Each branch: adaptive average pool to ``s x s`` -> 1x1 ConvGNAct -> bilinear back to ``h x w``;
    the input is concatenated first (as mmseg's UPerHead).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        gn_groups: int = 32,
    ) -> None:
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvGNAct(in_channels, channels, 1, gn_groups))
            for s in self.pool_scales
        )
        self.out_channels = in_channels + len(self.pool_scales) * channels

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        outs = [x] + [_resize(branch(x), size) for branch in self.branches]  # each (B, *, h, w)
        return torch.cat(outs, dim=1)


class UPerHead(nn.Module):
    """UPerNet decoder (PPM + FPN, fused at the highest stage resolution) with optional injection
    of the post-patch-embedding map (refinement (i), see the module docstring).

    Args:
        in_channels: channels of the four stage outputs, ``[C0, 2C0, 4C0, 8C0]``.
        channels: decoder width ``C``.
        embed_channels: channels of the post-embedding map (``C0``); required when
            ``hires_injection``.
        hires_injection: concatenate the projected embed map into the fusion.
        hires_channels: width of the embed projection (default ``channels``).
        pool_scales: PPM bins.
        gn_groups: GroupNorm groups.
        norm_stages: LayerNorm stages ``0 .. n-2`` here (the last one is expected normed by the
            encoder's final norm).

    Input: ``[embed, s0, s1, s2, s3]`` NCHW (``SwinEncoder.forward_intermediates(norm=True)``).
    Output: ``(B, channels, H0, W0)`` at the resolution of ``s0`` (H/4).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        embed_channels: int | None = None,
        hires_injection: bool = True,
        hires_channels: int | None = None,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        gn_groups: int = 32,
        norm_stages: bool = True,
    ) -> None:
        super().__init__()
        in_channels = list(in_channels)
        if len(in_channels) < 2:
            raise ValueError(f"UPerHead needs at least two stages, got {in_channels}")
        self.in_channels = in_channels
        self.channels = channels
        self.hires_injection = hires_injection
        n = len(in_channels)

        # Per-stage output norms of the official Swin segmentation backbone (norm0..norm{n-2});
        # the last stage uses the encoder's own final norm.
        self.stage_norms = nn.ModuleList(
            LayerNorm2d(c) if norm_stages else nn.Identity() for c in in_channels[:-1]
        )
        self.ppm = PPM(in_channels[-1], channels, pool_scales, gn_groups)
        self.ppm_bottleneck = ConvGNAct(self.ppm.out_channels, channels, 3, gn_groups)
        self.lateral_convs = nn.ModuleList(
            ConvGNAct(c, channels, 1, gn_groups) for c in in_channels[:-1]
        )
        self.fpn_convs = nn.ModuleList(
            ConvGNAct(channels, channels, 3, gn_groups) for _ in in_channels[:-1]
        )

        fuse_in = n * channels
        if hires_injection:
            if embed_channels is None:
                raise ValueError("hires_injection needs embed_channels (the encoder's C0)")
            hires_channels = hires_channels or channels
            # (B, C0, H/4) -> (B, Ch, H/4): the embed map has no LayerNorm after the APE add.
            self.hires_proj: nn.Sequential | None = nn.Sequential(
                LayerNorm2d(embed_channels),
                ConvGNAct(embed_channels, hires_channels, 1, gn_groups),
            )
            fuse_in += hires_channels
        else:
            self.hires_proj = None
        self.fusion = ConvGNAct(fuse_in, channels, 3, gn_groups)
        self.out_channels = channels

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """``[embed, s0, ..., s_{n-1}]`` -> ``(B, channels, H/4, W/4)``."""
        n = len(self.in_channels)
        if len(feats) != n + 1:
            raise ValueError(f"expected [embed] + {n} stage maps, got {len(feats)} tensors")
        embed, stages = feats[0], list(feats[1:])
        stages = [norm(s) for norm, s in zip(self.stage_norms, stages[:-1], strict=True)] + [
            stages[-1]
        ]

        # Laterals (B, C, H/4 .. H/16) and the PPM output (B, C, H/32).
        laterals = [conv(s) for conv, s in zip(self.lateral_convs, stages[:-1], strict=True)]
        laterals.append(self.ppm_bottleneck(self.ppm(stages[-1])))
        for i in range(n - 1, 0, -1):  # top-down: add the coarser level, upsampled
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1], strict=True)]
        outs.append(laterals[-1])

        size = outs[0].shape[-2:]  # H/4
        fused = [_resize(o, size) for o in outs]  # n x (B, C, H/4, W/4)
        if self.hires_proj is not None:
            fused.append(_resize(self.hires_proj(embed), size))  # (B, Ch, H/4, W/4)
        return self.fusion(torch.cat(fused, dim=1))  # (B, C, H/4, W/4)


class RefineUp(nn.Module):
    """Progressive refine-up (refinement (ii)): ``steps`` x [3x3 ConvGNAct -> x2 bilinear].

    ``(B, in_channels, h, w) -> (B, channels[-1], h * 2^steps, w * 2^steps)``.

    Args:
        in_channels: channels of the fused decoder map.
        channels: output width of each step (its length is the number of x2 steps).
        gn_groups: GroupNorm groups.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], gn_groups: int = 32) -> None:
        super().__init__()
        widths = [in_channels, *channels]
        self.steps = nn.ModuleList(
            ConvGNAct(cin, cout, 3, gn_groups) for cin, cout in itertools.pairwise(widths)
        )
        self.out_channels = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        for step in self.steps:
            x = step(x)  # refine at the current resolution
            h, w = x.shape[-2:]
            x = _resize(x, (2 * h, 2 * w))  # then x2
        return x


class UPerNetSegmenter(nn.Module):
    """Swin encoder + (refined) UPerNet head -> per-pixel logits at input resolution.

    Args:
        encoder: a :class:`SwinEncoder` (random or pretrained; see :func:`build_segmenter`).
        num_classes: output channels (9 LULC classes; 1 for water detection).
        channels: decoder width ``C`` (512 in mmseg's UPerNet for Swin).
        hires_injection: refinement (i), the post-patch-embedding map in the fusion.
        refine_up: refinement (ii), progressive refine-up head instead of one x4 interpolation.
        dropout: Dropout2d before the classifier.
        refine_channels: widths of the refine-up steps (default ``C/2, C/4, ...``, one per x2 step,
            ``log2(patch_size)`` steps).
        hires_channels: width of the embed projection (default ``C``).
        pool_scales: PPM bins.
        gn_groups: GroupNorm groups.

    ``forward(x)``: ``(B, in_chans, img, img) -> (B, num_classes, img, img)`` logits.
    """

    def __init__(
        self,
        encoder: SwinEncoder,
        num_classes: int = 9,
        channels: int = 512,
        hires_injection: bool = True,
        refine_up: bool = True,
        dropout: float = 0.1,
        refine_channels: Sequence[int] | None = None,
        hires_channels: int | None = None,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        gn_groups: int = 32,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        stride0 = encoder.reductions[0]  # H/4 for patch 4
        n_up = int(math.log2(stride0))
        if 2**n_up != stride0:
            raise ValueError(f"refine-up needs a power-of-two patch size, got {stride0}")
        self.encoder = encoder
        self.num_classes = num_classes
        self.hires_injection = hires_injection
        self.refine_up = refine_up

        self.decode_head = UPerHead(
            encoder.num_features,
            channels,
            embed_channels=encoder.embed_dim,
            hires_injection=hires_injection,
            hires_channels=hires_channels,
            pool_scales=pool_scales,
            gn_groups=gn_groups,
        )
        if refine_up:
            if refine_channels is None:
                refine_channels = [max(channels // 2 ** (i + 1), 1) for i in range(n_up)]
            if len(refine_channels) != n_up:
                raise ValueError(
                    f"refine_channels needs {n_up} widths (x2 steps from stride {stride0}), "
                    f"got {list(refine_channels)}"
                )
            self.refine: RefineUp | None = RefineUp(channels, refine_channels, gn_groups)
            cls_in = self.refine.out_channels
        else:
            self.refine = None
            cls_in = channels
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(cls_in, num_classes, kernel_size=1)
        self._init_decoder()

    def _init_decoder(self) -> None:
        # mmseg's ConvModule/conv_seg init; the encoder keeps its own (timm or pretrained) weights.
        for part in (self.decode_head, self.refine):
            if part is None:
                continue
            for m in part.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)  # type: ignore[arg-type]  # Conv2d(bias=True)

    def forward_decoder(self, feats: Sequence[Tensor]) -> Tensor:
        """Encoder maps ``[embed, s0..s3]`` -> logits at H (refine-up) or H/4 (baseline)."""
        x = self.decode_head(feats)  # (B, C, H/4, W/4)
        if self.refine is not None:
            x = self.refine(x)  # (B, C/4, H, W)
        return self.classifier(self.dropout(x))  # (B, K, H or H/4, W or W/4)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_chans, H, W)`` -> logits ``(B, num_classes, H, W)``."""
        feats = self.encoder.forward_intermediates(x, norm=True)  # [embed, s0, s1, s2, s3]
        logits = self.forward_decoder(feats)
        return _resize(logits, x.shape[-2:])  # x4 bilinear without refine-up; no-op with it

    def no_weight_decay(self) -> set[str]:
        """Encoder names that skip weight decay (APE, relative position tables), prefixed."""
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}


_ENCODERS = {"tiny": swin_tiny, "base": swin_base}
_DEFAULT_CHANNELS = {"tiny": 64, "base": 512}


def build_segmenter(
    encoder_name: str = "base",
    num_classes: int = 9,
    hires_injection: bool = True,
    refine_up: bool = True,
    drop_path_rate: float = 0.1,
    pretrained: str | None = None,
    channels: int | None = None,
    dropout: float = 0.1,
    **encoder_kwargs: Any,
) -> UPerNetSegmenter:
    """Build a (refined) UPerNet segmenter, optionally on pretrained encoder weights.

    Args:
        encoder_name: ``"base"`` (Swin-B, the paper) or ``"tiny"`` (tests, CPU smoke runs).
        num_classes: 9 for LULC, 1 for water detection.
        hires_injection: refinement (i).
        refine_up: refinement (ii).
        drop_path_rate: encoder stochastic depth (0.1 for fine-tuning).
        pretrained: path of an exported encoder state dict or a pretraining checkpoint (see
            :func:`training.models.pretrained.load_encoder_weights`); ``None`` = random init
            (the "scratch" baseline).
        channels: decoder width (default 512 for base, 64 for tiny).
        dropout: Dropout2d before the classifier.
        **encoder_kwargs: passed to the encoder factory (e.g. ``img_size=128``, ``in_chans``).

    Returns:
        The segmenter; with ``pretrained`` every encoder tensor is loaded or an
        :class:`~training.models.pretrained.EncoderWeightsError` is raised.
    """
    if encoder_name not in _ENCODERS:
        raise ValueError(f"encoder_name must be one of {sorted(_ENCODERS)}, got {encoder_name!r}")
    encoder = _ENCODERS[encoder_name](drop_path_rate=drop_path_rate, **encoder_kwargs)
    if pretrained is not None:
        load_encoder_weights(encoder, pretrained)
    return UPerNetSegmenter(
        encoder,
        num_classes=num_classes,
        channels=channels or _DEFAULT_CHANNELS[encoder_name],
        hires_injection=hires_injection,
        refine_up=refine_up,
        dropout=dropout,
    )

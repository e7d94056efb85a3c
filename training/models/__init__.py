"""Models: the Swin encoder (timm-based), the masked-image pretraining wrappers, the segmenter."""

from training.models.pretrained import EncoderWeightsError, load_encoder_weights
from training.models.simmim import SimMIM
from training.models.swin import SwinEncoder, swin_base, swin_tiny
from training.models.upernet import UPerNetSegmenter, build_segmenter

__all__ = [
    "EncoderWeightsError",
    "SimMIM",
    "SwinEncoder",
    "UPerNetSegmenter",
    "build_segmenter",
    "load_encoder_weights",
    "swin_base",
    "swin_tiny",
]

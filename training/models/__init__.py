"""Models: the Swin encoder (timm-based) and the masked-image pretraining wrappers."""

from training.models.simmim import SimMIM
from training.models.swin import SwinEncoder, swin_base, swin_tiny

__all__ = ["SimMIM", "SwinEncoder", "swin_base", "swin_tiny"]

"""The names this module held before the W8A8 flow moved to `quamba_fx.flows` (with fuse and lower):
kept so that existing imports keep working. New code imports from `quamba_fx.flows`."""

from .flows import float_passes, quantization_passes, quantize

__all__ = ["float_passes", "quantization_passes", "quantize"]

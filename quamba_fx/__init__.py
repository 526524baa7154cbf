"""quamba-fx: capture, verify and quantize Hugging Face Mamba models as torch.fx graphs."""

from .calibrate import Calibration, CalibrationError, calibrate
from .capture import MambaGraphModule, annotate_shapes, capture
from .checkpoint import from_pretrained, save_pretrained
from .errors import (
    CheckpointError,
    InputError,
    MetaDeviceError,
    MissingDependencyError,
    PassError,
    QuambaError,
    TopologyError,
    UnsupportedModelError,
)
from .dump import dump, write_dump
from .models import BUILTIN_SHAPES, builtin_config, load_model, random_model
from .passes.fuse_conv import FuseConv1dSiLU, fuse
from .passes.lower import LowerToKernels, lower
from .passes.verify import VerifyTopology, verify_topology
from .evaluate import EvalResult, evaluate
from .pipeline import Pipeline
from .runtime import Generator, MambaCache
from .w8a8 import quantize
from . import backend as _backend  # registers torch.compile backend "quamba"

__version__ = "0.1.0"

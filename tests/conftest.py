"""Shared fixtures: small real-architecture Mamba models with seeded random weights."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings
from transformers import MambaConfig, MambaForCausalLM, MambaModel

# A fresh Inductor cache per run: its keys do not cover our custom ops' fake kernels, so a cache
# left by an older checkout could replay graphs compiled against older output layouts.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="quamba-inductor-"))

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture(autouse=True, scope="session")
def every_kernel_launch_spells_out_fp_fusion():
    """Under the interpreter, every launch of a quamba_fx kernel in any test must pass
    `enable_fp_fusion` (kernels.dispatch.fp_fusion): Triton 3.10 turns the compile default off,
    which would silently slow and re-round the kernels that leave it unset."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        module = getattr(self.fn, "__module__", "") or ""
        if module.startswith("quamba_fx.") and "enable_fp_fusion" not in kwargs:
            raise AssertionError(f"{module}.{self.fn.__name__} was launched without enable_fp_fusion "
                                 "(pass **dispatch.fp_fusion() or pdl.launch_options)")
        return original(self, *args, **kwargs)

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


def tiny_config(**overrides) -> MambaConfig:
    fields = dict(
        vocab_size=97, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
        use_cache=False,
        # Explicit: transformers 5.0's MambaConfig has no such default and leaves lm_head untied,
        # later 5.x tie it; the tiny models must be the same model on every version we support.
        tie_word_embeddings=True,
    )
    fields.update(overrides)
    return MambaConfig(**fields)


def make_model(config: MambaConfig, seed: int = 0, head: bool = True):
    torch.manual_seed(seed)
    model = (MambaForCausalLM if head else MambaModel)(config)
    # HF initialises dt_proj/A/D identically in every block; perturb so blocks really differ.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model():
    return make_model(tiny_config())

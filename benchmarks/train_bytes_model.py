"""Train a small byte-level Mamba-1 (`transformers.MambaForCausalLM`, vocab 256) or, with `--arch
mamba2`, Mamba-2 (`Mamba2ForCausalLM`) on WikiText-2.

Trains on valid.txt for a fixed wall-clock budget, checks the weights against Hugging Face's own
forward, saves them in fp16 with `save_pretrained` (atomically) and reports bits per byte on
test.txt, measured with the Hugging Face model in fp32 from the saved (fp16-rounded) weights. A
`training.json` beside the weights records the run.

HF's torch fallback runs the selective scan as a Python loop over every position, far too slow to
train with, so training uses `parallel_forward`: the same parameters, the same numerics, but a
chunked scan. Before training (and after) its logits are compared with `model(ids).logits`; the
run aborts if they differ. Mamba-2 trains through the same walk over HF's modules with
`quamba_fx.ssd_reference.ssd_scan_reference` (the chunked SSD form, plain differentiable torch).

Run from the repository root (so `quamba_fx` imports without installing):

    python -m benchmarks.train_bytes_model --device cuda --minutes 4
    python -m benchmarks.train_bytes_model --arch mamba2 --device cuda --minutes 4 \
        --out quamba_fx/models_data/mamba2-bytes-wt2

On one H100 (torch 2.11) training runs at ~180k bytes/s (batch 32 x 512); with the checks, the
test evaluation and saving, a 4-minute run takes about 4.5 minutes of wall clock.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from quamba_fx.evaluate import evaluate
from quamba_fx.ssd_reference import ssd_scan_reference
from quamba_fx.textdata import (
    VOCAB_SIZE,
    chunk_sequences,
    find_wikitext,
    load_bytes,
    next_byte_loss,
    random_batches,
)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "quamba_fx" / "models_data" / "mamba-bytes-wt2"
RUN_JSON = "training.json"
# Logits are compared relative to their own scale, so the bound holds for trained and fresh weights.
HF_CHECK_TOLERANCE = 1e-3
# Enough held-out bytes for a steady early-stopping signal, few enough to cost well under 1% of a run.
MAX_DEV_WINDOWS = 128


@dataclass
class ModelShape:
    """The architecture knobs of the byte model; the rest of the config keeps HF's defaults.
    `head_dim` and `n_groups` are Mamba-2's (its heads: expand * hidden / head_dim)."""

    num_hidden_layers: int = 4
    hidden_size: int = 256
    state_size: int = 16
    expand: int = 2
    conv_kernel: int = 4
    arch: str = "mamba1"
    head_dim: int = 64
    n_groups: int = 1


@dataclass
class TrainSettings:
    """Everything a run depends on; written to training.json as given."""

    shape: ModelShape = field(default_factory=ModelShape)
    minutes: float = 4.0
    max_steps: int | None = None
    batch: int = 32
    seq_len: int = 512
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dropout: float = 0.25  # 1 MB of text: without it the model memorises valid.txt within a minute
    dev_fraction: float = 0.05  # tail of the training text held out for early stopping
    eval_every: int = 100
    chunk_len: int = 64
    log_every: int = 50
    eval_seq_len: int = 512
    eval_windows: int | None = None  # None: every non-overlapping window of test.txt
    eval_batch: int = 32
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    out: Path = DEFAULT_OUT
    train_file: Path | None = None  # None: WikiText-2 valid.txt via find_wikitext
    test_file: Path | None = None  # None: WikiText-2 test.txt


def byte_model_config(shape: ModelShape, chunk_len: int = 64) -> MambaConfig | Mamba2Config:
    """The config of a byte-level model: vocab 256, tied embeddings, byte 0 as pad/bos/eos.
    A Mamba-2 config keeps `chunk_len` as its scan's chunk size."""
    common = dict(
        vocab_size=VOCAB_SIZE, hidden_size=shape.hidden_size, num_hidden_layers=shape.num_hidden_layers,
        state_size=shape.state_size, expand=shape.expand, conv_kernel=shape.conv_kernel, tie_word_embeddings=True,
        residual_in_fp32=True, pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )
    if shape.arch == "mamba2":
        return Mamba2Config(num_heads=shape.expand * shape.hidden_size // shape.head_dim, head_dim=shape.head_dim,
                            n_groups=shape.n_groups, chunk_size=chunk_len, **common)
    if shape.arch != "mamba1":
        raise ValueError(f"--arch must be mamba1 or mamba2, got {shape.arch!r}")
    return MambaConfig(**common)


ByteModel = MambaForCausalLM | Mamba2ForCausalLM


def model_class(shape: ModelShape) -> type:
    return Mamba2ForCausalLM if shape.arch == "mamba2" else MambaForCausalLM


# --------------------------------------------------------------------------------------------
# The parallel forward
# --------------------------------------------------------------------------------------------


def chunked_selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_len: int = 64,
) -> torch.Tensor:
    """y_t = C_t . h_t with h_t = exp(dt_t A) * h_{t-1} + dt_t B_t x_t, h_{-1} = 0, in fp32.

    Shapes: x, dt [b, L, D]; A [D, N] (negative); B, C [b, L, N]; returns y [b, L, D] (no D skip,
    no gate). The sequence is cut into chunks of `chunk_len`, all handled at once:

    1. inside each chunk, the states as if the chunk started from zero: a short recurrence over
       `chunk_len` steps, every chunk and batch row in parallel;
    2. the state entering each chunk: a recurrence over the chunks, carried with the chunk's total
       decay exp(sum dt A);
    3. h_t = local_t + exp(S_t) * entering state, with S_t the cumulative sum of dt A from the chunk
       start to t (in log space; S_t <= 0, so exp never overflows and underflow is just full decay).

    Why not Mamba-2's all-pairs "segment sum" exp(S_t - S_s) inside a chunk: Mamba-1's decay depends
    on (channel, state), so that matrix is [b, D, N, T, T], chunk_len times the size of all the
    states; here step 1 costs chunk_len Python steps instead, with memory of a few state-sized tensors.
    The factored form exp(S_t) * cumsum(exp(-S_s) u_s) would be fully parallel but overflows once a
    chunk decays by more than ~e^88, which trained dt and A easily reach.
    """
    batch, length, channels = x.shape
    n_chunks = math.ceil(length / chunk_len)
    pad = n_chunks * chunk_len - length
    x, dt, B, C = (_chunk_time_major(t.float(), chunk_len, n_chunks, pad) for t in (x, dt, B, C))
    # Time-major [T, b, chunks, ...] so each recurrence step reads one contiguous slice. Padded
    # steps have dt = 0: no decay, no input, so they leave the states alone and are cut off below.
    log_decay = dt[..., None] * A.float()  # [T, b, c, D, N]
    inputs = (dt * x)[..., None] * B[..., None, :]  # [T, b, c, D, N]

    local = _recurrence(torch.exp(log_decay), inputs)
    cum_log_decay = torch.cumsum(log_decay, dim=0)
    entering = _carry_across_chunks(torch.exp(cum_log_decay[-1]), local[-1])  # [b, c, D, N]
    states = local + torch.exp(cum_log_decay) * entering

    # y = sum_n h[..., n] C[..., n] as a batched mat-vec, without materialising h * C.
    y = torch.matmul(states, C[..., None]).squeeze(-1)  # [T, b, c, D]
    y = y.permute(1, 2, 0, 3).reshape(batch, n_chunks * chunk_len, channels)
    return y[:, :length]


def _chunk_time_major(t: torch.Tensor, chunk_len: int, n_chunks: int, pad: int) -> torch.Tensor:
    """[b, L, F] -> [T, b, chunks, F], zero-padded at the end of the sequence."""
    t = F.pad(t, (0, 0, 0, pad))
    return t.reshape(t.shape[0], n_chunks, chunk_len, t.shape[-1]).permute(2, 0, 1, 3)


def _recurrence(decay: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """h_t = decay_t * h_{t-1} + inputs_t along dim 0, from h_{-1} = 0."""
    # unbind, not decay[step]: the backward of each indexing op would build a zero tensor of the
    # full size, one per step, which made the scan's backward quadratic in chunk_len.
    decay_steps, input_steps = decay.unbind(0), inputs.unbind(0)
    state = input_steps[0]
    states = [state]
    for step in range(1, len(input_steps)):
        state = decay_steps[step] * state + input_steps[step]
        states.append(state)
    return torch.stack(states)


def _carry_across_chunks(chunk_decay: torch.Tensor, chunk_final_local: torch.Tensor) -> torch.Tensor:
    """The true state entering each chunk ([b, chunks, ...]): zero for the first chunk."""
    decays, finals = chunk_decay.unbind(1), chunk_final_local.unbind(1)
    entering = [torch.zeros_like(finals[0])]
    for c in range(1, len(finals)):
        entering.append(decays[c - 1] * entering[-1] + finals[c - 1])
    return torch.stack(entering, dim=1)


def mixer_forward(mixer: torch.nn.Module, hidden: torch.Tensor, chunk_len: int = 64) -> torch.Tensor:
    """HF `MambaMixer.forward` (no cache, no mask) with the scan done by `chunked_selective_scan`."""
    length = hidden.shape[1]
    xz = mixer.in_proj(hidden).transpose(1, 2)  # [b, 2D, L]
    x, z = xz.chunk(2, dim=1)
    x = F.silu(mixer.conv1d(x)[..., :length])  # conv1d pads both sides; keep the causal part
    x = x.transpose(1, 2)  # [b, L, D]
    dt, B, C = torch.split(
        mixer.x_proj(x), [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1
    )
    # dt_proj's bias is added before softplus, as HF's delta_bias is; softplus in fp32 like the kernel.
    dt = F.softplus(mixer.dt_proj(dt).float())
    A = -torch.exp(mixer.A_log.float())
    y = chunked_selective_scan(x, dt, A, B, C, chunk_len)
    y = y + x.float() * mixer.D.float()
    y = y * F.silu(z.transpose(1, 2).float())
    return mixer.out_proj(y.to(hidden.dtype))


def mamba2_mixer_forward(mixer: torch.nn.Module, hidden: torch.Tensor, chunk_len: int = 64) -> torch.Tensor:
    """HF `Mamba2Mixer.forward` (no cache, no mask) with the SSD scan of `quamba_fx.ssd_reference`."""
    length = hidden.shape[1]
    d_inner, heads = mixer.intermediate_size, mixer.num_heads
    groups_state = mixer.n_groups * mixer.ssm_state_size
    z, xbc, dt = torch.split(mixer.in_proj(hidden), [d_inner, mixer.conv_dim, heads], dim=-1)
    xbc = F.silu(mixer.conv1d(xbc.transpose(1, 2))[..., :length]).transpose(1, 2)
    x, B, C = torch.split(xbc, [d_inner, groups_state, groups_state], dim=-1)
    low, high = (float(v) for v in mixer.time_step_limit)
    y, _ = ssd_scan_reference(
        x.unflatten(-1, (heads, mixer.head_dim)), dt, -torch.exp(mixer.A_log.float()),
        B.unflatten(-1, (mixer.n_groups, mixer.ssm_state_size)), C.unflatten(-1, (mixer.n_groups, mixer.ssm_state_size)),
        mixer.D, mixer.dt_bias, True, low, high, chunk_len,
    )
    return mixer.out_proj(mixer.norm(y.flatten(-2), z).to(hidden.dtype))


def parallel_forward(
    model: ByteModel, input_ids: torch.Tensor, chunk_len: int = 64, dropout: float = 0.0
) -> torch.Tensor:
    """Logits [b, L, vocab] (fp32) of `model` for `input_ids`, equal to `model(input_ids).logits`.

    Walks HF's own modules (backbone.embeddings, layers[i].norm / .mixer, norm_f, lm_head), so it
    trains the very parameters that `save_pretrained` writes; only the scan differs. `dropout`
    (on the embeddings and on each mixer's output, in training mode only) regularises training;
    HF's model has no dropout, and in eval mode this is exactly its forward.
    """
    backbone = model.backbone
    drop = dropout if model.training else 0.0
    hidden = F.dropout(backbone.embeddings(input_ids), drop)
    mixer_fn = mamba2_mixer_forward if isinstance(model, Mamba2ForCausalLM) else mixer_forward
    for block in backbone.layers:
        residual = hidden.float() if block.residual_in_fp32 else hidden
        normed = block.norm(hidden.to(block.norm.weight.dtype))
        hidden = residual + F.dropout(mixer_fn(block.mixer, normed, chunk_len), drop)
    hidden = backbone.norm_f(hidden)
    return model.lm_head(hidden.to(model.lm_head.weight.dtype)).float()


@torch.no_grad()
def check_against_hf(
    model: ByteModel,
    chunk_len: int,
    seq_len: int = 100,
    batch: int = 2,
    seed: int = 0,
    tolerance: float = HF_CHECK_TOLERANCE,
) -> float:
    """Compare `parallel_forward` with HF's forward on random bytes; raise if they differ.

    `model` should be in fp32. The default seq_len is deliberately not a multiple of typical chunk
    lengths. Returns the max absolute difference divided by the logit scale (max |logit|, >= 1).
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=generator).to(device)
    was_training = model.training
    model.eval()
    try:
        with full_fp32_matmul():
            expected = model(ids, use_cache=False).logits.float()
            actual = parallel_forward(model, ids, chunk_len)
    finally:
        model.train(was_training)
    scale = max(1.0, expected.abs().max().item())
    error = (actual - expected).abs().max().item() / scale
    if not math.isfinite(error) or error >= tolerance:
        raise RuntimeError(
            f"parallel forward disagrees with Hugging Face's {type(model).__name__}: max |diff| / scale = "
            f"{error:.3g} (tolerance {tolerance}); refusing to train a model whose saved weights would "
            f"mean something else to HF"
        )
    return error


@contextlib.contextmanager
def full_fp32_matmul() -> Iterator[None]:
    """TF32 off for matmuls and convolutions inside the block: with it, an fp32 comparison or
    evaluation on CUDA would carry ~1e-3 relative error of its own."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices only.

    Norm gains, biases, D and A_log are left undecayed: decaying A_log would pull every state's
    decay rate towards 1 for no reason (as mamba_ssm's own training does).
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain_weight = param.dim() >= 2 and not name.endswith("A_log")
        (decay if plain_weight else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = settings.device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), fused=fused)


def learning_rate(step: int, progress: float, settings: TrainSettings) -> float:
    """Linear warmup over `warmup_steps`, then cosine from lr down to lr * min_lr_ratio.

    `progress` in [0, 1] is the fraction of the budget spent (time, or steps when capped), so the
    cosine ends when the clock does, however fast the device turns out to be.
    """
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    floor = settings.lr * settings.min_lr_ratio
    return floor + 0.5 * (settings.lr - floor) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _progress(step: int, elapsed: float, settings: TrainSettings) -> float:
    by_time = elapsed / (settings.minutes * 60.0)
    by_steps = step / settings.max_steps if settings.max_steps else 0.0
    return max(by_time, by_steps)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def split_dev(ids: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, dev): the last `fraction` of the text is held out, as one contiguous piece so no
    training window overlaps it."""
    n_dev = int(ids.numel() * fraction)
    return ids[: ids.numel() - n_dev], ids[ids.numel() - n_dev :]


def dev_bits_per_byte(model: ByteModel, dev_windows: torch.Tensor, settings: TrainSettings) -> float:
    """Bits per byte of the parallel forward on the held-out windows (eval mode, same autocast)."""
    model.eval()
    try:
        with _autocast(settings.device):
            return evaluate(
                lambda ids: parallel_forward(model, ids, settings.chunk_len), dev_windows,
                batch_size=settings.eval_batch, progress=False,
            ).bits_per_byte
    finally:
        model.train()


def _autocast(device: str) -> torch.autocast:
    # bf16 on CUDA only: CPU runs are smoke tests, where fp32 is fast enough and simpler to trust.
    on_cuda = device.startswith("cuda")
    return torch.autocast(device_type="cuda" if on_cuda else "cpu", dtype=torch.bfloat16, enabled=on_cuda)


class _BestWeights:
    """Early stopping without stopping: remembers the weights with the lowest dev loss so far."""

    def __init__(self) -> None:
        self.bpb, self.step, self.state = float("inf"), 0, None

    def offer(self, model: torch.nn.Module, bpb: float, step: int) -> None:
        if bpb < self.bpb:
            self.bpb, self.step = bpb, step
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore(self, model: torch.nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


def train_model(
    model: ByteModel,
    train_ids: torch.Tensor,
    settings: TrainSettings,
    dev_windows: torch.Tensor | None = None,
) -> dict:
    """Train `model` in place until the time (or step) budget runs out; returns the run's numbers.

    With `dev_windows`, the dev loss is measured every `eval_every` steps and at the end, and the
    model is left holding the best weights seen: a megabyte of text is memorised long before a
    few minutes of H100 time run out, so the last weights are rarely the best.
    """
    device = settings.device
    optimizer = make_optimizer(model, settings)
    generator = torch.Generator().manual_seed(settings.seed)
    batches = random_batches(train_ids, settings.batch, settings.seq_len, generator)
    best = _BestWeights()
    model.train()

    step, window_loss, window_steps, last_loss = 0, 0.0, 0, float("nan")
    _sync(device)
    start = time.perf_counter()
    while (progress := _progress(step, time.perf_counter() - start, settings)) < 1.0:
        lr = learning_rate(step, progress, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = next(batches)
        with _autocast(device):
            logits = parallel_forward(model, ids, settings.chunk_len, settings.dropout)
        loss = next_byte_loss(logits, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        step += 1
        # .item() syncs the device; only pay for it at log time.
        window_loss, window_steps = window_loss + loss.detach(), window_steps + 1
        if step % settings.log_every == 0:
            last_loss = (window_loss / window_steps).item()
            _log_step(step, last_loss, lr, time.perf_counter() - start, settings)
            window_loss, window_steps = 0.0, 0
        if dev_windows is not None and step % settings.eval_every == 0:
            _offer_dev(model, dev_windows, step, best, settings)
    if window_steps:
        last_loss = (window_loss / window_steps).item()
    if dev_windows is not None and best.step != step:
        _offer_dev(model, dev_windows, step, best, settings)
    _sync(device)
    seconds = time.perf_counter() - start
    if not math.isfinite(last_loss):
        raise RuntimeError(f"training diverged: final loss {last_loss}")
    best.restore(model)
    return {
        "steps": step,
        "seconds": round(seconds, 2),
        "bytes_seen": step * settings.batch * settings.seq_len,
        "final_train_loss": last_loss,
        "final_train_bpb": last_loss / math.log(2),
        "best_dev_bpb": best.bpb if best.state is not None else None,
        "best_step": best.step if best.state is not None else step,
    }


def _offer_dev(
    model: ByteModel, dev_windows: torch.Tensor, step: int, best: _BestWeights, settings: TrainSettings
) -> None:
    bpb = dev_bits_per_byte(model, dev_windows, settings)
    mark = " *" if bpb < best.bpb else ""
    print(f"step {step:6d}  dev {bpb:.4f} bpb{mark}", flush=True)
    best.offer(model, bpb, step)


def _log_step(step: int, loss: float, lr: float, elapsed: float, settings: TrainSettings) -> None:
    rate = step * settings.batch * settings.seq_len / max(elapsed, 1e-9)
    print(
        f"step {step:6d}  loss {loss:.4f} nats ({loss / math.log(2):.3f} bpb)  lr {lr:.2e}  "
        f"{elapsed:7.1f}s  {rate / 1e3:.0f}k bytes/s",
        flush=True,
    )


# --------------------------------------------------------------------------------------------
# Evaluation and saving
# --------------------------------------------------------------------------------------------


def evaluate_test_bpb(model: ByteModel, test_ids: torch.Tensor, settings: TrainSettings) -> tuple[float, int]:
    """Bits per byte of HF's own forward (fp32, eval mode) on fixed test windows; and their count."""
    windows = chunk_sequences(test_ids, settings.eval_seq_len, num_sequences=settings.eval_windows)
    model.eval()
    with full_fp32_matmul():
        bpb = evaluate(
            lambda ids: model(ids, use_cache=False).logits,
            windows,
            batch_size=settings.eval_batch,
            device=settings.device,
            progress=False,
        ).bits_per_byte
    return bpb, windows.shape[0]


def save_atomically(model: ByteModel, run: dict, out: Path) -> None:
    """Write `save_pretrained` files and the run JSON into a temp folder beside `out`, then swap it in.

    A crash while writing leaves the previous `out` untouched, never a half-written mix; the swap
    itself is two renames (a folder cannot replace a non-empty one in one step).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / RUN_JSON).write_text(json.dumps(run, indent=2, default=str) + "\n")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def run(settings: TrainSettings) -> dict:
    """Check, train, round to fp16, evaluate, save; returns the JSON written beside the weights."""
    device = settings.device
    train_path = settings.train_file or find_wikitext("valid")
    test_path = settings.test_file or find_wikitext("test")
    train_ids, dev_ids = split_dev(load_bytes(train_path).to(device), settings.dev_fraction)
    dev_windows = _dev_windows(dev_ids, settings)
    test_ids = load_bytes(test_path)

    torch.manual_seed(settings.seed)
    config = byte_model_config(settings.shape, settings.chunk_len)
    model = model_class(settings.shape)(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters, {config.num_hidden_layers} layers, hidden {config.hidden_size}")

    check_before = check_against_hf(model, settings.chunk_len, seed=settings.seed)
    print(f"parallel forward matches HF before training: max |diff| / scale = {check_before:.2e}", flush=True)

    stats = train_model(model, train_ids, settings, dev_windows)

    # Evaluate exactly what gets saved: the fp16-rounded weights, run in fp32.
    model = model.half().float()
    check_after = check_against_hf(model, settings.chunk_len, seed=settings.seed + 1)
    print(f"parallel forward matches HF after training: max |diff| / scale = {check_after:.2e}", flush=True)
    bpb, n_windows = evaluate_test_bpb(model, test_ids, settings)
    print(f"test bits per byte (HF forward, fp32, {n_windows} windows of {settings.eval_seq_len}): {bpb:.4f}")

    run_record = {
        "model_config": config.to_diff_dict(),
        "settings": asdict(settings),
        "parameters": params,
        **stats,
        "test_bpb": bpb,
        "test_windows": n_windows,
        "train_file": str(train_path),
        "test_file": str(test_path),
        "hf_check_rel_diff": {"before": check_before, "after": check_after},
        "device": _device_name(device),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "weights_dtype": "float16",
    }
    save_atomically(model.half(), run_record, settings.out)
    print(f"saved to {settings.out}")
    return run_record


def _dev_windows(dev_ids: torch.Tensor, settings: TrainSettings) -> torch.Tensor | None:
    available = dev_ids.numel() // settings.seq_len
    if available == 0:
        return None  # no (or too little) held-out text: keep the last weights
    return chunk_sequences(dev_ids, settings.seq_len, num_sequences=min(available, MAX_DEV_WINDOWS))


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def parse_args(argv: list[str] | None = None) -> TrainSettings:
    """Command-line flags -> TrainSettings (defaults as in the dataclasses)."""
    d, s = TrainSettings(), ModelShape()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=d.minutes, help="training wall-clock budget")
    p.add_argument("--steps", type=int, default=None, help="also stop after this many steps")
    p.add_argument("--device", default=d.device)
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--layers", type=int, default=s.num_hidden_layers)
    p.add_argument("--hidden", type=int, default=s.hidden_size)
    p.add_argument("--state", type=int, default=s.state_size)
    p.add_argument("--expand", type=int, default=s.expand)
    p.add_argument("--conv", type=int, default=s.conv_kernel)
    p.add_argument("--arch", choices=("mamba1", "mamba2"), default=s.arch)
    p.add_argument("--head-dim", type=int, default=s.head_dim, help="Mamba-2 only")
    p.add_argument("--groups", type=int, default=s.n_groups, help="Mamba-2 only: B/C groups")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--dropout", type=float, default=d.dropout, help="training only; HF's model has none")
    p.add_argument("--dev-fraction", type=float, default=d.dev_fraction, help="0: no early stopping")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between dev evaluations")
    p.add_argument("--chunk-len", type=int, default=d.chunk_len)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--eval-seq-len", type=int, default=d.eval_seq_len)
    p.add_argument("--eval-windows", type=int, default=None, help="default: all of test.txt")
    p.add_argument("--eval-batch", type=int, default=d.eval_batch)
    p.add_argument("--train-file", type=Path, default=None, help="default: WikiText-2 valid.txt")
    p.add_argument("--test-file", type=Path, default=None, help="default: WikiText-2 test.txt")
    a = p.parse_args(argv)
    shape = ModelShape(a.layers, a.hidden, a.state, a.expand, a.conv, a.arch, a.head_dim, a.groups)
    return TrainSettings(
        shape=shape, minutes=a.minutes, max_steps=a.steps, batch=a.batch, seq_len=a.seq_len, lr=a.lr,
        warmup_steps=a.warmup, weight_decay=a.weight_decay, grad_clip=a.grad_clip, dropout=a.dropout,
        dev_fraction=a.dev_fraction, eval_every=a.eval_every, chunk_len=a.chunk_len,
        log_every=a.log_every, eval_seq_len=a.eval_seq_len, eval_windows=a.eval_windows,
        eval_batch=a.eval_batch, seed=a.seed, device=a.device, out=a.out,
        train_file=a.train_file, test_file=a.test_file,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse flags, run, print the JSON summary."""
    record = run(parse_args(argv))
    print(json.dumps({k: record[k] for k in ("steps", "seconds", "final_train_loss", "test_bpb")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

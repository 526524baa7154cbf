"""Orthonormal Hadamard matrices and a fast Hadamard transform.

Quamba rotates the selective scan's output `y` with a Hadamard matrix before quantizing it for
`out_proj`: the rotation spreads outlier channels over all channels, so one per-tensor int8 scale
fits. The rotation is undone for free by folding `H^T` into `out_proj`'s weight.

Convention: `hadamard_matrix(n)` is `H` (orthonormal, `H @ H.T = I`), and
`hadamard_transform(x) = x @ H.T` along the last dim, i.e. `H @ v` for every row vector `v` of `x`.

Supported sizes are `n = M * 2**k` where `M` is 1 or a product of Paley orders:

* Paley I: order `p + 1` for a prime `p = 3 (mod 4)` (12, 20, 24, 44, 48, 60, 68, ...);
* Paley II: order `2 (p + 1)` for a prime `p = 1 (mod 4)` (12, 28, 36, 60, 76, 84, ...).

The `2**k` factor is a Sylvester matrix, applied by an O(n log n) butterfly; the `M` factor is dense.
Mamba's d_inner sizes (1536 = 12*2**7, 2560 = 20*2**7, 5120 = 20*2**8, ...) all take a 12 or 20 base.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "fold_hadamard_into_linear_weight",
    "hadamard_matrix",
    "hadamard_transform",
    "is_hadamard_size",
]


# ---------------------------------------------------------------------------------------------
# Size decomposition
# ---------------------------------------------------------------------------------------------


def _is_prime(p: int) -> bool:
    if p < 2:
        return False
    if p % 2 == 0:
        return p == 2
    f = 3
    while f * f <= p:
        if p % f == 0:
            return False
        f += 2
    return True


def _paley_kind(order: int) -> Optional[str]:
    """Which Paley construction gives a Hadamard matrix of exactly `order`, if any (I preferred)."""
    if order % 4 != 0:
        return None
    if _is_prime(order - 1):  # order = 0 mod 4 makes p = order - 1 = 3 mod 4
        return "I"
    q = order // 2 - 1
    if q % 4 == 1 and _is_prime(q):
        return "II"
    return None


def _odd_divisors(odd: int) -> list[int]:
    """Divisors > 1 of an odd number, ascending."""
    small = [d for d in range(3, math.isqrt(odd) + 1, 2) if odd % d == 0]
    return sorted(set(small + [odd // d for d in small] + [odd])) if odd > 1 else []


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@functools.lru_cache(maxsize=4096)
def _decompose(n: int) -> Optional[tuple[tuple[int, ...], int]]:
    """`n = prod(bases) * 2**k` with each base a non-power-of-two Paley order; None if impossible.

    Among decompositions the one with the smallest dense part `prod(bases)` wins, since the dense
    factor costs O(M) per element while the butterfly costs O(log).
    """
    if n < 1:
        return None
    if _is_power_of_two(n):
        return (), n.bit_length() - 1
    if n % 4 != 0:  # Hadamard matrices of order > 2 only exist for multiples of 4
        return None
    odd, twos = n, 0
    while odd % 2 == 0:
        odd, twos = odd // 2, twos + 1
    best: Optional[tuple[tuple[int, ...], int]] = None
    best_dense = 0
    # First base: P = o * 2**j for an odd divisor o > 1 of n and j >= 2 (P = 0 mod 4), Paley-built.
    for o in _odd_divisors(odd):
        for j in range(2, twos + 1):
            base = o << j
            if _paley_kind(base) is None:
                continue
            rest = _decompose(n // base)
            if rest is None:
                continue
            bases = tuple(sorted((base,) + rest[0]))
            dense = math.prod(bases)
            if best is None or dense < best_dense:
                best, best_dense = (bases, rest[1]), dense
    return best


def is_hadamard_size(n: int) -> bool:
    """True when `hadamard_matrix(n)` / `hadamard_transform` support size `n`."""
    return isinstance(n, int) and _decompose(n) is not None


def _nearest_supported(n: int) -> tuple[Optional[int], int]:
    lower = next((m for m in range(n - 1, 0, -1) if _decompose(m) is not None), None)
    upper = next(m for m in range(max(n + 1, 1), 2 * n + 3) if _decompose(m) is not None)
    return lower, upper


def _check_size(n: int) -> tuple[tuple[int, ...], int]:
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"Hadamard size must be a positive int, got {n!r} ({type(n).__name__})")
    dec = _decompose(n) if n >= 1 else None
    if dec is None:
        if n < 1:
            hint = "the nearest supported size is 1"
        else:
            lower, upper = _nearest_supported(n)
            hint = "nearest supported sizes: " + " and ".join(
                str(m) for m in (lower, upper) if m is not None
            )
        raise ValueError(
            f"no Hadamard matrix construction for n={n}. Supported: powers of two and n = M * 2**k "
            "where M is a product of Paley orders (p+1 for a prime p = 3 mod 4: 12, 20, 24, 44, 48, ...; "
            "2(p+1) for a prime p = 1 mod 4: 12, 28, 36, 60, 76, ...), e.g. 12, 20, 28, 40 times a power "
            f"of two. Orders other than 1 and 2 must be multiples of 4. {hint}."
        )
    return dec


# ---------------------------------------------------------------------------------------------
# Integer-valued constructions (cached; callers must not modify the returned tensors)
# ---------------------------------------------------------------------------------------------


def _jacobsthal(p: int) -> Tensor:
    """Q[i, j] = legendre(j - i, p): +1 for a nonzero quadratic residue, -1 for a non-residue, 0 on the diagonal."""
    residues = torch.zeros(p, dtype=torch.int64)
    residues[(torch.arange(1, p) ** 2) % p] = 1
    chi = residues * 2 - 1
    chi[0] = 0
    idx = torch.arange(p)
    return chi[(idx[None, :] - idx[:, None]) % p]


@functools.lru_cache(maxsize=64)
def _paley_int(order: int) -> Tensor:
    """Unnormalised (+-1 entries) Paley Hadamard matrix of `order`, int8."""
    kind = _paley_kind(order)
    if kind == "I":
        p = order - 1
        q = _jacobsthal(p)  # antisymmetric for p = 3 mod 4
        s = torch.zeros(order, order, dtype=torch.int64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = q
        h = s + torch.eye(order, dtype=torch.int64)  # (I + S)(I + S)^T = I + S S^T = (p + 1) I
    elif kind == "II":
        p = order // 2 - 1
        q = _jacobsthal(p)  # symmetric for p = 1 mod 4
        c = torch.zeros(p + 1, p + 1, dtype=torch.int64)  # symmetric conference matrix, C C^T = p I
        c[0, 1:] = 1
        c[1:, 0] = 1
        c[1:, 1:] = q
        # Each +-1 of C becomes +-[[1, 1], [1, -1]] and each (diagonal) 0 becomes [[1, -1], [-1, -1]].
        h = torch.kron(c, torch.tensor([[1, 1], [1, -1]])) + torch.kron(
            torch.eye(p + 1, dtype=torch.int64), torch.tensor([[1, -1], [-1, -1]])
        )
    else:  # pragma: no cover - _decompose only yields Paley orders
        raise AssertionError(f"{order} is not a Paley order")
    return h.to(torch.int8)


@functools.lru_cache(maxsize=64)
def _dense_int(bases: tuple[int, ...]) -> Tensor:
    """Kronecker product of the Paley bases, int8 (the `M x M` dense factor)."""
    h = torch.ones(1, 1, dtype=torch.int8)
    for b in bases:
        h = torch.kron(h, _paley_int(b))
    return h


@functools.lru_cache(maxsize=64)
def _dense_on(bases: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """`_dense_int(bases)` on `device` in `dtype`, made once: a host-to-device copy on every call
    would cost a transfer per rotation and cannot be captured in a CUDA graph."""
    return _dense_int(bases).to(device=device, dtype=dtype)


def _sylvester_int(k: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.int8)
    h2 = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    for _ in range(k):
        h = torch.kron(h2, h)
    return h


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def hadamard_matrix(
    n: int, dtype: torch.dtype = torch.float32, device: Optional[torch.device | str] = None
) -> Tensor:
    """The orthonormal `n x n` Hadamard matrix `H` (entries `+-1/sqrt(n)`, `H @ H.T = I`).

    `H = kron(D, S) / sqrt(n)` with `D` the dense Paley part (`M x M`) and `S` the Sylvester matrix
    of order `2**k`; this is the matrix `hadamard_transform` applies. Raises `ValueError` for sizes
    without a construction (see the module docstring), naming the nearest supported sizes.
    """
    bases, k = _check_size(n)
    h = torch.kron(_dense_int(bases), _sylvester_int(k))
    # One rounding of 1/sqrt(n) to `dtype`, so every entry has exactly the same magnitude.
    return (h.to(dtype=dtype) * (1.0 / math.sqrt(n))).to(device=device)


def _fwht_last(x: Tensor) -> Tensor:
    """Unnormalised Sylvester-order Walsh-Hadamard transform of the last dim (a power of two).

    `x` must be a fresh tensor the caller owns: it is used as one of the two ping-pong buffers.
    """
    n = x.shape[-1]
    lead = x.shape[:-1]
    src = x.reshape(-1, n).contiguous()
    dst = torch.empty_like(src)
    h = 1
    while h < n:
        # Pair element i with i + h inside each block of 2h: (a, b) -> (a + b, a - b). Writing into
        # a preallocated buffer avoids a torch.stack copy per stage.
        s = src.view(-1, n // (2 * h), 2, h)
        d = dst.view(-1, n // (2 * h), 2, h)
        torch.add(s[:, :, 0], s[:, :, 1], out=d[:, :, 0])
        torch.sub(s[:, :, 0], s[:, :, 1], out=d[:, :, 1])
        src, dst = dst, src
        h *= 2
    return src.reshape(*lead, n)


def hadamard_transform(x: Tensor, dim: int = -1, *, inverse: bool = False) -> Tensor:
    """Rotate `x` along `dim` by the orthonormal Hadamard matrix `H = hadamard_matrix(n)`.

    Returns `x @ H.T` (i.e. `H @ v` for each vector `v` along `dim`); with `inverse=True` it returns
    `x @ H` (`H.T @ v`), which undoes the forward transform. Paley matrices are not symmetric, so
    the two differ unless `n` is a power of two.

    Cost is O(n log n + n M) per vector for `n = M * 2**k`: a butterfly on the `2**k` factor and a
    dense `M x M` matmul on the Paley factor. Computes in fp32 (fp64 for fp64 inputs) and returns
    `x`'s dtype.
    """
    if not x.is_floating_point():
        raise TypeError(f"hadamard_transform needs a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("hadamard_transform needs a tensor with at least one dimension")
    xt = x.movedim(dim, -1)
    n = xt.shape[-1]
    bases, k = _check_size(n)
    work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    lead = xt.shape[:-1]
    m = n >> k
    # Index i = a * 2**k + b for kron(D, S): view as [..., M, 2**k], then y = D @ X @ S^T.
    # Always a fresh copy: the butterfly works in place on it.
    v = xt.to(dtype=work_dtype, copy=True).reshape(-1, m, 1 << k)
    if k:
        v = _fwht_last(v)  # S is symmetric, so forward and inverse are the same here
    if bases:
        d = _dense_on(bases, x.device, work_dtype)
        v = torch.matmul(d.T if inverse else d, v)
    v = v.mul_(1.0 / math.sqrt(n))
    return v.reshape(*lead, n).to(x.dtype).movedim(-1, dim)


def fold_hadamard_into_linear_weight(weight: Tensor) -> Tensor:
    """Fold the inverse rotation into a Linear weight: returns `W @ H.T` for `W` of shape `[out, in]`.

    With `y_rot = hadamard_transform(y)` (`H y`), `F.linear(y_rot, W @ H.T) = W H^T H y = W y`, so
    rotating a Linear's input and folding keeps its output unchanged. Computed in fp32 (fp64 for
    fp64 weights), returned in `weight`'s dtype. `W @ H.T` is the row-wise transform of `W`.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a Linear weight of shape [out, in], got shape {tuple(weight.shape)}")
    return hadamard_transform(weight, dim=-1)


# The rotation as one graph node. Defined here, beside the math, so that the kernels' references
# (kernels/hadamard.py) and the graph ops (quamba_fx.ops, which re-exports it) both import it from
# below them rather than from each other.
@torch.library.custom_op("quamba::hadamard", mutates_args=())
def hadamard(x: Tensor) -> Tensor:
    """Orthonormal Hadamard rotation of the last dim (`x @ H.T`, see `hadamard_transform`)."""
    return hadamard_transform(x, dim=-1).contiguous()


@hadamard.register_fake
def _hadamard_fake(x):
    return x.new_empty(x.shape)

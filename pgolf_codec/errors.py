"""Errors a reader raises on untrusted input, and the `Limits` whose violation raises them.

Every rule in `spec/FORMAT.md` "What a reader must reject" maps to exactly one subclass
below; the class name is the stable error name.  All are `ValueError`s so the CLI turns
them into a one-line message.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class FormatError(ValueError):
    """Base class: the bytes are not a valid pgolf artifact (or safetensors file)."""


class BadMagic(FormatError):
    """The file does not start with the pgolf magic bytes."""


class UnsupportedVersion(FormatError):
    """The major version is not one this reader implements."""


class Truncated(FormatError):
    """The file (or a section of it) ends before the length its header declares."""


class ChecksumMismatch(FormatError):
    """A CRC-32 (whole file, tensor payload or code section) does not match its bytes."""


class BadHeader(FormatError):
    """The header is not well-formed: bad msgpack, missing or ill-typed field, bad layout."""


class UnsupportedCoder(FormatError):
    """A stream names a coder id this reader does not have (a newer minor version's coder)."""


class LimitExceeded(FormatError):
    """A declared size exceeds the reader's `Limits` (checked before any allocation)."""


class BadPayload(FormatError):
    """A payload stream does not decode to exactly the symbols its header declares."""


class SafetensorsError(FormatError):
    """A `.safetensors` file violates that format (see `pgolf_codec.safetensors_io`)."""


class ArtifactTooLarge(ValueError):
    """Writing refused: the artifact would exceed the requested `max_bytes` (not a read error)."""


MAX_DIM = 1 << 31  # largest size of one tensor dimension (a format rule, not a tunable limit)


@dataclass(frozen=True)
class Limits:
    """Upper bounds a reader enforces before allocating anything a file declares.

    Sized for this field: a 16,000,000-byte artifact holds ~10^8 weights at ~1 bit each, so
    by default a tensor may declare at most 2^27 (134M) elements and all tensors together
    2^28 (268M); decoding the largest accepted artifact then needs a few GiB at most, and a
    small hostile file cannot ask for more.  Raise them (`pgolf ... --max-elements N`) for
    a bigger model.  Units: bytes unless named otherwise; element counts are numbers of
    weights (a 0 dimension counts as 1 in the per-tensor count, see `check_shape`).
    """

    max_file_bytes: int = 1 << 30
    max_header_bytes: int = 64 << 20  # decoded (msgpack) header size
    max_tensors: int = 100_000
    max_ndim: int = 8
    max_name_bytes: int = 1024
    max_tensor_elements: int = 1 << 27
    max_total_elements: int = 1 << 28
    max_stream_bytes: int = 1 << 29  # decoded size of any one payload stream (fp32: 4 bytes per element)
    max_code_files: int = 1024
    max_code_bytes: int = 64 << 20  # decoded size of the code section

    @classmethod
    def for_elements(cls, n: int) -> "Limits":
        """Default limits but `n` elements per tensor and in all (streams: 4 bytes per element)."""
        if n < 1:
            raise ValueError(f"element limit must be positive, got {n}")
        return cls(max_tensor_elements=n, max_total_elements=n, max_stream_bytes=4 * n + 4)


def check_shape(shape: Any, limits: Limits = Limits(), where: str = "tensor", *,
                elements: bool = True) -> tuple[int, ...]:
    """Validate a declared tensor shape; the one rule readers and writers share.

    A shape is at most `limits.max_ndim` integers, each in [0, MAX_DIM] (`BadHeader`
    otherwise), whose product with 0 dimensions counted as 1 is at most
    `limits.max_tensor_elements` (`LimitExceeded`): an empty tensor cannot declare row
    lengths no machine integer holds.  `elements=False` skips the element limit (a reader
    that decodes nothing).  Returns the shape as a tuple.
    """
    if (not isinstance(shape, (list, tuple)) or len(shape) > limits.max_ndim
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)):
        raise BadHeader(f"{where}: bad shape {_short(shape)} (at most {limits.max_ndim} dims, each 0..{MAX_DIM})")
    extent = math.prod(max(d, 1) for d in shape)
    if elements and extent > limits.max_tensor_elements:
        numel = math.prod(shape)
        raise LimitExceeded(f"{where}: shape {list(shape)} declares "
                            f"{f'{numel:,} elements' if numel else f'rows of {extent:,} elements'}, limit "
                            f"{limits.max_tensor_elements:,} per tensor (raise Limits.max_tensor_elements / "
                            f"--max-elements)")
    return tuple(shape)


def _short(x: Any) -> str:
    r = repr(x)
    return r if len(r) <= 80 else r[:77] + "..."

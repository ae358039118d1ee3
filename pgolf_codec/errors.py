"""Errors a reader raises on untrusted input, and the `Limits` whose violation raises them.

Every rule in `spec/FORMAT.md` "What a reader must reject" maps to exactly one subclass
below; the class name is the stable error name.  All are `ValueError`s so the CLI turns
them into a one-line message.
"""
from __future__ import annotations

from dataclasses import dataclass


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


@dataclass(frozen=True)
class Limits:
    """Upper bounds a reader enforces before allocating anything a file declares.

    Defaults are generous for a 16 MB submission yet keep a hostile file from asking for
    more than a few GiB.  Units: bytes unless named otherwise.
    """

    max_file_bytes: int = 1 << 30
    max_header_bytes: int = 64 << 20  # decoded (msgpack) header size
    max_tensors: int = 100_000
    max_ndim: int = 8
    max_name_bytes: int = 1024
    max_tensor_elements: int = 1 << 31
    max_total_elements: int = 1 << 32
    max_stream_bytes: int = 1 << 32  # decoded size of any one payload stream
    max_code_files: int = 1024
    max_code_bytes: int = 64 << 20  # decoded size of the code section

"""Code streams: the bytes that `numel` codes of a spec take, and whether a payload is a valid stream.

The layout is `bitpack`'s (b bits per code LSB-first, 5 trits per byte, or one code per byte). The
container checks streams with these rules on the host, and the device loader (`gpu`) with the
same rules where the payload is.
"""
from __future__ import annotations

import torch

from pgolf_codec import bitpack
from pgolf_codec.errors import BadPayload
from pgolf_codec.schemes import QuantSpec


def stream_nbytes(numel: int, spec: QuantSpec, packed: bool = True) -> int:
    """Bytes of the code stream of `numel` codes: packed (`bitpack` layout: b bits each, or
    5 trits per byte) or one code per byte."""
    if not packed:
        return numel
    if spec.kind == "ternary":
        return bitpack.trits_len(numel)
    return bitpack.packed_len(numel, spec.bits)


def check_stream(payload: torch.Tensor, numel: int, spec: QuantSpec, packed: bool = True) -> None:
    """Raise `BadPayload` unless `payload` is a valid code stream of `numel` codes.

    The rules are `bitpack.unpack`'s, so every code sequence has exactly one stream: the exact
    length, zero padding bits (or trits) in the last byte, no byte >= 243 in a trit stream,
    and, one code per byte, every code below the alphabet size. Runs where the payload is
    (one reduction at most, plus a one-byte look at the tail).
    """
    want = stream_nbytes(numel, spec, packed)
    if payload.numel() != want:
        raise BadPayload(f"code stream has {payload.numel()} bytes, {numel} codes of {spec.name} need {want}")
    if numel == 0:
        return
    if not packed:
        if int(payload.max()) >= spec.levels:
            raise BadPayload(f"code {int(payload.max())} is outside the alphabet of {spec.levels}")
        return
    last = int(payload[-1])
    if spec.kind == "ternary":
        if int(payload.max()) >= 243:
            raise BadPayload("trit stream has a byte >= 243")
        if last >= 3 ** (numel - 5 * (want - 1)):  # trits past the last code must be zero
            raise BadPayload("trit stream has a non-zero padding trit")
        return
    used = numel * spec.bits - 8 * (want - 1)  # bits of the last byte that hold codes
    if last >> used:
        raise BadPayload("packed stream has non-zero padding bits")

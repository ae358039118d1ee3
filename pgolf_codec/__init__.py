"""pgolf_codec: tensors to bytes and back — quant schemes, bit packing, coders, the artifact container.

The artifact format is specified in spec/FORMAT.md.
"""
from .coders import CODERS, Coder, CoderContext, register
from .container import (BUDGET_BYTES, Artifact, ArtifactHeader, ArtifactInfo, CodeStream, build_artifact, encode_tensor,
                        encoded_size, load, read_artifact, read_artifact_bytes, read_header, read_header_bytes,
                        write_artifact)
from .errors import (ArtifactTooLarge, BadHeader, BadMagic, BadPayload, ChecksumMismatch, FormatError,
                     LimitExceeded, Limits, SafetensorsError, Truncated, UnsupportedCoder, UnsupportedVersion)
from .schemes import (SCHEMES, GroupScales, Quantized, QuantSpec, Recipe, dequantize, fake_quant, fake_quant_ste,
                      group_scales, quantize)

__all__ = [
    "Artifact", "ArtifactHeader", "ArtifactInfo", "ArtifactTooLarge", "BUDGET_BYTES", "BadHeader", "BadMagic", "BadPayload",
    "CODERS", "ChecksumMismatch", "CodeStream", "Coder", "CoderContext", "FormatError", "GroupScales", "LimitExceeded", "Limits", "Quantized",
    "QuantSpec", "Recipe", "SCHEMES", "SafetensorsError", "Truncated", "UnsupportedCoder", "UnsupportedVersion",
    "build_artifact", "dequantize", "encode_tensor", "encoded_size", "fake_quant", "fake_quant_ste", "group_scales", "load",
    "quantize", "read_artifact", "read_artifact_bytes", "read_header", "read_header_bytes", "register", "write_artifact",
]

"""The `image` input of the Open Inference Protocol: encoded images as a BYTES tensor.

A request sends `pixels` (the model's own input) or `image`, BYTES, shape [N]: each element
one PNG, JPEG, BMP or PGM file of any size, normalised MNIST-style by `imaging`, exactly
as the native API does. The elements come as `contents.bytes_contents` or as one raw
buffer in Triton's BYTES layout (each element a 4-byte little-endian length, then its
bytes), which is what tritonclient sends on gRPC and in REST binary data.

`pixels_request` turns a request carrying `image` into the same request carrying the decoded
`pixels` (server/v2.py then checks and decodes it like any other: parameters, outputs, limits).
"""

from __future__ import annotations

import struct

import numpy as np

from mnist_edge.imaging.normalize import ImageError, ImageLimits, normalize_encoded
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.server.errors import InvalidArgument

IMAGE_INPUT = "image"
PIXELS_INPUT = "pixels"
_LENGTH = struct.Struct("<I")


def split_bytes_tensor(raw: bytes, count: int) -> list[bytes]:
    """Triton's raw BYTES layout -> its `count` elements; anything else is refused."""
    elements: list[bytes] = []
    offset, size = 0, len(raw)
    view = memoryview(raw)
    while offset < size:
        if offset + 4 > size:
            raise InvalidArgument(f"input '{IMAGE_INPUT}': raw BYTES data ends inside an element's 4-byte length (at byte {offset} of {size})")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > size:
            raise InvalidArgument(
                f"input '{IMAGE_INPUT}': element {len(elements)} declares {length} bytes but only {size - offset} remain; "
                "expected each element as a 4-byte little-endian length followed by that many bytes"
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    if len(elements) != count:
        raise InvalidArgument(f"input '{IMAGE_INPUT}': shape says {count} element(s), the raw BYTES data holds {len(elements)}")
    return elements


def join_bytes_tensor(elements: list[bytes]) -> bytes:
    """Elements -> Triton's raw BYTES layout (the inverse of `split_bytes_tensor`)."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def _image_count(shape, max_images: int) -> int:
    dims = list(shape)
    if not (len(dims) == 1 or (len(dims) == 2 and dims[1] == 1)):
        raise InvalidArgument(f"input '{IMAGE_INPUT}': shape {dims} not supported, expected [N] (one encoded image per element)")
    n = dims[0]
    if n <= 0:
        raise InvalidArgument(f"input '{IMAGE_INPUT}': shape {dims} holds no images (N={n}), expected N >= 1")
    if n > max_images:
        raise InvalidArgument(f"input '{IMAGE_INPUT}': {n} images in one request, over the limit of {max_images} (--max-request-images)")
    return n


def normalize_elements(elements: list[bytes], limits: ImageLimits) -> np.ndarray:
    """Encoded images -> uint8 [N, 28, 28]; the first bad one fails the request, by index."""
    out = np.empty((len(elements), 28, 28), dtype=np.uint8)
    for i, data in enumerate(elements):
        try:
            out[i] = normalize_encoded(data, limits)
        except ImageError as exc:
            raise InvalidArgument(f"input '{IMAGE_INPUT}' element {i}: {exc}") from None
    return out


def image_pixels(request: pb.ModelInferRequest, max_images: int, limits: ImageLimits) -> np.ndarray:
    """The `image` input of `request` (its only input) decoded to uint8 [N, 28, 28]."""
    return normalize_elements(image_elements(request, max_images), limits)


def image_elements(request: pb.ModelInferRequest, max_images: int) -> list[bytes]:
    """The encoded files of the `image` input of `request` (its only input), checked, not decoded."""
    tensor = request.inputs[0]
    if tensor.datatype != "BYTES":
        raise InvalidArgument(f"input '{IMAGE_INPUT}': datatype {tensor.datatype!r} not supported, expected BYTES (encoded image files)")
    if tensor.parameters:
        names = ", ".join(sorted(repr(k) for k in tensor.parameters))
        raise InvalidArgument(f"input '{IMAGE_INPUT}' parameters {names} not supported: this server accepts no parameters")
    n = _image_count(tensor.shape, max_images)
    raw_list = request.raw_input_contents
    has_typed = tensor.HasField("contents")
    if raw_list:
        if has_typed:
            raise InvalidArgument(f"input '{IMAGE_INPUT}': both raw_input_contents and typed contents given; send exactly one of them")
        if len(raw_list) != 1:
            raise InvalidArgument(f"raw_input_contents has {len(raw_list)} entries, expected 1 (one per input)")
        elements = split_bytes_tensor(raw_list[0], n)
    elif has_typed:
        others = [f.name for f, _ in tensor.contents.ListFields() if f.name != "bytes_contents"]
        if others:
            raise InvalidArgument(f"input '{IMAGE_INPUT}': BYTES data goes in contents.bytes_contents, got {others[0]}")
        elements = list(tensor.contents.bytes_contents)
        if len(elements) != n:
            raise InvalidArgument(f"input '{IMAGE_INPUT}': shape says {n} element(s), bytes_contents holds {len(elements)}")
    else:
        raise InvalidArgument(f"input '{IMAGE_INPUT}': no data; send raw_input_contents or contents.bytes_contents")
    return elements


def has_image(request: pb.ModelInferRequest) -> bool:
    return any(t.name == IMAGE_INPUT for t in request.inputs)


def pixels_request(request: pb.ModelInferRequest, max_images: int, limits: ImageLimits) -> pb.ModelInferRequest | None:
    """The request with its `image` input decoded into a UINT8 `pixels` input (everything else
    kept as sent), or None when it has no `image` input. `pixels` and `image` together are refused."""
    inputs = request.inputs
    if not has_image(request):
        return None
    if len(inputs) != 1:
        names = [t.name for t in inputs]
        if PIXELS_INPUT in names:
            raise InvalidArgument(f"inputs '{PIXELS_INPUT}' and '{IMAGE_INPUT}' both given: send one of them (raw pixels, or encoded images)")
        raise InvalidArgument(f"inputs {names} given, expected one: '{PIXELS_INPUT}' or '{IMAGE_INPUT}'")
    pixels = image_pixels(request, max_images, limits)
    converted = pb.ModelInferRequest(
        model_name=request.model_name, model_version=request.model_version, id=request.id, outputs=request.outputs,
        inputs=[pb.ModelInferRequest.InferInputTensor(name=PIXELS_INPUT, datatype="UINT8", shape=[pixels.shape[0], 28, 28])],
        raw_input_contents=[pixels.tobytes()],
    )
    for key, value in request.parameters.items():
        converted.parameters[key].CopyFrom(value)
    return converted

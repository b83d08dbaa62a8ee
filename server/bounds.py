"""Bounds on what one request may carry, checked on its wire bytes before it is parsed.

Protobuf turns every field of a message into Python objects: a ModelInferRequest with
1,000,000 parameters, a 10 MB input name or a shape of 2,000,000 dimensions would cost memory
and time in proportion to the junk, and an error quoting it would be as large as the junk.
`check_model_infer` and `check_classify` walk the message's wire format (field headers only:
payloads are skipped by their length, never copied) and reject a request over a bound with a
short INVALID_ARGUMENT that names what was over which bound. They stop at the first bound
exceeded, so their own cost is bounded: a few hundred field headers at most.

Every error message is short by construction: `summarize` and `quote` show a few leading
items or characters and the size of the rest, and take only what they show from what they
are given. The figures are listed in docs/limits.md.
"""

from __future__ import annotations

from collections.abc import Iterable

from mnist_edge.server.errors import InvalidArgument

MAX_NAME_BYTES = 256  # model name and version, tensor names, datatypes, parameter names
MAX_ID_BYTES = 1024  # ModelInferRequest.id and ClassifyRequest.request_id (echoed in the answer)
MAX_PARAMETERS = 32  # entries of one parameters map: the request's, an input's, an output's
MAX_PARAMETER_BYTES = 4096  # one parameter's value
MAX_TENSORS = 8  # inputs, requested outputs, raw_input_contents entries (the model has one input)
MAX_DIMS = 8  # dimensions of an input's shape
MAX_OTHER_FIELDS = 16  # repeats of singular fields and fields this server does not know
SHOWN_ITEMS = 3  # items an error message quotes before "..."
SHOWN_CHARS = 32  # characters of one quoted item


class _Malformed(Exception):
    pass


def quote(value: bytes | str, limit: int = SHOWN_CHARS) -> str:
    """A short, printable rendering of a possibly huge name: its first `limit` characters, and
    "..." when there is more."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        head = bytes(value[: limit * 4 + 4]).decode("utf-8", "replace")
        cut = len(value) > limit * 4 + 4 or len(head) > limit
    else:
        head = value[: limit + 1]
        cut = len(value) > limit
    return repr(head[:limit]) + ("..." if cut else "")


def summarize(items: Iterable[bytes | str], noun: str, count: int | None = None, more_than: int | None = None) -> str:
    """"1,000,000 parameters, e.g. 'k0', 'k1', 'k2', ..." from the first few `items` only (the
    rest is never read); with `more_than` instead of a `count`, "more than 32 parameters, ..."."""
    shown = []
    for item in items:
        if len(shown) == SHOWN_ITEMS:
            break
        shown.append(quote(item))
    total = f"{count:,} {noun}" if count is not None else f"more than {more_than:,} {noun}"
    more = ", ..." if count is None or count > len(shown) else ""
    return f"{total}, e.g. {', '.join(shown)}{more}" if shown else total


# -- the wire format ------------------------------------------------------------------------
def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _Malformed(pos)
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Malformed(pos)


def _scan(buf, pos: int, end: int, limit: int) -> tuple[list[tuple[int, int, int, int]], bool]:
    """The first `limit` fields of buf[pos:end], and whether more follow. A field is (number,
    wire type, start, stop) with the payload's bounds for a length-delimited one, (number, wire
    type, value, 0) for a varint. A straight loop (no generator): it runs on every request."""
    out: list[tuple[int, int, int, int]] = []
    append = out.append
    while pos < end:
        if len(out) == limit:
            return out, True
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _varint(buf, pos, end)
        wire = key & 7
        if wire == 2:
            if pos >= end:
                raise _Malformed(pos)
            length = buf[pos]
            if length < 0x80:
                pos += 1
            else:
                length, pos = _varint(buf, pos, end)
            stop = pos + length
            if stop > end:
                raise _Malformed(pos)
            append((key >> 3, 2, pos, stop))
            pos = stop
        elif wire == 0:
            value, pos = _varint(buf, pos, end)
            append((key >> 3, 0, value, 0))
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _Malformed(pos)
            append((key >> 3, wire, 0, 0))
        else:  # groups (3, 4) are not in these messages; 6 and 7 do not exist
            raise _Malformed(pos)
    return out, False


def _too_many(where: str, noun: str, bound: int, examples: Iterable[bytes] = ()) -> InvalidArgument:
    return InvalidArgument(f"{where} has {summarize(examples, noun, more_than=bound)}; at most {bound:,} are accepted")


def _check_length(what: str, start: int, stop: int, bound: int, buf) -> None:
    if stop - start > bound:
        raise InvalidArgument(f"{what} {quote(buf[start:stop])} is {stop - start:,} bytes, over the limit of {bound:,} bytes")


def _map_keys(buf, entries: list[tuple[int, int]]) -> Iterable[bytes]:
    """The keys of the first map entries (for an error message)."""
    for start, stop in entries:
        for number, wire, a, b in _scan(buf, start, stop, MAX_OTHER_FIELDS)[0]:
            if number == 1 and wire == 2:
                yield buf[a:b]
                break


def _check_parameters(buf, entries: list[tuple[int, int]], where: str) -> None:
    if len(entries) > MAX_PARAMETERS:
        raise _too_many(where, "parameters", MAX_PARAMETERS, _map_keys(buf, entries))
    for start, stop in entries:
        fields, more = _scan(buf, start, stop, MAX_OTHER_FIELDS)
        if more:
            raise _too_many(f"{where} parameter", "fields", MAX_OTHER_FIELDS)
        for number, wire, a, b in fields:
            if wire == 2 and number == 1:
                _check_length(f"{where} parameter name", a, b, MAX_NAME_BYTES, buf)
            elif wire == 2 and number == 2:
                _check_length(f"{where} parameter value", a, b, MAX_PARAMETER_BYTES + 16, buf)


# Fields a tensor or a request may have within the bounds; one more means some bound is passed.
_TENSOR_FIELDS = 3 + MAX_DIMS + MAX_PARAMETERS + 1 + MAX_OTHER_FIELDS
_REQUEST_FIELDS = MAX_PARAMETERS + 3 * MAX_TENSORS + MAX_OTHER_FIELDS


def _check_tensor(buf, start: int, stop: int, index: int, is_input: bool) -> None:
    """Input (or requested output) number `index` of a ModelInferRequest. Written for speed: it
    runs on every request, and builds no string unless a bound is passed."""
    fields, more = _scan(buf, start, stop, _TENSOR_FIELDS + 1)
    dims = other = packed_bytes = 0
    contents = False
    packed: list[tuple[int, int]] = []
    entries: list[tuple[int, int]] | None = None
    params_field = 4 if is_input else 2
    for number, wire, a, b in fields:
        if wire == 2 and (number == 1 or (number == 2 and is_input)):  # name, datatype
            other += 1  # counted with the unknown fields: each comes once
            if b - a > MAX_NAME_BYTES:
                _check_length(f"{_tensor(index, is_input)} {'name' if number == 1 else 'datatype'}", a, b, MAX_NAME_BYTES, buf)
        elif is_input and number == 3:  # shape: packed (normally one field) or one field per dimension
            if wire != 2:
                dims += 1
            elif b - a > MAX_DIMS * 10:  # 10 bytes: the longest varint
                tail = bytes(buf[a:b]).translate(None, bytes(range(128)))
                raise InvalidArgument(f"{_tensor(index, is_input)} shape has {(b - a) - len(tail):,} dimensions, over the limit of {MAX_DIMS}")
            else:
                packed.append((a, b))
                packed_bytes += b - a
        elif number == params_field and wire == 2:
            if entries is None:
                entries = []
            entries.append((a, b))
        elif is_input and number == 5 and not contents:  # typed contents: checked against the shape when decoded
            contents = True
        else:
            other += 1
    if dims + packed_bytes > MAX_DIMS:  # a dimension takes a byte at least: count only when it matters
        dims += sum(1 for a, b in packed for x in buf[a:b] if x < 0x80)
        if dims > MAX_DIMS:
            raise InvalidArgument(f"{_tensor(index, is_input)} shape has {'more than ' if more else ''}{dims:,} dimensions, over the limit of {MAX_DIMS}")
    if other > MAX_OTHER_FIELDS:
        raise _too_many(_tensor(index, is_input), "repeated or unknown fields", MAX_OTHER_FIELDS)
    if entries:
        _check_parameters(buf, entries, _tensor(index, is_input))
    if more:
        raise _too_many(_tensor(index, is_input), "fields", _TENSOR_FIELDS)


def _tensor(index: int, is_input: bool) -> str:
    return f"input #{index}" if is_input else f"requested output #{index}"


def check_model_infer(raw: bytes) -> None:
    """Refuse a serialized ModelInferRequest over a bound (InvalidArgument), before it is parsed."""
    try:
        _walk_model_infer(raw)
    except _Malformed as exc:
        raise InvalidArgument(f"the request is not a valid inference.ModelInferRequest message: its protobuf encoding breaks at byte {exc.args[0]:,}") from None


def _walk_model_infer(buf) -> None:
    fields, more = _scan(buf, 0, len(buf), _REQUEST_FIELDS + 1)
    entries: list[tuple[int, int]] = []
    inputs: list[tuple[int, int]] = []
    outputs: list[tuple[int, int]] = []
    raws = other = 0
    for number, wire, a, b in fields:
        if wire != 2:
            other += 1
        elif number == 7:
            raws += 1
        elif number == 5:
            inputs.append((a, b))
        elif number == 4:
            entries.append((a, b))
        elif number == 6:
            outputs.append((a, b))
        else:
            other += 1
            if number == 1 or number == 2:
                _check_length("model name" if number == 1 else "model version", a, b, MAX_NAME_BYTES, buf)
            elif number == 3:
                _check_length("request id", a, b, MAX_ID_BYTES, buf)
    where = "the request"
    if len(entries) > MAX_PARAMETERS:
        raise _too_many(where, "parameters", MAX_PARAMETERS, _map_keys(buf, entries))
    for tensors, noun in ((inputs, "inputs"), (outputs, "requested outputs")):
        if len(tensors) > MAX_TENSORS:
            raise _too_many(where, noun, MAX_TENSORS)
    if raws > MAX_TENSORS:
        raise _too_many(where, "raw_input_contents entries", MAX_TENSORS)
    if other > MAX_OTHER_FIELDS:
        raise _too_many(where, "repeated or unknown fields", MAX_OTHER_FIELDS)
    for i, (a, b) in enumerate(inputs, 1):
        _check_tensor(buf, a, b, i, True)
    for i, (a, b) in enumerate(outputs, 1):
        _check_tensor(buf, a, b, i, False)
    if entries:
        _check_parameters(buf, entries, "request")
    if more:
        raise _too_many(where, "fields", _REQUEST_FIELDS)


def check_classify(raw: bytes, max_images: int) -> None:
    """Refuse a serialized digits.v1 ClassifyRequest over a bound, before it is parsed.

    Images are counted exactly up to twice the limit (the message then says how many), and the
    walk stops there."""
    try:
        fields, _ = _scan(raw, 0, len(raw), 2 * max_images + MAX_OTHER_FIELDS + 1)
    except _Malformed as exc:
        raise InvalidArgument(f"the request is not a valid digits.v1.ClassifyRequest message: its protobuf encoding breaks at byte {exc.args[0]:,}") from None
    images = other = 0
    for number, wire, a, b in fields:
        if number == 1 and wire == 2:
            images += 1
        else:
            other += 1
            if number == 4 and wire == 2:
                _check_length("request_id", a, b, MAX_ID_BYTES, raw)
    if images > max_images:
        count = f"more than {2 * max_images}" if images > 2 * max_images else str(images)
        raise InvalidArgument(f"{count} images in one request, over the limit of {max_images} (--max-request-images)")
    if other > MAX_OTHER_FIELDS:
        raise _too_many("the request", "repeated or unknown fields", MAX_OTHER_FIELDS)

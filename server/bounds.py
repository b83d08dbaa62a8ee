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

from collections.abc import Callable, Iterable

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
def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
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


def _fields(buf: memoryview, pos: int, end: int):
    """(field number, wire type, value) for each field in buf[pos:end]; value is the integer of
    a varint, (start, stop) of a length-delimited field, None otherwise."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed(pos)
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _Malformed(pos)
            yield number, wire, None
        else:  # groups (3, 4) are not in these messages; 6 and 7 do not exist
            raise _Malformed(pos)


class _Counter:
    """Counts fields of one kind in one message and refuses the one over its bound."""

    __slots__ = ("bound", "n", "noun", "where")

    def __init__(self, where: str, noun: str, bound: int) -> None:
        self.where, self.noun, self.bound, self.n = where, noun, bound, 0

    def add(self, examples: Callable[[], Iterable[bytes]] | None = None) -> None:
        self.n += 1
        if self.n > self.bound:
            shown = summarize(examples() if examples else (), self.noun, more_than=self.bound)
            raise InvalidArgument(f"{self.where} has {shown}; at most {self.bound:,} are accepted")


def _check_length(what: str, start: int, stop: int, bound: int, buf: memoryview) -> None:
    if stop - start > bound:
        raise InvalidArgument(f"{what} {quote(buf[start:stop])} is {stop - start:,} bytes, over the limit of {bound:,} bytes")


def _map_keys(buf: memoryview, entries: list[tuple[int, int]]) -> Iterable[bytes]:
    """The keys of the first map entries (for an error message)."""
    for start, stop in entries:
        for number, wire, value in _fields(buf, start, stop):
            if number == 1 and wire == 2:
                yield buf[value[0]:value[1]]
                break


def _check_parameters(buf: memoryview, entries: list[tuple[int, int]], where: str) -> None:
    for start, stop in entries:
        for number, wire, value in _fields(buf, start, stop):
            if wire == 2 and number == 1:
                _check_length(f"{where} parameter name", *value, MAX_NAME_BYTES, buf)
            elif wire == 2 and number == 2:
                _check_length(f"{where} parameter value", *value, MAX_PARAMETER_BYTES + 16, buf)


def _walk_parameters(buf: memoryview, counter: _Counter, entries: list[tuple[int, int]], span: tuple[int, int]) -> None:
    entries.append(span)
    counter.add(lambda: _map_keys(buf, entries))


def _check_tensor(buf: memoryview, start: int, stop: int, where: str, is_input: bool) -> None:
    params = _Counter(f"{where}", "parameters", MAX_PARAMETERS)
    other = _Counter(where, "repeated or unknown fields", MAX_OTHER_FIELDS)
    dims = 0
    entries: list[tuple[int, int]] = []
    for number, wire, value in _fields(buf, start, stop):
        if number == 1 and wire == 2:
            _check_length(f"{where} name", *value, MAX_NAME_BYTES, buf)
        elif is_input and number == 2 and wire == 2:
            _check_length(f"{where} datatype", *value, MAX_NAME_BYTES, buf)
        elif is_input and number == 3:  # shape: packed (one field) or one field per dimension
            if wire == 2:
                a, b = value
                if b - a > MAX_DIMS * 10:  # 10 bytes: the longest varint
                    tail = bytes(buf[a:b]).translate(None, bytes(range(128)))
                    raise InvalidArgument(f"{where} shape has {(b - a) - len(tail):,} dimensions, over the limit of {MAX_DIMS}")
                dims += sum(1 for x in buf[a:b] if x < 0x80)
            else:
                dims += 1
            if dims > MAX_DIMS:
                raise InvalidArgument(f"{where} shape has more than {MAX_DIMS} dimensions; at most {MAX_DIMS} are accepted")
        elif number == (4 if is_input else 2) and wire == 2:
            _walk_parameters(buf, params, entries, value)
        elif is_input and number == 5:
            pass  # typed contents: as large as the message allows, checked against the shape when decoded
        else:
            other.add()
    _check_parameters(buf, entries, where)


def check_model_infer(raw: bytes | memoryview) -> None:
    """Refuse a serialized ModelInferRequest over a bound (InvalidArgument), before it is parsed."""
    buf = memoryview(raw)
    try:
        _walk_model_infer(buf)
    except _Malformed as exc:
        raise InvalidArgument(f"the request is not a valid inference.ModelInferRequest message: its protobuf encoding breaks at byte {exc.args[0]:,}") from None


def _walk_model_infer(buf: memoryview) -> None:
    params = _Counter("the request", "parameters", MAX_PARAMETERS)
    inputs = _Counter("the request", "inputs", MAX_TENSORS)
    outputs = _Counter("the request", "requested outputs", MAX_TENSORS)
    raws = _Counter("the request", "raw_input_contents entries", MAX_TENSORS)
    other = _Counter("the request", "repeated or unknown fields", MAX_OTHER_FIELDS)
    entries: list[tuple[int, int]] = []
    for number, wire, value in _fields(buf, 0, len(buf)):
        if wire == 2 and number in (1, 2):
            other.add()
            _check_length("model name" if number == 1 else "model version", *value, MAX_NAME_BYTES, buf)
        elif wire == 2 and number == 3:
            other.add()
            _check_length("request id", *value, MAX_ID_BYTES, buf)
        elif wire == 2 and number == 4:
            _walk_parameters(buf, params, entries, value)
        elif wire == 2 and number == 5:
            inputs.add()
            _check_tensor(buf, *value, f"input #{inputs.n}", True)
        elif wire == 2 and number == 6:
            outputs.add()
            _check_tensor(buf, *value, f"requested output #{outputs.n}", False)
        elif wire == 2 and number == 7:
            raws.add()
        else:
            other.add()
    _check_parameters(buf, entries, "request")


def check_classify(raw: bytes | memoryview, max_images: int) -> None:
    """Refuse a serialized digits.v1 ClassifyRequest over a bound, before it is parsed.

    Images are counted exactly up to twice the limit (the message then says how many), and the
    walk stops there."""
    buf = memoryview(raw)
    other = _Counter("the request", "repeated or unknown fields", MAX_OTHER_FIELDS)
    images = 0
    try:
        for number, wire, value in _fields(buf, 0, len(buf)):
            if number == 1 and wire == 2:
                images += 1
                if images > 2 * max_images:
                    break
            elif number == 4 and wire == 2:
                other.add()
                _check_length("request_id", *value, MAX_ID_BYTES, buf)
            else:
                other.add()
    except _Malformed as exc:
        raise InvalidArgument(f"the request is not a valid digits.v1.ClassifyRequest message: its protobuf encoding breaks at byte {exc.args[0]:,}") from None
    if images > max_images:
        count = f"more than {2 * max_images}" if images > 2 * max_images else str(images)
        raise InvalidArgument(f"{count} images in one request, over the limit of {max_images} (--max-request-images)")

"""The data form that crosses the sandbox boundary: JSON, with tags for what JSON lacks.

Only plain data crosses, never objects: None, bool, int, float (NaN and infinities included), str and
lists are JSON's own; tuples, sets, frozensets, dicts (any hashable keys), bytes and complex numbers
are one-key objects (`{"tuple": [...]}`, `{"dict": [[key, value], ...]}`, ...). Decoding builds only
built-in types, so nothing the sandbox sends can carry a custom `__eq__`, `__hash__` or `__repr__`;
anything else in the input is an error. Numbers of other types (numpy scalars, `Fraction`) are sent as
the int, float or complex they equal; other objects cannot be sent.

This module is stdlib-only: it is also installed inside the sandbox, from its source (`sandbox.py`).
Messages are JSON arrays (`["call", name, args, kwargs]`, `["ok", value]`, ...) framed by a 4-byte
big-endian length.
"""

import json
import numbers
import struct

_HEADER = struct.Struct(">I")
_TAGS = ("tuple", "set", "frozenset", "dict", "bytes", "complex")


class WireError(ValueError):
    """A message that is not well-formed plain data."""


def to_wire(value, depth=0):
    """`value` as JSON-ready plain data; TypeError for anything that is not plain data."""
    if depth > 200:
        raise TypeError("value nested deeper than 200 levels")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, list):
        return [to_wire(v, depth + 1) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [to_wire(v, depth + 1) for v in value]}
    if isinstance(value, (set, frozenset)):
        kind = "frozenset" if isinstance(value, frozenset) else "set"
        return {kind: [to_wire(v, depth + 1) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[to_wire(k, depth + 1), to_wire(v, depth + 1)] for k, v in value.items()]}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, complex):
        return {"complex": [value.real, value.imag]}
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, numbers.Complex):
        return {"complex": [float(value.real), float(value.imag)]}
    raise TypeError(f"a {type(value).__name__} is not plain data and cannot cross the sandbox boundary")


def _tagged(pairs):
    if len(pairs) != 1 or pairs[0][0] not in _TAGS:
        raise WireError(f"unexpected object with keys {[k for k, _ in pairs][:5]}")
    tag, body = pairs[0]
    if tag == "bytes":
        if type(body) is not str:
            raise WireError("bytes must be a hex string")
        return bytes.fromhex(body)
    if type(body) is not list:
        raise WireError(f"{tag} must hold a list")
    if tag == "tuple":
        return tuple(body)
    if tag == "set":
        return set(body)
    if tag == "frozenset":
        return frozenset(body)
    if tag == "complex":
        if len(body) != 2 or not all(type(x) in (int, float) for x in body):
            raise WireError("complex must be [real, imag]")
        return complex(*body)
    if not all(type(item) is list and len(item) == 2 for item in body):
        raise WireError("dict must be a list of [key, value] pairs")
    return dict(body)


def from_wire(text):
    """Plain data from a JSON text made by `to_wire`; WireError for anything else."""
    try:
        return json.loads(text, object_pairs_hook=_tagged)
    except WireError:
        raise
    except (ValueError, TypeError, RecursionError, MemoryError) as err:  # bad JSON, unhashable key, too deep
        raise WireError(f"{type(err).__name__}: {err}") from None


def encode_message(message):
    """A message (a list whose items are `to_wire` output) framed for the channel."""
    data = json.dumps(message).encode("ascii")
    return _HEADER.pack(len(data)) + data


def decode_length(header):
    return _HEADER.unpack(header)[0]

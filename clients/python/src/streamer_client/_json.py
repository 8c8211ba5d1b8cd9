"""Plain Python values to and from google.protobuf.Value / Struct.

The rule: JSON numbers travel as doubles. Going out, an `int` must lie
within ±2**53 (beyond it a double would silently change it: send such
numbers as strings) and a `float` must be finite. Coming back, a number
that is integral and within ±2**53 is an `int`, any other a `float`; so
`{"pages": 5}` and `{"pages": 5.0}` both come back as `{"pages": 5}`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from google.protobuf import struct_pb2

#: The largest integer a double holds exactly, and so the largest that
#: travels as a JSON number unchanged.
MAX_SAFE_INTEGER = 2**53

JSON = Any
"""A JSON value: None, bool, int, float, str, a list of JSON values or a
dict of str to JSON values."""


def to_value(data: JSON, _path: str = "$") -> struct_pb2.Value:
    """`data` as a google.protobuf.Value (raises TypeError / ValueError for
    what JSON cannot carry)."""
    value = struct_pb2.Value()
    _fill(value, data, _path)
    return value


def to_struct(data: Optional[Mapping[str, JSON]], _path: str = "$") -> struct_pb2.Struct:
    """A dict as a google.protobuf.Struct (None is the empty Struct)."""
    struct = struct_pb2.Struct()
    if data is not None:
        if not isinstance(data, Mapping):
            raise TypeError(f"{_path}: expected a dict, got {type(data).__name__}")
        _fill_struct(struct, data, _path)
    return struct


def _fill(value: struct_pb2.Value, data: JSON, path: str) -> None:
    # bool before int: True is an int in Python, but not in JSON.
    if data is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(data, bool):
        value.bool_value = data
    elif isinstance(data, int):
        if abs(data) > MAX_SAFE_INTEGER:
            raise ValueError(
                f"{path}: {data} is beyond ±2**53, which a JSON number (a double) cannot hold "
                "exactly; send it as a string"
            )
        value.number_value = float(data)
    elif isinstance(data, float):
        if not math.isfinite(data):
            raise ValueError(f"{path}: {data} is not a JSON number")
        value.number_value = data
    elif isinstance(data, str):
        value.string_value = data
    elif isinstance(data, Mapping):
        # An empty object must still set the kind (a Value with none is refused).
        value.struct_value.SetInParent()
        _fill_struct(value.struct_value, data, path)
    elif isinstance(data, struct_pb2.Value):  # already converted
        value.CopyFrom(data)
    elif isinstance(data, (list, tuple)):
        items = value.list_value
        # An empty list must still set the kind.
        items.SetInParent()
        for index, item in enumerate(data):
            _fill(items.values.add(), item, f"{path}[{index}]")
    else:
        raise TypeError(f"{path}: {type(data).__name__} is not a JSON value")


def _fill_struct(struct: struct_pb2.Struct, data: Mapping[str, JSON], path: str) -> None:
    for key, item in data.items():
        if not isinstance(key, str):
            raise TypeError(f"{path}: JSON object keys are strings, not {type(key).__name__} ({key!r})")
        _fill(struct.fields[key], item, f"{path}.{key}")


def from_value(value: Optional[struct_pb2.Value]) -> JSON:
    """A google.protobuf.Value as a plain Python value (None for an unset one)."""
    if value is None:
        return None
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if number.is_integer() and abs(number) <= MAX_SAFE_INTEGER:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return from_struct(value.struct_value)
    if kind == "list_value":
        return [from_value(item) for item in value.list_value.values]
    return None  # null_value, or no kind at all


def from_struct(struct: Optional[struct_pb2.Struct]) -> dict[str, JSON]:
    """A google.protobuf.Struct as a dict."""
    if struct is None:
        return {}
    return {key: from_value(item) for key, item in struct.fields.items()}

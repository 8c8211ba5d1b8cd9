"""Unit tests that need no server: JSON conversion and error details."""

from __future__ import annotations

import math

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2, struct_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from streamer_client import MAX_SAFE_INTEGER, StreamerError, from_value, to_struct, to_value
from streamer_client.models import Text, to_payload


def roundtrip(data):  # type: ignore[no-untyped-def]
    return from_value(struct_pb2.Value.FromString(to_value(data).SerializeToString()))


def test_json_values_round_trip_as_plain_python() -> None:
    data = {"s": "x", "i": 3, "f": 2.5, "t": True, "n": None, "l": [1, [], {}], "o": {"deep": [{"k": -7}]}}

    back = roundtrip(data)

    assert back == data
    assert isinstance(back["i"], int) and isinstance(back["o"]["deep"][0]["k"], int)
    assert isinstance(back["t"], bool)
    assert back["l"][1] == [] and back["l"][2] == {}


def test_integral_numbers_come_back_as_int_within_2_to_the_53() -> None:
    assert roundtrip(5.0) == 5 and isinstance(roundtrip(5.0), int)
    assert roundtrip(MAX_SAFE_INTEGER) == MAX_SAFE_INTEGER and isinstance(roundtrip(MAX_SAFE_INTEGER), int)
    assert roundtrip(-MAX_SAFE_INTEGER) == -MAX_SAFE_INTEGER
    big = struct_pb2.Value(number_value=2.0**60)
    assert isinstance(from_value(big), float)
    assert isinstance(roundtrip(0.5), float)


def test_what_json_cannot_carry_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\$\.id.*2\*\*53"):
        to_value({"id": MAX_SAFE_INTEGER + 1})
    with pytest.raises(ValueError):
        to_value([math.nan])
    with pytest.raises(ValueError):
        to_value(math.inf)
    with pytest.raises(TypeError, match="keys are strings"):
        to_value({1: "x"})
    with pytest.raises(TypeError, match="set is not a JSON value"):
        to_value({"x": {1, 2}})
    with pytest.raises(TypeError):
        to_struct(["not", "a", "dict"])  # type: ignore[arg-type]


def test_an_unset_value_is_none_and_none_is_null() -> None:
    assert from_value(struct_pb2.Value()) is None
    assert to_value(None).WhichOneof("kind") == "null_value"
    assert to_value([]).WhichOneof("kind") == "list_value"
    assert to_struct(None) == struct_pb2.Struct()


def test_payloads_pick_json_text_or_binary() -> None:
    assert to_payload({"a": 1}).WhichOneof("body") == "json"
    assert to_payload("quoted").json.string_value == "quoted"
    assert to_payload(Text("raw")).text == "raw"
    assert to_payload(b"\x00\x01").binary == b"\x00\x01"


def packed(message) -> any_pb2.Any:  # type: ignore[no-untyped-def]
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


class FakeCall(grpc.RpcError):
    """What a failed grpcio call looks like: code, details and trailers."""

    def __init__(self, code: grpc.StatusCode, message: str, status=None) -> None:  # type: ignore[no-untyped-def]
        self._code, self._message = code, message
        self._trailers = (("grpc-status-details-bin", status.SerializeToString()),) if status else ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self):  # type: ignore[no-untyped-def]
        return self._trailers


def test_rich_details_are_parsed_from_the_trailer() -> None:
    status = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT,
        message="connection_id is required",
        details=[
            packed(error_details_pb2.ErrorInfo(reason="INVALID_ARGUMENT", domain="streamer.v1",
                                               metadata={"field": "connection_id"})),
            packed(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field="connection_id", description="is required"),
                error_details_pb2.BadRequest.FieldViolation(field="payload.json", description="no kind set"),
            ])),
        ],
    )

    error = StreamerError.from_rpc_error(FakeCall(grpc.StatusCode.INVALID_ARGUMENT, status.message, status))

    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "connection_id is required"
    assert (error.reason, error.domain, error.metadata) == ("INVALID_ARGUMENT", "streamer.v1", {"field": "connection_id"})
    assert error.field_violations == [("connection_id", "is required"), ("payload.json", "no kind set")]
    assert error.retry_delay is None
    assert "INVALID_ARGUMENT" in str(error)


def test_retry_info_gives_the_delay_in_seconds() -> None:
    status = status_pb2.Status(
        code=code_pb2.UNAVAILABLE, message="store unavailable",
        details=[
            packed(error_details_pb2.ErrorInfo(reason="UNAVAILABLE", domain="streamer.v1")),
            packed(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1, nanos=500_000_000))),
        ],
    )

    error = StreamerError.from_rpc_error(FakeCall(grpc.StatusCode.UNAVAILABLE, status.message, status))

    assert error.reason == "UNAVAILABLE"
    assert error.retry_delay == 1.5
    assert StreamerError.from_status(status).retry_delay == 1.5
    assert StreamerError.from_status(status).code is grpc.StatusCode.UNAVAILABLE


def test_details_whose_message_differs_still_count() -> None:
    # grpc-status refuses a Status that disagrees with the call; its details are kept anyway.
    status = status_pb2.Status(code=code_pb2.NOT_FOUND, message="other words",
                               details=[packed(error_details_pb2.ErrorInfo(reason="REQUEST_NOT_FOUND"))])

    error = StreamerError.from_rpc_error(FakeCall(grpc.StatusCode.NOT_FOUND, "request not found", status))

    assert error.message == "request not found"
    assert error.reason == "REQUEST_NOT_FOUND"


def test_an_error_without_details_has_no_reason() -> None:
    error = StreamerError.from_rpc_error(FakeCall(grpc.StatusCode.NOT_FOUND, "no such connection"))

    assert (error.code, error.message) == (grpc.StatusCode.NOT_FOUND, "no such connection")
    assert (error.reason, error.domain, error.metadata, error.field_violations, error.retry_delay) == (
        None, None, {}, [], None)
    assert isinstance(error, grpc.RpcError)

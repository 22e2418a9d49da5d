"""DependencyFailed: a failed downstream call named by who failed doing what, judged by the predicates as
the call itself is, with its code mapped and its rich details passed on."""

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from fabric.errors import (
    DependencyFailed,
    InvalidArgument,
    Overloaded,
    code_of,
    is_behind,
    is_caller_fault,
    is_dependency_failure,
    is_invalid_request,
    leaves_out,
    to_status,
)


def failed_call(code: grpc.StatusCode, details: str = "boom", status: grpc.Status | None = None):
    """A failed call as grpc.aio raises it, trailing the rich status `status` when given."""
    trailing = grpc.aio.Metadata(*status.trailing_metadata) if status else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=details)


def unpacked(status: grpc.Status, kind):
    """The details of type `kind` in a status as a handler reports it."""
    (key, value), = status.trailing_metadata
    found = []
    for detail in status_pb2.Status.FromString(value).details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            found.append(message)
    return found


PREDICATES = [code_of, is_caller_fault, is_invalid_request, leaves_out, is_behind, is_dependency_failure]


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK], ids=lambda c: c.name)
def test_a_wrapped_call_is_judged_exactly_as_the_call_itself(code):
    call = failed_call(code)
    wrapped = DependencyFailed(call, "shard 1", "Search", "127.0.0.1:50060")
    assert [p(wrapped) for p in PREDICATES] == [p(call) for p in PREDICATES]


def test_the_message_names_the_dependency_and_the_method_and_the_code_passes_through_or_becomes_unavailable():
    slow = DependencyFailed(failed_call(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
                            "shard 1", "Search", "127.0.0.1:50060")
    assert slow.message == "shard 1 Search (127.0.0.1:50060): DEADLINE_EXCEEDED: Deadline Exceeded"
    assert to_status(slow, "router").code is grpc.StatusCode.DEADLINE_EXCEEDED
    down = DependencyFailed(failed_call(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"),
                            "embedder", "Embed")
    assert to_status(down, "router").details == "embedder Embed: UNAVAILABLE: failed to connect to all addresses"
    broken = DependencyFailed(failed_call(grpc.StatusCode.INTERNAL, "internal error: KeyError: 'x'"),
                              "generator", "Generate")
    status = to_status(broken, "router")
    assert status.code is grpc.StatusCode.UNAVAILABLE  # the dependency's bug is not ours
    assert status.details == "generator Generate: INTERNAL: internal error: KeyError: 'x'"
    assert "router" not in status.details


def test_the_dependencys_rich_details_survive_the_hop():
    busy = failed_call(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", to_status(Overloaded("busy", retry_after_s=2.5)))
    status = to_status(DependencyFailed(busy, "generator", "Generate"), "router")
    assert status.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [r.retry_delay.ToMilliseconds() for r in unpacked(status, error_details_pb2.RetryInfo)] == [2500]
    refused = failed_call(grpc.StatusCode.INVALID_ARGUMENT, "k: too big", to_status(InvalidArgument("k", "too big")))
    status = to_status(DependencyFailed(refused, "shard 0", "Search", "a:1"))
    (bad,) = unpacked(status, error_details_pb2.BadRequest)
    assert bad.field_violations[0].field == "k"


def test_an_unnamed_failed_call_still_maps_without_the_callers_own_name():
    busy = failed_call(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", to_status(Overloaded("busy", retry_after_s=1)))
    status = to_status(busy, "router")
    assert status.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status.details == "a dependency call failed: RESOURCE_EXHAUSTED: busy"
    assert len(unpacked(status, error_details_pb2.RetryInfo)) == 1
    assert to_status(failed_call(grpc.StatusCode.UNKNOWN), "router").code is grpc.StatusCode.UNAVAILABLE

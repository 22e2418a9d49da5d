"""Domain errors and the one table that maps them to gRPC status codes.

Service code raises these; the server interceptor turns them into statuses with
rich details (field violations, retry hints) so callers can tell what to do.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


class RagloomError(Exception):
    """Base of every error a service reports to its caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def details(self) -> list:
        """Extra google.rpc error details packed into the status."""
        return []


class InvalidArgument(RagloomError):
    """The request is malformed; retrying it unchanged cannot succeed."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.description = message

    def details(self) -> list:
        violation = error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.description)
        return [error_details_pb2.BadRequest(field_violations=[violation])]


class NotFound(RagloomError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(RagloomError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(RagloomError):
    """This server cannot do what was asked (a generator backend that cannot score, say)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Overloaded(RagloomError):
    """Too much work in flight; the caller should back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def details(self) -> list:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(self.retry_after_s * 1000))
        return [error_details_pb2.RetryInfo(retry_delay=delay)]


class DiskFull(RagloomError):
    """The disk holding a service's data is full: its writes fail until someone frees space, so the
    message says which disk; retrying soon only repeats the refusal."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(RagloomError):
    """A dependency is down or unreachable; retrying later may succeed."""

    code = grpc.StatusCode.UNAVAILABLE


class Behind(RagloomError):
    """A replica has not yet applied the writes a read asked to see; another replica, or a moment later, may
    have. Not a sign of ill health: it must not count against the replica."""

    code = grpc.StatusCode.ABORTED


class DeadlineExceeded(RagloomError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDenied(RagloomError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(RagloomError):
    """The call carries no identity this service can believe."""

    code = grpc.StatusCode.UNAUTHENTICATED


# Who is at fault when a call fails: decided here, once, for every caller (failover, circuit
# breakers, partial results, the status passed on).

#: The request itself was refused: the dependency is healthy, and another replica would refuse it too.
CALLER_FAULTS = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.CANCELLED,
})

# Codes of a failed downstream call that mean the same to our caller and pass through unchanged; any
# other (INTERNAL, UNKNOWN, ...) is the dependency's fault, reported as UNAVAILABLE.
_PASS_THROUGH = CALLER_FAULTS | {
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


class DependencyFailed(RagloomError):
    """A call to another service failed. The message names the dependency and the operation (a user
    reading "router call failed" cannot tell which of the router's dependencies broke); the code passes
    through when it means the same to our caller, else UNAVAILABLE; the dependency's rich details (retry
    hints, field violations) go on to our caller. The predicates below judge it by the code the
    dependency answered (`downstream`), as they would the failed call itself."""

    def __init__(self, error: grpc.aio.AioRpcError, dependency: str = "", method: str = "", target: str = ""):
        self.downstream: grpc.StatusCode = error.code()
        who = " ".join(filter(None, [dependency, method, target and f"({target})"])) or "a dependency call failed"
        super().__init__(f"{who}: {self.downstream.name}: {error.details() or 'no details'}")
        self.code = self.downstream if self.downstream in _PASS_THROUGH else grpc.StatusCode.UNAVAILABLE
        self.dependency, self.method, self.target = dependency, method, target
        self._packed = _packed_details(error)

    def details(self) -> list:
        return list(self._packed)


def _packed_details(error: grpc.aio.AioRpcError) -> list[any_pb2.Any]:
    """The google.rpc details a failed call's status carried (its `grpc-status-details-bin` trailer), still
    packed. Read directly, not by rpc_status.from_call: that refuses a status whose message a proxy changed."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            try:
                return list(status_pb2.Status.FromString(value).details)
            except DecodeError:
                return []
    return []


def code_of(exc: BaseException) -> grpc.StatusCode | None:
    """The status code an error carries: a domain error's, or a failed call's (the dependency's own, also
    when wrapped in DependencyFailed); None for anything else (a bug)."""
    if isinstance(exc, DependencyFailed):
        return exc.downstream
    if isinstance(exc, RagloomError):
        return exc.code
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code()
    return None


def is_caller_fault(exc: BaseException) -> bool:
    """The request was refused as it stands: retrying it, elsewhere or later, cannot help."""
    return code_of(exc) in CALLER_FAULTS


def is_invalid_request(exc: BaseException) -> bool:
    """The request's own content is refused: every replica of every shard would refuse it alike."""
    return code_of(exc) is grpc.StatusCode.INVALID_ARGUMENT


def leaves_out(exc: BaseException) -> bool:
    """One part of a scatter-gather failed on its own (down, slow, refused, cancelled): the result
    goes on without it, marked partial. A bug, or a request that is itself invalid, fails it whole."""
    return code_of(exc) is not None and not is_invalid_request(exc)


def is_behind(exc: BaseException) -> bool:
    """A replica said it has not caught up with what the read asked for (healthy, only behind)."""
    return code_of(exc) is grpc.StatusCode.ABORTED


def is_dependency_failure(exc: BaseException) -> bool:
    """A dependency could not answer (down, overloaded, too slow, broken): fail over to another replica,
    count it against the dependency's health, leave it out of a partial result."""
    code = code_of(exc)
    if isinstance(exc, RagloomError) and not isinstance(exc, DependencyFailed):
        return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED)
    return code is not None and code not in CALLER_FAULTS


def to_status(exc: BaseException, service: str = "") -> grpc.Status:
    """The rich status a handler failing with `exc` reports. `service` (the handler's own) is not put in
    the message: a failed call names the dependency, which a client wrapping it in DependencyFailed knows."""
    return rpc_status.to_status(status_proto(exc))


def status_proto(exc: BaseException) -> status_pb2.Status:
    """`exc` as a google.rpc.Status: its code, message and details."""
    if isinstance(exc, grpc.aio.AioRpcError):
        exc = DependencyFailed(exc)  # a call nobody named: its code and details at least pass on
    if isinstance(exc, RagloomError):
        code, message, details = exc.code, exc.message, exc.details()
    else:
        code, message, details = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", []
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    for detail in details:
        if isinstance(detail, any_pb2.Any):  # a dependency's, already packed
            status.details.append(detail)
        else:
            status.details.add().Pack(detail)
    return status

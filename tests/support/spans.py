"""An OTLP/gRPC trace receiver kept in memory, for tests and benchmarks."""

from __future__ import annotations


class SpanSink:
    """A minimal OTLP/gRPC trace receiver: the spans every exporter sent it, in arrival order."""

    def __init__(self, port: int):
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        sink = self
        self.spans: list = []  # (service name, span)

        class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                for resource_spans in request.resource_spans:
                    service = next((a.value.string_value for a in resource_spans.resource.attributes
                                    if a.key == "service.name"), "")
                    for scope in resource_spans.scope_spans:
                        sink.spans.extend((service, span) for span in scope.spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Receiver(), self._server)
        self._server.add_insecure_port(f"127.0.0.1:{port}")
        self.endpoint = f"http://127.0.0.1:{port}"

    def __enter__(self) -> "SpanSink":
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop(0)

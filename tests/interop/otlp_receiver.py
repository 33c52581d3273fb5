#!/usr/bin/env python3
"""A small OpenTelemetry OTLP receiver that records what it is sent, for tests.

    python3 otlp_receiver.py [--grpc-port N] [--http-port N] [--out FILE]
    python3 otlp_receiver.py --self-test

Built on the official OTLP protobuf definitions (the `opentelemetry-proto`
package) and `grpcio`, pinned in tests/requirements.txt. It listens on
127.0.0.1 for

  * OTLP/gRPC: MetricsService/Export and TraceService/Export;
  * OTLP/HTTP with binary protobuf: POST /v1/metrics and /v1/traces,
    content-type application/x-protobuf (gzip content-encoding accepted).

A port of 0 (the default) is an ephemeral one: the ports are printed at
start-up, one line per listener, before anything is served:

    listening grpc 127.0.0.1:PORT
    listening http 127.0.0.1:PORT

Every export request is written to --out (appended, flushed per line) as
one JSON line:

    {"signal": "metrics"|"traces", "transport": "grpc"|"http",
     "headers": {lower-cased name: value}, "body": {...}}

where "body" is the request as `MessageToDict(preserving_proto_field_name=
True)` gives it (so ids are base64, 64-bit integers strings), and "headers"
holds the HTTP request headers or the gRPC metadata, so that a test can
check that configured headers (authorization, ...) arrived. It runs until
SIGTERM or SIGINT.

--self-test starts a receiver, exports one metric and one span to it over
both gRPC and HTTP with the raw protobuf messages, checks all four were
recorded, and exits 0 (or 1 with what was wrong).
"""

import argparse
import gzip
import json
import signal
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics_pb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as metrics_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as trace_grpc
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

HOST = "127.0.0.1"

# signal -> (request type, response type), and the OTLP/HTTP path of each.
SIGNALS = {
    "metrics": (metrics_pb.ExportMetricsServiceRequest, metrics_pb.ExportMetricsServiceResponse),
    "traces": (trace_pb.ExportTraceServiceRequest, trace_pb.ExportTraceServiceResponse),
}
HTTP_PATHS = {"/v1/metrics": "metrics", "/v1/traces": "traces"}

# Largest HTTP body read: far above what one export batch of the gateway
# holds, and a bound on what a broken client makes this process allocate.
MAX_HTTP_BODY = 16 * 1024 * 1024


class Recorder:
    """Every export request received, in memory and as JSON lines in a file.

    # Concurrency
    Called from gRPC's worker threads and the HTTP server's request threads;
    one lock keeps lines whole and `records` consistent.
    """

    def __init__(self, out_path):
        self.records = []
        self._lock = threading.Lock()
        self._out = open(out_path, "a", encoding="utf-8") if out_path else None

    def record(self, sig, transport, headers, request):
        rec = {
            "signal": sig,
            "transport": transport,
            "headers": headers,
            "body": MessageToDict(request, preserving_proto_field_name=True),
        }
        with self._lock:
            self.records.append(rec)
            if self._out:
                self._out.write(json.dumps(rec, sort_keys=True) + "\n")
                self._out.flush()


def grpc_headers(context):
    """gRPC metadata as a dict; binary (-bin) values as their hex."""
    return {
        k.lower(): v.hex() if isinstance(v, bytes) else v
        for k, v in context.invocation_metadata()
    }


class MetricsServicer(metrics_grpc.MetricsServiceServicer):
    def __init__(self, recorder):
        self.recorder = recorder

    def Export(self, request, context):
        self.recorder.record("metrics", "grpc", grpc_headers(context), request)
        return metrics_pb.ExportMetricsServiceResponse()


class TraceServicer(trace_grpc.TraceServiceServicer):
    def __init__(self, recorder):
        self.recorder = recorder

    def Export(self, request, context):
        self.recorder.record("traces", "grpc", grpc_headers(context), request)
        return trace_pb.ExportTraceServiceResponse()


def http_handler(recorder):
    """An OTLP/HTTP (binary protobuf) request handler class for `recorder`."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as exporters expect

        def do_POST(self):
            sig = HTTP_PATHS.get(self.path.split("?")[0])
            length = int(self.headers.get("content-length") or 0)
            if length > MAX_HTTP_BODY:
                return self.reply(413, b"body too large")
            body = self.rfile.read(length)
            if sig is None:
                return self.reply(404, b"not an OTLP path")
            ctype = (self.headers.get("content-type") or "").split(";")[0].strip()
            if ctype != "application/x-protobuf":
                return self.reply(415, b"only application/x-protobuf")
            request_type, response_type = SIGNALS[sig]
            try:
                if (self.headers.get("content-encoding") or "").lower() == "gzip":
                    body = gzip.decompress(body)
                request = request_type.FromString(body)
            except (OSError, EOFError, DecodeError) as e:
                return self.reply(400, f"bad body: {e}".encode())
            headers = {k.lower(): v for k, v in self.headers.items()}
            recorder.record(sig, "http", headers, request)
            self.reply(200, response_type().SerializeToString(), "application/x-protobuf")

        def reply(self, code, body, ctype="text/plain"):
            self.send_response(code)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass  # stdout is for the listening lines; stderr stays quiet

    return Handler


class Receiver:
    """Both listeners, started; `stop()` ends them."""

    def __init__(self, recorder, grpc_port=0, http_port=0):
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        metrics_grpc.add_MetricsServiceServicer_to_server(MetricsServicer(recorder), self.grpc)
        trace_grpc.add_TraceServiceServicer_to_server(TraceServicer(recorder), self.grpc)
        self.grpc_port = self.grpc.add_insecure_port(f"{HOST}:{grpc_port}")
        if self.grpc_port == 0:
            raise OSError(f"cannot listen for gRPC on {HOST}:{grpc_port}")
        self.http = ThreadingHTTPServer((HOST, http_port), http_handler(recorder))
        self.http.daemon_threads = True
        self.http_port = self.http.server_address[1]
        self.grpc.start()
        self._http_thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self._http_thread.start()

    def stop(self):
        self.http.shutdown()
        self.http.server_close()
        self.grpc.stop(grace=1).wait()


def self_test():
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/otlp.jsonl"
        receiver = Receiver(Recorder(out))
        try:
            auth = "Bearer self-test"
            gauge = metrics_pb2.Metric(name="selftest_gauge", unit="1")
            gauge.gauge.data_points.add(as_int=7, time_unix_nano=1)
            metrics_req = metrics_pb.ExportMetricsServiceRequest()
            metrics_req.resource_metrics.add().scope_metrics.add().metrics.append(gauge)
            span = trace_pb2.Span(
                name="selftest_span", trace_id=bytes(range(16)), span_id=bytes(range(8)),
                start_time_unix_nano=1, end_time_unix_nano=2,
            )
            trace_req = trace_pb.ExportTraceServiceRequest()
            trace_req.resource_spans.add().scope_spans.add().spans.append(span)

            with grpc.insecure_channel(f"{HOST}:{receiver.grpc_port}") as ch:
                md = [("authorization", auth)]
                metrics_grpc.MetricsServiceStub(ch).Export(metrics_req, metadata=md, timeout=10)
                trace_grpc.TraceServiceStub(ch).Export(trace_req, metadata=md, timeout=10)
            for path, req in (("/v1/metrics", metrics_req), ("/v1/traces", trace_req)):
                post = urllib.request.Request(
                    f"http://{HOST}:{receiver.http_port}{path}",
                    data=gzip.compress(req.SerializeToString()),
                    headers={"content-type": "application/x-protobuf",
                             "content-encoding": "gzip", "authorization": auth},
                )
                with urllib.request.urlopen(post, timeout=10) as resp:
                    if resp.status != 200:
                        problems.append(f"POST {path}: HTTP {resp.status}")
            # A body of another content type is refused, and not recorded.
            post = urllib.request.Request(
                f"http://{HOST}:{receiver.http_port}/v1/traces", data=b"{}",
                headers={"content-type": "application/json"},
            )
            try:
                urllib.request.urlopen(post, timeout=10)
                problems.append("a JSON body was accepted")
            except urllib.error.HTTPError as e:
                if e.code != 415:
                    problems.append(f"a JSON body: HTTP {e.code}, not 415")
        finally:
            receiver.stop()

        with open(out, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f]
    seen = {(r["signal"], r["transport"]): r for r in lines}
    if len(lines) != 4 or len(seen) != 4:
        problems.append(f"expected 4 distinct records, got {len(lines)}: {sorted(seen)}")
    for (sig, transport), r in sorted(seen.items()):
        if r["headers"].get("authorization") != auth:
            problems.append(f"{sig}/{transport}: authorization {r['headers'].get('authorization')!r}")
        if sig == "metrics":
            got = r["body"]["resource_metrics"][0]["scope_metrics"][0]["metrics"][0]
            if got["name"] != "selftest_gauge" or got["gauge"]["data_points"][0]["as_int"] != "7":
                problems.append(f"metrics/{transport}: {got}")
        else:
            got = r["body"]["resource_spans"][0]["scope_spans"][0]["spans"][0]
            if got["name"] != "selftest_span":
                problems.append(f"traces/{transport}: {got}")
    for p in problems:
        print(f"self-test: {p}", file=sys.stderr)
    print("self-test " + ("FAILED" if problems else "OK"))
    return 1 if problems else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grpc-port", type=int, default=0, help="OTLP/gRPC port (0: ephemeral)")
    p.add_argument("--http-port", type=int, default=0, help="OTLP/HTTP port (0: ephemeral)")
    p.add_argument("--out", metavar="FILE", help="append one JSON line per export request")
    p.add_argument("--self-test", action="store_true", help="test this receiver and exit")
    args = p.parse_args()
    if args.self_test:
        return self_test()

    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    receiver = Receiver(Recorder(args.out), args.grpc_port, args.http_port)
    print(f"listening grpc {HOST}:{receiver.grpc_port}", flush=True)
    print(f"listening http {HOST}:{receiver.http_port}", flush=True)
    stop.wait()
    receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

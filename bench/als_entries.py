"""Cost per access log entry in the control plane: entries per second one core parses
and records (meshxl.xds.accesslog into meshxl.xds.upstream).

Run: ``.venv/bin/python bench/als_entries.py [--quick]``

Messages as Envoy sends them (100 HTTP entries each, with the fields Envoy fills in:
addresses, timings, response code, a ``grpc-status`` trailer on some, over 50 upstream
hosts of 5 clusters) are encoded once; then, timed on one core, each message is decoded
(``StreamAccessLogsMessage.FromString``, what gRPC does before the handler) and its
entries recorded (``AccessLogReceiver.receive``). Beside it, in the same run: decoding
alone. Prints entries per second for both and the microseconds per entry. In memory,
no I/O; bounded in count.
"""

from __future__ import annotations

import argparse
import random
import time

from benchlib import env_info, quick_requested
from envoy.data.accesslog.v3.accesslog_pb2 import AccessLogType, HTTPAccessLogEntry
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage

from meshxl.xds import accesslog
from meshxl.xds.accesslog import AccessLogReceiver, _Stream
from meshxl.xds.upstream import UpstreamSignals

PER_MESSAGE = 100


def entry(rng: random.Random, cluster: int, host: int) -> HTTPAccessLogEntry:
    e = HTTPAccessLogEntry()
    c = e.common_properties
    c.downstream_remote_address.socket_address.address = "10.1.2.3"
    c.downstream_remote_address.socket_address.port_value = rng.randrange(30000, 60000)
    c.downstream_local_address.socket_address.address = "10.1.2.4"
    c.downstream_local_address.socket_address.port_value = 8080
    c.upstream_remote_address.socket_address.address = f"10.0.{cluster}.{host}"
    c.upstream_remote_address.socket_address.port_value = 8080
    c.upstream_local_address.socket_address.address = "10.1.2.4"
    c.upstream_local_address.socket_address.port_value = rng.randrange(30000, 60000)
    c.upstream_cluster = f"svc-{cluster}"
    c.start_time.FromNanoseconds(time.time_ns())
    rx = rng.lognormvariate(-5, 1)
    c.time_to_last_rx_byte.FromNanoseconds(20_000)
    c.time_to_first_upstream_tx_byte.FromNanoseconds(50_000)
    c.time_to_last_upstream_tx_byte.FromNanoseconds(60_000)
    c.time_to_first_upstream_rx_byte.FromNanoseconds(round(rx * 1e9))
    c.time_to_last_upstream_rx_byte.FromNanoseconds(round(rx * 1e9) + 30_000)
    c.time_to_first_downstream_tx_byte.FromNanoseconds(round(rx * 1e9) + 40_000)
    c.time_to_last_downstream_tx_byte.FromNanoseconds(round(rx * 1e9) + 70_000)
    c.access_log_type = AccessLogType.UpstreamEnd
    c.route_name = "r"
    e.protocol_version = HTTPAccessLogEntry.HTTP11
    e.request.request_method = 1  # GET
    e.request.path = f"/api/items/{rng.randrange(1000)}"
    e.request.authority = f"svc-{cluster}.local"
    e.request.request_id = f"{rng.getrandbits(128):032x}"
    e.response.response_code.value = 503 if rng.random() < 0.02 else 200
    e.response.response_body_bytes = 512
    if rng.random() < 0.3:
        e.response.response_trailers["grpc-status"] = "0"
    return e


def messages(count: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        m = StreamAccessLogsMessage()
        m.http_logs.log_entry.extend(entry(rng, rng.randrange(5), rng.randrange(10))
                                     for _ in range(PER_MESSAGE))
        out.append(m.SerializeToString())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages (< ~5 s)")
    args = parser.parse_args()
    count = 200 if quick_requested(args.quick) else 2000
    encoded = messages(count)
    entries = count * PER_MESSAGE
    print(f"{env_info()}\n{entries:,} entries in {count:,} messages of {PER_MESSAGE}, "
          f"{sum(map(len, encoded)) / entries:.0f} bytes per entry encoded")

    started = time.process_time()
    for data in encoded:
        StreamAccessLogsMessage.FromString(data)
    decode = time.process_time() - started

    signals = UpstreamSignals()
    receiver = AccessLogReceiver(signals)
    accesslog.ENTRIES_PER_SECOND = 10**12  # the per-stream budget is not what is measured
    stream = _Stream(time.monotonic())
    started = time.process_time()
    for data in encoded:
        receiver.receive(stream, StreamAccessLogsMessage.FromString(data))
    total = time.process_time() - started
    assert receiver.counts["recorded"] == entries, receiver.counts

    print(f"decode only:       {entries / decode:>10,.0f} entries/s  "
          f"({decode / entries * 1e6:.2f} us per entry)")
    print(f"decode + record:   {entries / total:>10,.0f} entries/s  "
          f"({total / entries * 1e6:.2f} us per entry, one core)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

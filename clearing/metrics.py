"""The clearing's Prometheus metrics: a registry of its own per service (no process-wide state), served over
HTTP on 127.0.0.1 by ``clearing serve --metrics-port N``.

The counters and the queue depth are read from the service when scraped (its ``Counts``), so nothing is counted
twice; the two histograms are observed as batches commit and answers go out. Every metric has the label
``city``. Names (docs/clearing-choices.md, "Metrics"; ``yikatong load`` scrapes them):

- ``yikatong_clearing_records_in_total``: records taken from MQTT (a message that is no record list counts one)
- ``yikatong_clearing_records_stored_total``: records committed to the ledger (duplicates not included)
- ``yikatong_clearing_records_quarantined_total``: records and messages committed to the quarantine
- ``yikatong_clearing_records_forwarded_total``: records forwarded to their issuer's clearing (resends included)
- ``yikatong_clearing_bulk_fallbacks_total``: batches the bulk insert refused, stored through the statement path
- ``yikatong_clearing_batch_commit_seconds``: how long each batch's storage took, its one transaction
- ``yikatong_clearing_queue_depth``: messages received and not yet taken into a batch
- ``yikatong_clearing_ack_lag_seconds``: from a message's receipt to its batch's answers being published
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "yikatong_clearing_"
# seconds: a commit of one small batch takes milliseconds, one of a whole backlog a few seconds
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# seconds: a terminal waits for its ack; past ~10 s it sends again
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class Counts:
    """What the service has counted so far, as of one moment."""

    records_in: int
    stored: int
    quarantined: int
    forwarded: int
    queue_depth: int
    bulk_fallbacks: int = 0


class _CountsCollector(Collector):
    """The counters and the gauge, read from the service at each scrape."""

    def __init__(self, city: str, counts: Callable[[], Counts]) -> None:
        self.city = city
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        now = self.counts()
        for name, text, value in (
            ("records_in", "Records taken from MQTT (a message that is no record list counts one).", now.records_in),
            ("records_stored", "Records committed to the ledger (duplicates not included).", now.stored),
            ("records_quarantined", "Records and messages committed to the quarantine.", now.quarantined),
            ("records_forwarded", "Records forwarded to their issuer's clearing (resends included).", now.forwarded),
            (
                "bulk_fallbacks",
                "Batches the bulk insert refused (stored through the statement path).",
                now.bulk_fallbacks,
            ),
        ):
            counter = CounterMetricFamily(PREFIX + name, text, labels=["city"])
            counter.add_metric([self.city], value)
            yield counter
        depth = GaugeMetricFamily(
            PREFIX + "queue_depth", "Messages received, not yet taken into a batch.", labels=["city"]
        )
        depth.add_metric([self.city], now.queue_depth)
        yield depth


class ClearingMetrics:
    """The metrics of one clearing service, in their own registry."""

    def __init__(self, city: str, counts: Callable[[], Counts]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_CountsCollector(city, counts))
        self.commit_seconds = Histogram(
            PREFIX + "batch_commit_seconds",
            "Seconds each batch's storage took (one transaction).",
            ["city"],
            registry=self.registry,
            buckets=COMMIT_BUCKETS,
        ).labels(city)
        self.ack_lag = Histogram(
            PREFIX + "ack_lag_seconds",
            "Seconds from a message's receipt to its batch's answers being published.",
            ["city"],
            registry=self.registry,
            buckets=LAG_BUCKETS,
        ).labels(city)

    def serve(self, port: int) -> MetricsServer:
        """Serve the metrics on http://127.0.0.1:``port``/metrics (0: a free port, see ``MetricsServer.port``)."""
        server, thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        return MetricsServer(server, thread)


@dataclass(frozen=True)
class MetricsServer:
    """The metrics' HTTP server (a daemon thread); ``close`` stops it."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self.server.server_port)

    def close(self) -> None:
        """Stop serving and free the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

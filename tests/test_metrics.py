"""The clearing's Prometheus metrics: a real `yikatong clearing serve --metrics-port 0` on a private Mosquitto, fed
by an outside client (mosquitto_pub), scraped over HTTP and parsed with prometheus_client's own text parser; and
each service's metrics in a registry of its own."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

from clearing_corpus import CITY, TERMINAL
from clearing_support import fresh_db, serve_process, signed_records
from mqtt_support import eventually, mosquitto_pub_lines, private_mosquitto
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from clearing.metrics import ClearingMetrics, Counts
from terminals.messages import batch_payload

Scrape = dict[str, dict[tuple[tuple[str, str], ...], float]]  # sample name -> labels -> value


def scrape(url: str) -> Scrape:
    """Every sample of the endpoint, by name and labels."""
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    samples: Scrape = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def of_city(samples: Scrape, name: str, city: str = CITY, **labels: str) -> float:
    return samples[name][tuple(sorted({"city": city, **labels}.items()))]


def _forged(doc: str) -> str:
    fields = json.loads(doc)
    fields["tac"] = "00000000" if fields["tac"] != "00000000" else "11111111"
    return json.dumps(fields, separators=(",", ":"))


async def test_metrics_endpoint_counts_what_was_sent_stored_quarantined_and_forwarded(tmp_path: Path) -> None:
    """30 records (6 of another city's cards, forwarded) in 3 batches, 4 forged single records and one junk
    message: the scraped counters say exactly that, the histograms saw every batch and message, nothing waits."""
    records = [r.to_json() for r in signed_records(34, CITY, TERMINAL, issuers=(CITY, CITY, CITY, CITY, "4510"))]
    good, forged = records[:30], [_forged(doc) for doc in records[30:]]
    foreign = sum(1 for doc in good if json.loads(doc)["card"]["issuer"] == "4510")
    assert foreign > 0
    messages = [batch_payload(good[i : i + 10]).encode() for i in range(0, 30, 10)]
    messages += [doc.encode() for doc in forged] + [b"not json at all"]
    with private_mosquitto(tmp_path) as broker:
        async with fresh_db("sqlite", tmp_path) as db:
            with serve_process(
                broker.url, db, CITY, "metrics", "--metrics-port", "0", "--forward-interval", "3600"
            ) as served:
                found = re.search(r"metrics on (http://127\.0\.0\.1:(\d+)/metrics)", served.log.read_text())
                assert found, served.log.read_text()
                url = found[1]
                before = scrape(url)
                assert of_city(before, "yikatong_clearing_records_in_total") == 0
                await asyncio.to_thread(
                    mosquitto_pub_lines, broker.port, f"yikatong/{CITY}/txn/{TERMINAL}", messages, tmp_path
                )
                samples: Scrape = {}

                def all_answered() -> bool:
                    nonlocal samples
                    samples = scrape(url)
                    return of_city(samples, "yikatong_clearing_ack_lag_seconds_count") == len(messages)

                await eventually(all_answered)
    assert of_city(samples, "yikatong_clearing_records_in_total") == 30 + 4 + 1
    assert of_city(samples, "yikatong_clearing_records_stored_total") == 30
    assert of_city(samples, "yikatong_clearing_records_quarantined_total") == 4 + 1
    assert of_city(samples, "yikatong_clearing_records_forwarded_total") == foreign
    assert of_city(samples, "yikatong_clearing_queue_depth") == 0
    assert of_city(samples, "yikatong_clearing_bulk_fallbacks_total") == 0  # 10-record batches: no bulk insert
    commits = of_city(samples, "yikatong_clearing_batch_commit_seconds_count")
    assert 1 <= commits <= len(messages)
    assert of_city(samples, "yikatong_clearing_batch_commit_seconds_bucket", le="+Inf") == commits
    assert of_city(samples, "yikatong_clearing_ack_lag_seconds_bucket", le="+Inf") == len(messages)
    assert 0 < of_city(samples, "yikatong_clearing_ack_lag_seconds_sum") < 60 * len(messages)


def test_each_service_has_its_own_registry() -> None:
    """Two services' metrics in one process: each endpoint shows its own numbers, the process-wide registry none."""
    first = ClearingMetrics("4510", lambda: Counts(7, 5, 2, 1, 3, 4))
    second = ClearingMetrics("4560", lambda: Counts(1, 1, 0, 0, 0))
    first.commit_seconds.observe(0.02)
    servers = [first.serve(0), second.serve(0)]
    try:
        one, two = (scrape(f"http://127.0.0.1:{server.port}/metrics") for server in servers)
    finally:
        for server in servers:
            server.close()
    assert of_city(one, "yikatong_clearing_records_in_total", "4510") == 7
    assert of_city(one, "yikatong_clearing_records_quarantined_total", "4510") == 2
    assert of_city(one, "yikatong_clearing_queue_depth", "4510") == 3
    assert of_city(one, "yikatong_clearing_bulk_fallbacks_total", "4510") == 4
    assert of_city(two, "yikatong_clearing_bulk_fallbacks_total", "4560") == 0
    assert of_city(one, "yikatong_clearing_batch_commit_seconds_count", "4510") == 1
    assert of_city(two, "yikatong_clearing_records_in_total", "4560") == 1
    assert of_city(two, "yikatong_clearing_batch_commit_seconds_count", "4560") == 0
    assert all("4510" not in str(labels) for labels in two.values())
    assert not any(family.name.startswith("yikatong_") for family in REGISTRY.collect())

"""The pipe on a 3-node NATS cluster (issue 21), any node may die: terminals spread over the three nodes' MQTT
listeners, two clearing workers per city on different nodes sharing their city's JetStream stream, and during
the run one node SIGKILLed and restarted and one worker SIGKILLed. Afterwards the ledger holds every record the
terminals made exactly once, every outbox is empty, every forward was answered, and each worker stored a share.

The terminals are `yikatong load` processes (one per node, each its own terminals and cards, outboxes in state
files); the workers `yikatong clearing serve --jetstream` processes on one PostgreSQL database."""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path

import pytest
from clearing_support import ServeProcess, fresh_db, serve_process
from reliability_support import interop_check, ledger_view, read_outboxes, roster, start_load, tally, wait_for

from terminals.mqtt import BrokerUrl
from yikatong.nats_cluster import NatsCluster

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]

CITIES = ("4510", "4560", "4530")
ACK_WAIT = "3"  # seconds before the killed worker's unacked records go to the other worker


def stored_by(worker: ServeProcess) -> int:
    """The records a worker stored, by the last progress line it printed (it may have been SIGKILLed since)."""
    found = re.findall(r"clearing \d{4}: ([\d,]+) stored", worker.log.read_text())
    return int(found[-1].replace(",", "")) if found else 0


async def test_node_and_worker_killed_mid_run_lose_and_double_nothing(tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        cluster = stack.enter_context(NatsCluster(tmp_path / "cluster"))  # started, stopped after
        nodes = cluster.nodes
        db = await stack.enter_async_context(fresh_db("postgresql", tmp_path))
        jetstream = ",".join(cluster.nats_urls)
        workers: dict[tuple[str, str], ServeProcess] = {}
        for index, city in enumerate(CITIES):
            for offset, name in enumerate("ab"):
                node = nodes[(index + offset) % len(nodes)]  # a city's two workers on two different nodes
                workers[(city, name)] = stack.enter_context(
                    serve_process(
                        BrokerUrl.parse(node.mqtt_url), db, city, name, "--jetstream", jetstream, "--ack-wait", ACK_WAIT
                    )
                )
        loads = [
            stack.enter_context(
                start_load(
                    BrokerUrl.parse(node.mqtt_url),
                    tmp_path / f"state-{node.name}",
                    tmp_path / f"load-{node.name}",
                    terminals=3,
                    cities=",".join(CITIES),
                    rate=12,
                    duration=25,
                    seed=2100 + index,
                    cards=60,
                )
            )
            for index, node in enumerate(nodes)
        ]
        # every worker has a share before anything dies: the pulls spread the records, not the timing
        await wait_for(lambda: all(stored_by(w) > 0 for w in workers.values()), "every worker storing", 60)
        victim = nodes[1]
        cluster.kill(victim.name)  # a third of the terminals and two workers lose their MQTT node
        await asyncio.sleep(3)
        cluster.restart(victim.name)
        workers[("4510", "a")].kill()  # its records taken and not acked go to 4510 b after ACK_WAIT
        at_kill = stored_by(workers[("4510", "b")])
        summaries = [await load.finish(timeout=180) for load in loads]

        outboxes = [read_outboxes(load.state) for load in loads]
        assert all(o.queued == 0 and o.rejected == 0 for o in outboxes), [(o.queued, o.rejected) for o in outboxes]
        done = set().union(*(o.all() for o in outboxes))
        assert len(done) == sum(s["generated"] for s in summaries) > 0
        views = {city: await ledger_view(db, city) for city in CITIES}
        result = tally(done, views.values())
        result.check(result.line("3-node cluster, node and worker killed", sum(len(roster(x.state)) for x in loads)))
        assert interop_check(views) > 0
        assert all(not v.quarantine for v in views.values()), [v.quarantine[:3] for v in views.values()]
        shares = {key: stored_by(worker) for key, worker in workers.items()}
        assert all(count > 0 for count in shares.values()), shares
        assert shares[("4510", "b")] > at_kill, "4510 b carried on alone"
        print(result.line("3-node cluster", sum(len(roster(x.state)) for x in loads), f"worker shares {shares}"))

"""One hotlist for the whole network, end to end on Mosquitto with the real commands: ``yikatong clearing hotlist
add`` publishes an issuer's list, ``yikatong terminal tap --broker`` takes every issuer's retained list first and
refuses what it holds. A terminal offline for several versions catches up by snapshot, damaged messages are
refused and the old list kept, and a list of 200,000 cards arrives and is enforced.

Each test runs its own Mosquitto (the machine's binary, on a free port): every terminal follows every issuer's
retained list, so an issuer's list published on the shared broker would reach the other tests' terminals (and
theirs ours) while these run."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from clearing_support import serve_process
from mqtt_support import PrivateMosquitto, private_mosquitto
from support import yikatong

from terminals.hotlist import CardSet, encode_chunks
from terminals.messages import (
    CHUNK_SCHEMA,
    DELTA_SCHEMA,
    SNAPSHOT_SCHEMA,
    HotlistChunk,
    HotlistSnapshot,
    hotlist_chunk_topic,
    hotlist_delta_topic,
    hotlist_snapshot_topic,
)
from terminals.mqtt import BrokerUrl

JINAN, YANTAI, ZIBO = "4510", "4560", "4530"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateMosquitto]:
    folder = tmp_path / "mosquitto"
    folder.mkdir()
    with private_mosquitto(folder) as running:
        yield running


class Network:
    """An issuer's clearing database and the commands run against one broker."""

    def __init__(self, broker: PrivateMosquitto, folder: Path) -> None:
        self.url = str(broker.url)
        self.db = f"sqlite:///{folder / 'clearing.sqlite'}"
        self.folder = folder

    def card(self, name: str, city: str = JINAN) -> tuple[Path, str]:
        """A new CPU card of ``city``: its image file and serial."""
        image = self.folder / f"{name}.json"
        done = yikatong("card", "issue", "--city", city, "--alg", "sm4", "--balance", "9000", "--out", str(image))
        assert done.returncode == 0, done.stderr
        found = re.search(r"issued SM4 card ([0-9]{20})", done.stdout)
        assert found is not None, done.stdout
        return image, found[1]

    def copy(self, image: Path, name: str) -> Path:
        """Another image of the same card (a refusal blocks the card it was tapped with)."""
        return Path(shutil.copy(image, self.folder / f"{name}.json"))

    def hotlist(self, *cards: str, city: str = JINAN, extra: tuple[str, ...] = ()) -> str:
        done = yikatong(
            "clearing", "hotlist", "add", *cards, "--city", city, "--broker", self.url, "--db", self.db, *extra
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def tap(self, image: Path, city: str, state: str, wait: float = 10) -> subprocess.CompletedProcess[str]:
        return yikatong(
            "terminal",
            "tap",
            "--card",
            str(image),
            "--city",
            city,
            "--kind",
            "bus",
            "--fare",
            "100",
            "--state",
            str(self.folder / f"{state}.sqlite"),
            "--broker",
            self.url,
            "--hotlist-wait",
            f"{wait:g}",
        )

    def lists(self, state: str) -> list[str]:
        """The hotlist lines of a terminal's status."""
        done = yikatong("terminal", "status", "--state", str(self.folder / f"{state}.sqlite"))
        assert done.returncode == 0, done.stderr
        return re.findall(r"[0-9]{4} version [0-9]+, [0-9]+ card\(s\).*", done.stdout)

    def publish(self, topic: str, payload: str) -> None:
        """What an outsider (or a broken clearing) can publish: a retained message, with ``mosquitto_pub -r``."""
        port = self.url.rsplit(":", 1)[1]
        subprocess.run(["mosquitto_pub", "-p", port, "-t", topic, "-r", "-m", payload], check=True, timeout=10)


@pytest.fixture
def net(broker: PrivateMosquitto, tmp_path: Path) -> Network:
    return Network(broker, tmp_path)


def refused(tap: subprocess.CompletedProcess[str], issuer: str, version: int) -> bool:
    return tap.returncode == 1 and f"is hotlisted by {issuer} (list version {version})" in tap.stdout


def test_a_card_hotlisted_by_jinan_is_refused_at_the_terminals_of_yantai_and_zibo(net: Network) -> None:
    image, serial = net.card("jinan")
    before = net.tap(net.copy(image, "before"), ZIBO, "zibo")
    assert before.returncode == 0 and before.stdout.startswith("OK"), before.stdout + before.stderr
    assert "version 1" in net.hotlist(serial)
    for city, name in ((YANTAI, "yantai"), (ZIBO, "zibo")):
        tap = net.tap(net.copy(image, f"at-{name}"), city, name)
        assert refused(tap, JINAN, 1), tap.stdout + tap.stderr


def test_a_terminal_offline_for_three_versions_catches_up_by_snapshot(net: Network) -> None:
    first, *away = [net.card(f"card{n}") for n in range(5)]
    net.hotlist(first[1])
    assert refused(net.tap(first[0], YANTAI, "yantai"), JINAN, 1)  # the terminal holds version 1, then goes away
    for _, serial in away[:3]:  # versions 2-4: deltas on snapshot 1
        net.hotlist(serial)
    assert "new snapshot of version 5 (asked for)" in net.hotlist(away[3][1], extra=("--snapshot",))
    # the retained delta now starts at 5: version 1 catches up only from the snapshot
    for image, _ in away:
        assert refused(net.tap(image, YANTAI, "yantai"), JINAN, 5)
    assert net.lists("yantai")[0].startswith(f"{JINAN} version 5, 5 card(s)")


def test_a_damaged_snapshot_or_delta_is_refused_and_the_old_list_kept(net: Network) -> None:
    (listed, serial), (other, other_serial) = net.card("listed"), net.card("other")
    net.hotlist(serial)
    assert refused(net.tap(net.copy(listed, "first"), YANTAI, "yantai"), JINAN, 1)
    # version 2 would add the other card: a snapshot with its only chunk cut short, and a delta cut mid-JSON
    sha256, (data,) = encode_chunks(CardSet.of([serial, other_serial]))
    cut = base64.b64encode(base64.b64decode(data)[:-8]).decode()
    chunk = HotlistChunk(schema=CHUNK_SCHEMA, issuer=JINAN, version=2, index=0, data=cut)
    head = HotlistSnapshot(
        schema=SNAPSHOT_SCHEMA,
        issuer=JINAN,
        version=2,
        published="2026-12-08T10:00:00+08:00",
        cards=2,
        chunks=1,
        sha256=sha256,
    )
    net.publish(hotlist_chunk_topic(JINAN, 0), chunk.to_json())
    net.publish(hotlist_snapshot_topic(JINAN), head.to_json())
    delta = (
        f'{{"schema":"{DELTA_SCHEMA}","issuer":"{JINAN}","base":1,"version":2,"changes":[{{"version":2,'
        f'"published":"2026-12-08T10:00:00+08:00","add":["{other_serial}"]}}]}}'
    )
    net.publish(hotlist_delta_topic(JINAN), delta[: len(delta) // 2])
    again = net.tap(net.copy(listed, "again"), YANTAI, "yantai", wait=2)
    assert refused(again, JINAN, 1), again.stdout + again.stderr
    served = net.tap(other, YANTAI, "yantai", wait=2)
    assert served.returncode == 0 and served.stdout.startswith("OK"), served.stdout + served.stderr
    assert net.lists("yantai")[0].startswith(f"{JINAN} version 1, 1 card(s)")


def test_a_hotlist_of_200000_cards_reaches_a_terminal_and_is_enforced(net: Network) -> None:
    (listed, serial), (other, _) = net.card("listed"), net.card("other")
    cards = net.folder / "cards.txt"
    many = [f"3104451{n:013d}" for n in range(199_999)]
    cards.write_text("\n".join([*many, serial]) + "\n")
    added = net.hotlist("--file", str(cards))
    assert "version 1, 200000 card(s)" in added
    assert refused(net.tap(listed, ZIBO, "zibo", wait=30), JINAN, 1)
    served = net.tap(other, ZIBO, "zibo", wait=30)
    assert served.returncode == 0 and served.stdout.startswith("OK"), served.stdout + served.stderr
    assert net.lists("zibo")[0].startswith(f"{JINAN} version 1, 200000 card(s)")


def test_a_list_kept_while_the_broker_was_down_is_published_when_clearing_serve_connects(net: Network) -> None:
    image, serial = net.card("listed")
    down = yikatong(
        "clearing", "hotlist", "add", serial, "--city", JINAN, "--broker", "mqtt://127.0.0.1:1", "--db", net.db
    )
    assert down.returncode == 2 and "not published" in down.stderr
    before = net.tap(net.copy(image, "before"), YANTAI, "yantai", wait=1)
    assert before.returncode == 0 and before.stdout.startswith("OK"), before.stdout + before.stderr
    with serve_process(BrokerUrl.parse(net.url), net.db, JINAN, "hotlist"):  # publishes before it says connected
        tap = net.tap(image, YANTAI, "yantai")
    assert refused(tap, JINAN, 1), tap.stdout + tap.stderr
    assert "not published yet" not in yikatong("clearing", "hotlist", "list", "--city", JINAN, "--db", net.db).stdout

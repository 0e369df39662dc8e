"""The loopback NATS cluster launcher (yikatong/nats_cluster.py) against Debian's real nats-server, with the
Mosquitto command-line clients as the outside MQTT 3.1.1 clients."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from yikatong.nats_cluster import ClusterError, NatsCluster, connack_code, mqtt_accepts, mqtt_connect_packet

REPO = Path(__file__).resolve().parent.parent


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (a container's init may not reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _pids(folder: Path) -> list[int]:
    return [int(n["pid"]) for n in json.loads((folder / "cluster.json").read_text())["nodes"]]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """One ready cluster shared by the read-only tests of this module."""
    with NatsCluster(tmp_path_factory.mktemp("nats")) as started:
        yield started


def test_connect_packet_round_trip() -> None:
    packet = mqtt_connect_packet("probe-1")
    assert packet[0] == 0x10 and packet[1] == len(packet) - 2
    assert packet[2:10] == b"\x00\x04MQTT\x04\x02"
    assert connack_code(b"\x20\x02\x00\x00") == 0
    assert connack_code(b"\x20\x02\x00\x05") == 5
    assert connack_code(b"\x30\x02\x00\x00") is None


def test_every_node_is_ready(cluster: NatsCluster) -> None:
    assert [n.name for n in cluster.nodes] == ["n1", "n2", "n3"]
    assert cluster.running() == {"n1": True, "n2": True, "n3": True}
    assert cluster.nats_urls == [f"nats://127.0.0.1:{n.nats_port}" for n in cluster.nodes]
    assert all(url.endswith("?mqtt=3.1.1") for url in cluster.mqtt_urls)
    assert all(mqtt_accepts(n.mqtt_port, 5) for n in cluster.nodes)
    conf = (cluster.folder / "n1.conf").read_text()
    assert "stream_replicas: 3" in conf and "0.0.0.0" not in conf


def test_a_publish_on_node_1_reaches_a_subscriber_on_node_3(cluster: NatsCluster) -> None:
    n1, _, n3 = cluster.nodes
    sub_cmd = [
        "mosquitto_sub",
        "-V",
        "mqttv311",
        "-p",
        str(n3.mqtt_port),
        "-q",
        "1",
        "-t",
        "t/x",
        "-C",
        "1",
        "-W",
        "10",
    ]
    pub_cmd = ["mosquitto_pub", "-V", "mqttv311", "-p", str(n1.mqtt_port), "-q", "1", "-t", "t/x", "-m", "hi"]
    with subprocess.Popen(sub_cmd, stdout=subprocess.PIPE, text=True) as sub:
        # nothing tells from outside when its SUBSCRIBE is in (its output is block-buffered on a pipe): publish
        # again every half second until it has its one message or gives up
        while sub.poll() is None:
            subprocess.run(pub_cmd, check=True, timeout=10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                sub.wait(0.5)
        out = sub.stdout.read() if sub.stdout else ""
    assert sub.returncode == 0
    assert out.splitlines() == ["hi"]


def test_load_reads_the_same_cluster(cluster: NatsCluster) -> None:
    loaded = NatsCluster.load(cluster.folder)
    assert loaded.nodes == cluster.nodes
    assert loaded.running() == cluster.running()


def test_kill_restart_then_stop(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path)
    cluster.start()
    try:
        cluster.kill("n2")
        assert cluster.running() == {"n1": True, "n2": False, "n3": True}
        n2 = cluster.node("n2")
        assert not mqtt_accepts(n2.mqtt_port, 1)
        cluster.restart("n2")
        assert cluster.node("n2") == n2  # same ports
        assert mqtt_accepts(n2.mqtt_port, 5)
        with pytest.raises(ClusterError, match="n2 is running"):
            cluster.restart("n2")
    finally:
        cluster.stop()
    assert not any(cluster.running().values())
    assert all(_gone(pid) for pid in _pids(tmp_path))
    cluster.stop()  # idempotent
    assert (tmp_path / "n2.log").stat().st_size > 0  # logs stay


def test_cli_start_status_stop(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "yikatong.nats_cluster", "--folder", str(tmp_path), *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    started = cli("start")
    try:
        assert started.returncode == 0, started.stderr
        lines = started.stdout.splitlines()
        assert [line.split(":")[0] for line in lines] == ["n1", "n2", "n3"]
        assert all("nats://127.0.0.1:" in line and "?mqtt=3.1.1" in line and ".log" in line for line in lines)
        status = cli("status")
        assert (status.returncode, status.stdout.split()) == (0, ["n1:", "up", "n2:", "up", "n3:", "up"])
        again = cli("start")
        assert again.returncode == 1 and "already running" in again.stderr and "Traceback" not in again.stderr
    finally:
        stopped = cli("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert all(_gone(pid) for pid in _pids(tmp_path))
    down = cli("status")
    assert down.returncode == 1 and down.stdout.split().count("down") == 3


def test_cli_without_a_cluster_says_so(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "yikatong.nats_cluster", "--folder", str(tmp_path), "stop"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "no cluster in" in result.stderr


def test_a_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match=r"nats-server not found .*apt-get install nats-server"):
        NatsCluster(tmp_path, binary="/nonexistent/nats-server").start()
    assert not (tmp_path / "cluster.json").exists()


def test_a_fresh_start_clears_what_an_earlier_cluster_left_but_never_a_running_one(tmp_path: Path) -> None:
    """``start(fresh=True)`` (the demo's): an earlier run's stores go; a cluster still running there is refused
    with the command that stops it, and its folder left alone."""
    stale = tmp_path / "js1" / "stale"
    stale.parent.mkdir(parents=True)
    stale.write_text("an earlier run's store")
    first = NatsCluster(tmp_path, size=1)
    first.start(fresh=True)
    try:
        assert not stale.exists()
        marker = tmp_path / "js1" / "kept"
        marker.write_text("running")
        with pytest.raises(ClusterError, match=r"already running in .*: stop it first \(python -m yikatong"):
            NatsCluster(tmp_path, size=1).start(fresh=True)
        assert marker.exists() and all(first.running().values())
    finally:
        first.stop()

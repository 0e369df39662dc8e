"""A 3-node NATS cluster on loopback (JetStream + MQTT 3.1.1) for tests, `yikatong demo/load --cluster` and
scripts/nats-cluster.sh.

Each node runs Debian's nats-server detached (its own session) with its config, log and JetStream store in one
folder; folder/cluster.json records names, ports and pids so another process can `load()` and stop it.
A node counts as ready when /healthz?js-enabled-only=true answers 200, its /jsz names the JetStream meta leader
and an MQTT 3.1.1 CONNECT gets CONNACK 0 (NATS creates its MQTT streams on the first connect).

    python -m yikatong.nats_cluster start|stop|status|kill NODE|restart NODE [--folder DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"
CLUSTER_NAME = "yikatong"
# a QoS 1 message NATS sent to an MQTT client that never PUBACKed it (the client's node died under it) is sent again
# this long after (NATS's default, 30 s, held a restarted node's terminals' acks that long); an ack twice is harmless
MQTT_ACK_WAIT = "5s"
DEFAULT_FOLDER = Path("run/nats-cluster")
_POLL = 0.1  # seconds between readiness probes


class ClusterError(Exception):
    """A cluster that cannot be started, reached or stopped; the message is one line for the user."""


@dataclass(frozen=True)
class Node:
    """One nats-server of the cluster and its loopback ports."""

    name: str
    nats_port: int
    mqtt_port: int
    cluster_port: int
    http_port: int

    @property
    def nats_url(self) -> str:
        """The client URL (for nats-py's servers list)."""
        return f"nats://{HOST}:{self.nats_port}"

    @property
    def mqtt_url(self) -> str:
        """The MQTT URL; NATS speaks only MQTT 3.1.1, which BrokerUrl reads from ?mqtt=3.1.1."""
        return f"mqtt://{HOST}:{self.mqtt_port}?mqtt=3.1.1"


def node_config(node: Node, nodes: Sequence[Node], store: Path) -> str:
    """The nats-server config of `node` in a cluster of `nodes` (a single node has no cluster block: with one it
    would wait for routes to peers it does not have)."""
    routes = ", ".join(f"nats-route://{HOST}:{n.cluster_port}" for n in nodes)
    cluster = (
        f"cluster {{ name: {CLUSTER_NAME}, listen: {HOST}:{node.cluster_port}, routes: [{routes}] }}\n"
        if len(nodes) > 1
        else ""
    )
    # stream_replicas explicit: left out, 2.9 derives it from the routes it sees and may pick R2
    return (
        f"server_name: {node.name}\n"
        f"listen: {HOST}:{node.nats_port}\n"
        f"http: {HOST}:{node.http_port}\n"
        f"jetstream {{ store_dir: {json.dumps(str(store))} }}\n"
        f"{cluster}"
        f'mqtt {{ listen: {HOST}:{node.mqtt_port}, stream_replicas: {len(nodes)}, ack_wait: "{MQTT_ACK_WAIT}" }}\n'
    )


def mqtt_connect_packet(client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT (§3.1): clean session, keep-alive 60 s, no will, no credentials."""
    cid = client_id.encode()
    variable = b"\x00\x04MQTT" + bytes([4, 0x02]) + (60).to_bytes(2, "big")
    body = variable + len(cid).to_bytes(2, "big") + cid
    if len(body) > 127:  # one-byte remaining length is all a probe's short client id needs
        raise ValueError("client id too long for a probe")
    return bytes([0x10, len(body)]) + body


def connack_code(packet: bytes) -> int | None:
    """The return code of an MQTT 3.1.1 CONNACK (§3.2), or None when `packet` is not one."""
    if len(packet) != 4 or packet[0] != 0x20 or packet[1] != 2:
        return None
    return packet[3]


MQTT_DISCONNECT = b"\xe0\x00"


def mqtt_accepts(port: int, timeout: float) -> bool:
    """True when an MQTT CONNECT to `port` is answered with CONNACK 0 within `timeout` seconds."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(mqtt_connect_packet("probe-" + secrets.token_hex(6)))
            reply = b""
            while len(reply) < 4:
                chunk = sock.recv(4 - len(reply))
                if not chunk:  # NATS closes without CONNACK while its JetStream is not ready
                    return False
                reply += chunk
            if connack_code(reply) != 0:
                return False
            sock.sendall(MQTT_DISCONNECT)
            return True
    except OSError:
        return False


def _http_json(port: int, path: str, timeout: float) -> tuple[int, object]:
    """GET http://127.0.0.1:port/path: (status, decoded JSON or None); (0, None) when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (OSError, ValueError):
        return 0, None


def _node_ready(node: Node, timeout: float, *, clustered: bool = True) -> bool:
    """One readiness probe of `node`: healthz 200, a known meta leader (in a cluster), MQTT CONNACK 0."""
    # js-enabled-only: the full 2.9 /healthz also wants every replica current and can stay 503 for long after a
    # restart over a lagging MQTT retained-message consumer while the node already serves; the probes below decide
    status, _ = _http_json(node.http_port, "/healthz?js-enabled-only=true", timeout)
    if status != 200:
        return False
    if clustered:
        _, jsz = _http_json(node.http_port, "/jsz", timeout)
        meta = jsz.get("meta_cluster") if isinstance(jsz, dict) else None
        if not isinstance(meta, dict) or not meta.get("leader"):
            return False
    return mqtt_accepts(node.mqtt_port, timeout)


def _free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all bound at once so none repeats)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]


def _last_line(path: Path) -> str:
    """The last non-empty line of a log, or a note that it is empty/missing."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1].strip() if lines else "(empty)"


class NatsCluster:
    """A loopback NATS cluster whose files live in `folder` (see the module docstring)."""

    def __init__(self, folder: Path, size: int = 3, *, binary: str = "nats-server") -> None:
        """A cluster of `size` nodes (not started) using the nats-server found as `binary`."""
        if size < 1:
            raise ClusterError(f"cluster size must be at least 1, not {size}")
        self.folder = Path(folder).absolute()
        self.size = size
        self.binary = binary
        self.nodes: list[Node] = []
        self._pids: dict[str, int] = {}
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    @classmethod
    def load(cls, folder: Path) -> NatsCluster:
        """The cluster another process started in `folder` (from its cluster.json)."""
        path = Path(folder).absolute() / "cluster.json"
        try:
            doc = json.loads(path.read_text())
            cluster = cls(path.parent, len(doc["nodes"]), binary=doc["binary"])
            for entry in doc["nodes"]:
                cluster._pids[entry["name"]] = int(entry.pop("pid"))
                cluster.nodes.append(Node(**entry))
        except FileNotFoundError:
            raise ClusterError(f"no cluster in {path.parent} (no cluster.json)") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ClusterError(f"unreadable {path}: {exc}") from None
        return cluster

    @property
    def nats_urls(self) -> list[str]:
        """Client URLs of all nodes."""
        return [n.nats_url for n in self.nodes]

    @property
    def mqtt_urls(self) -> list[str]:
        """MQTT URLs of all nodes."""
        return [n.mqtt_url for n in self.nodes]

    def node(self, name: str) -> Node:
        """The node called `name`."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise ClusterError(f"no node {name!r} (nodes: {', '.join(n.name for n in self.nodes) or 'none'})")

    def log_path(self, name: str) -> Path:
        """Where node `name` logs."""
        return self.folder / f"{name}.log"

    def _conf_path(self, name: str) -> Path:
        return self.folder / f"{name}.conf"

    def _executable(self) -> str:
        found = shutil.which(self.binary) or shutil.which(self.binary, path="/usr/sbin:/usr/local/sbin")
        if found is None:
            raise ClusterError(f"nats-server not found ({self.binary}): apt-get install nats-server")
        return found

    def start(self, timeout: float = 30.0, *, fresh: bool = False) -> None:
        """Pick free ports, write the configs, start every node detached and wait until all are ready. ``fresh``:
        first remove what an earlier cluster left in the folder (its JetStream stores: streams, consumers, MQTT
        sessions)."""
        executable = self._executable()
        if (self.folder / "cluster.json").exists() and any(NatsCluster.load(self.folder).running().values()):
            raise ClusterError(
                f"a cluster is already running in {self.folder}: stop it first "
                f"(python -m yikatong.nats_cluster --folder {self.folder} stop)"
            )
        if fresh:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        ports = _free_ports(4 * self.size)
        self.nodes = [Node(f"n{i + 1}", *ports[4 * i : 4 * i + 4]) for i in range(self.size)]
        for index, node in enumerate(self.nodes, 1):
            self._conf_path(node.name).write_text(node_config(node, self.nodes, self.folder / f"js{index}"))
        self.binary = executable
        try:
            for node in self.nodes:
                self._spawn(node.name)
            self._save()
            self.wait_ready(timeout)
        except BaseException:
            self.stop()  # leave no half-started cluster behind
            raise

    def _spawn(self, name: str) -> None:
        with self.log_path(name).open("ab") as log:
            proc = subprocess.Popen(
                [self.binary, "-c", str(self._conf_path(name))],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # survives the launcher (CLI `start`) and its terminal's signals
            )
        self._children[name] = proc
        self._pids[name] = proc.pid

    def _save(self) -> None:
        doc = {"binary": self.binary, "nodes": [{**asdict(n), "pid": self._pids[n.name]} for n in self.nodes]}
        tmp = self.folder / "cluster.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(self.folder / "cluster.json")

    def _alive(self, name: str) -> bool:
        """Whether node `name`'s recorded process still runs (and is that node, not a reused pid)."""
        child = self._children.get(name)
        if child is not None:
            return child.poll() is None
        pid = self._pids.get(name)
        if pid is None:
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()  # empty for a zombie
        except OSError:
            return False
        return str(self._conf_path(name)).encode() in cmdline

    def running(self) -> dict[str, bool]:
        """Node name -> whether its process runs."""
        return {n.name: self._alive(n.name) for n in self.nodes}

    def wait_ready(self, timeout: float = 30.0, names: Sequence[str] | None = None) -> None:
        """Wait until every node (or those in `names`) is ready; ClusterError naming the first that is not."""
        deadline = time.monotonic() + timeout
        for node in [self.node(n) for n in names] if names is not None else self.nodes:
            while True:
                if not self._alive(node.name):
                    raise ClusterError(f"node {node.name} exited; its log: {self._log_hint(node.name)}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ClusterError(
                        f"node {node.name} not ready in {timeout:g} s; its log: {self._log_hint(node.name)}"
                    )
                if _node_ready(node, min(5.0, max(remaining, 0.2)), clustered=self.size > 1):
                    break
                time.sleep(_POLL)

    def _log_hint(self, name: str) -> str:
        return f"{self.log_path(name)}: {_last_line(self.log_path(name))}"

    def _wait_gone(self, names: Sequence[str], timeout: float) -> list[str]:
        """Wait up to `timeout` s for the processes of `names` to end (reaping our children); those still up."""
        deadline = time.monotonic() + timeout
        while True:
            left = [n for n in names if self._alive(n)]
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)

    def _signal(self, name: str, sig: signal.Signals) -> None:
        if self._alive(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pids[name], sig)

    def kill(self, name: str) -> None:
        """SIGKILL node `name` and wait until it is gone."""
        self.node(name)
        self._signal(name, signal.SIGKILL)
        if self._wait_gone([name], 10.0):
            raise ClusterError(f"node {name} (pid {self._pids[name]}) survived SIGKILL")

    def restart(self, name: str, timeout: float = 30.0) -> None:
        """Start the stopped node `name` again on its ports and store, and wait until it is ready again."""
        self.node(name)
        if self._alive(name):
            raise ClusterError(f"node {name} is running: kill it first")
        self.binary = self._executable()
        self._spawn(name)
        self._save()
        # its own /jsz naming the leader means routes are back and it caught up with the meta group
        self.wait_ready(timeout, [name])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every node, wait up to `timeout` s, SIGKILL the rest; logs and stores stay. Idempotent."""
        names = [n.name for n in self.nodes]
        for name in names:
            self._signal(name, signal.SIGTERM)
        stragglers = self._wait_gone(names, timeout)
        for name in stragglers:
            self._signal(name, signal.SIGKILL)
        if self._wait_gone(stragglers, 5.0):
            raise ClusterError(f"nodes {', '.join(stragglers)} survived SIGKILL")

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m yikatong.nats_cluster`: start/stop/status/kill/restart a cluster in --folder."""
    parser = argparse.ArgumentParser(prog="python -m yikatong.nats_cluster", description="a loopback NATS cluster")
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help="its files (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("start", help="start a ready cluster and leave it running")
    sub.add_parser("stop", help="stop the cluster (logs stay)")
    sub.add_parser("status", help="each node up/down (exit 1 when one is down)")
    for command in ("kill", "restart"):
        sub.add_parser(command, help=f"{command} one node").add_argument("node")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            cluster = NatsCluster(args.folder)
            cluster.start()
            for node in cluster.nodes:
                print(f"{node.name}: {node.nats_url} {node.mqtt_url} log {cluster.log_path(node.name)}")
            return 0
        cluster = NatsCluster.load(args.folder)
        if args.command == "stop":
            cluster.stop()
        elif args.command == "status":
            states = cluster.running()
            for name, up in states.items():
                print(f"{name}: {'up' if up else 'down'}")
            return 0 if all(states.values()) else 1
        elif args.command == "kill":
            cluster.kill(args.node)
        else:
            cluster.restart(args.node)
        return 0
    except ClusterError as exc:
        print(f"nats-cluster: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

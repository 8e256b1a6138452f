"""Real multi-node Ray clusters on 127.0.0.1 for tests.

Two kinds, both reachable with `ray job submit` (dashboard + job agent on the head) and with
`ray.init(address=cluster.address)` from a separate driver process:

* `FixedCluster`: N nodes x G logical GPUs from `ray.cluster_utils.Cluster`, run inside a child
  Python process (this file run as a script).
* `AutoscalingCluster`: a CPU-only head (`ray start --head --block`) whose autoscaler starts fake
  GPU worker nodes on this machine (Ray's `fake_multinode` provider) when tasks ask for GPUs.

Each cluster runs in its own session and process group, with its own short temp dir and its own
ports, so that several clusters, ours and other people's, can run side by side. close() ends
it with `os.killpg` and signals to the pids it finds by session id and temp dir, never with
`ray stop`, which would end every Ray cluster on the machine. A cluster also ends itself when
the process that started it dies. Never call `ray.init` in the pytest process for these:
start drivers as subprocesses with `env=cluster.env` (which they need: see LOOPBACK) and
`ray.init(address=cluster.address)`.

Usage, e.g. in a session-scoped fixture::

    with FixedCluster(nodes=2, gpus_per_node=2, env={"PATH": ...}) as cluster:
        subprocess.run([ray, "job", "submit", "--", "python", "-c", "..."], env=cluster.env)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

RAY = Path(sys.executable).parent / "ray"
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 30.0
# for a cluster closed while it is still starting: its leader may sit in a blocking call to a
# GCS that is gone (Python runs the SIGTERM handler only after that returns, in 30 s or more),
# and a half-started cluster has nothing to shut down gracefully
ABORT_GRACE_S = 5.0
OBJECT_STORE_MB = 200
# Ray on Linux rewrites 127.0.0.1 everywhere (`ray start --node-ip-address`, ray.init(address=...),
# the nodes the fake autoscaler starts) to the machine's routable IP, where a GCS started with
# node_ip_address=127.0.0.1 does not listen: a driver would wait for it forever. With this
# variable at 0, Ray's "single-machine" mode, the local IP is 127.0.0.1 for every Ray process
# (nothing else changes, except that `ray start --address=...` refuses to add a node, which
# these clusters do not use). Cluster processes and clients (cluster.env) both need it.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


# ---------------------------------------------------------------------------------------------
# small helpers


STARTUP_TIMEOUT = "timed out during startup"  # Ray's words when a node's raylet is late to register


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel's choice, so no clash with fixed ones)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_temp_dir() -> str:
    """A fresh temp dir with a short path: Ray puts Unix sockets under
    <temp>/session_<date>_<pid>/sockets/, and a socket path must fit in 107 bytes, so a long
    TMPDIR (as some CI runners set) would break the raylet."""
    base = "/tmp" if os.path.isdir("/tmp") else None
    return tempfile.mkdtemp(prefix="cxr-", dir=base)


def wait_for_url(url: str, seconds: float, alive: subprocess.Popen | None = None) -> bytes:
    """The body of the first successful GET of url, polling for up to `seconds`; gives up at once
    if `alive` (the process that should serve it) has exited."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read()
        except OSError:
            if alive is not None and _exited(alive):
                raise RuntimeError(f"the process that should serve {url} exited") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _exited(process: subprocess.Popen) -> bool:
    """Whether the child has exited, without reaping it (Popen.poll would), so that its pid
    stays taken until close() is done with its process group."""
    return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def alive_nodes(dashboard: str) -> list[dict[str, Any]]:
    """The cluster's ALIVE nodes (node_id, is_head_node, resources_total, ...), from the
    dashboard's state API: no `ray.init` needed in the calling process."""
    body = json.loads(wait_for_url(f"{dashboard}/api/v0/nodes?limit=1000", 30))
    return [n for n in body["data"]["result"]["result"] if n["state"] == "ALIVE"]


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, session) of a process, None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: split after the last ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[2]), int(fields[3])


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie is only an exit status waiting for its parent)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def session_members(sid: int) -> list[int]:
    """Running processes of session `sid`: the leader's process group and the groups made inside
    the session, such as the one the raylet gives each worker process (Ray 2.60 puts every worker
    in a process group of its own, to end a worker's children with it)."""
    return [
        pid for pid in _pids() if (stat := _proc_stat(pid)) and stat[2] == sid and stat[0] != "Z"
    ]


def processes_of(temp_dir: str) -> list[int]:
    """Running processes that belong to the cluster with this temp dir, in or out of its process
    group: their command line names the temp dir (gcs_server, raylet, dashboard, ...), or one of
    their open files lies in it (every Ray process writes its logs to the session dir), or their
    environment holds RAY_TMPDIR=<temp dir>. The command line alone misses the processes that
    rename themselves (`ray::IDLE`, `ray::DashboardAgent`, `ray-dashboard-JobHead-0`): the new
    title overwrites the memory that /proc shows as their command line and environment."""
    # the temp dir as a whole path, not as the start of some other name
    in_cmdline = re.compile(re.escape(temp_dir.encode()) + rb"(?![\w.-])")
    return [
        pid
        for pid in _pids()
        if pid != os.getpid() and _running(pid) and _mentions(pid, temp_dir, in_cmdline)
    ]


def outliving(temp_dir: str, grace: float = 30) -> list[int]:
    """The processes of the cluster with this temp dir still running `grace` seconds after its
    driver's exit (Ray's processes end a moment after it; later than that they have leaked)."""
    deadline = time.monotonic() + grace
    while (left := processes_of(temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _mentions(pid: int, temp_dir: str, in_cmdline: re.Pattern[bytes]) -> bool:
    try:
        if in_cmdline.search(Path(f"/proc/{pid}/cmdline").read_bytes()):
            return True
        if f"RAY_TMPDIR={temp_dir}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(
            b"\0"
        ):
            return True
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # gone meanwhile, or not ours to read
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(temp_dir + "/"):
                return True
    return False


def _signal_pids(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def cluster_env(extra: Mapping[str, str] | None, temp_dir: str) -> dict[str, str]:
    """The environment of the cluster's own processes (head, nodes, workers, job drivers)."""
    env = {
        **os.environ,
        # no token authentication: these clusters listen on 127.0.0.1 only, and with
        # RAY_AUTH_MODE unset `ray start` switches token auth on by itself as soon as a token
        # file exists in the home folder (Ray 2.60), which the clients would then need too
        "RAY_AUTH_MODE": "disabled",
        **(extra or {}),
        **LOOPBACK,
        # Ray's default temp dir (and `Cluster`'s ray_current_cluster address file) under
        # our own temp dir instead of the machine-wide one; also the marker processes_of finds
        "RAY_TMPDIR": temp_dir,
        # a SIGTERMed node otherwise asks the GCS to drain it and waits up to 30 s for that
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)  # a head must not try to join some other cluster
    return env


# ---------------------------------------------------------------------------------------------
# the common part: one session, one temp dir

_C = TypeVar("_C", bound="_Cluster")


class _Cluster:
    """A running cluster: the leader of its session and process group, its temp dir and its
    addresses."""

    address: str  # GCS, "127.0.0.1:<port>", for ray.init(address=...)
    dashboard: str  # "http://127.0.0.1:<port>", for `ray job submit` (RAY_ADDRESS)
    node_ids: list[str]  # the nodes alive when the cluster was ready (hex), the head first
    session_dir: str  # <temp_dir>/session_<date>_<pid>: the logs are under logs/

    def __init__(self, env: Mapping[str, str] | None) -> None:
        self.temp_dir = short_temp_dir()
        self._extra_env = dict(env or {})
        self._child_env = cluster_env(self._extra_env, self.temp_dir)
        self._leader: subprocess.Popen | None = None
        self._sid: int | None = None  # the leader's pid: its session and process group id
        self._ready = False
        self._log = Path(self.temp_dir, "cluster.log")
        self.leftovers: list[int] = []

    @property
    def env(self) -> dict[str, str]:
        """Environment for client subprocesses: `ray job submit`, drivers, `ray status`...
        A driver should still pass address=cluster.address to ray.init explicitly."""
        return {
            **os.environ,
            **self._extra_env,
            **LOOPBACK,
            "RAY_ADDRESS": self.dashboard,
            "RAY_AUTH_MODE": self._child_env["RAY_AUTH_MODE"],
        }

    def alive_nodes(self) -> list[dict[str, Any]]:
        return alive_nodes(self.dashboard)

    def _spawn(self, mode: str, argument: Any, stdout_pipe: bool = False) -> subprocess.Popen:
        """Start the cluster's leader (this file, run as a script) in a new session, hence a new
        process group that holds every process it starts (Ray starts its processes without
        setsid). Its output goes to a log file, not to a pipe that could fill up; stdout to a pipe
        only if asked. Its stdin is a pipe that this process never writes to: the leader reads
        EOF there once this process has died, however it died, and then ends its cluster."""
        command = [sys.executable, "-u", str(Path(__file__).resolve()), mode, json.dumps(argument)]
        with self._log.open("ab") as log:
            self._leader = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE if stdout_pipe else log,
                stderr=log,
                env=self._child_env,
                start_new_session=True,
            )
        self._sid = self._leader.pid
        return self._leader

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self._log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    @contextlib.contextmanager
    def _closed_on_failure(self, what: str) -> Iterator[None]:
        """Marks the cluster ready once the block has started it. If starting fails (or is
        interrupted), ends what was started; the leader's log goes into the error."""
        try:
            yield
            self._ready = True
        except BaseException as e:
            tail = self.log_tail()
            self.close()
            if isinstance(e, Exception):
                raise RuntimeError(
                    f"{what} did not come up: {e}\n--- cluster log (tail) ---\n{tail}"
                ) from e
            raise

    def processes(self) -> list[int]:
        """The cluster's running processes: those of its session (the leader's process group and
        the workers' own groups) and those outside it that still name the temp dir (a job's
        entrypoint runs in a new session of its own). Empty once close() has ended them."""
        session = session_members(self._sid) if self._sid is not None else []
        return sorted(set(session) | set(processes_of(self.temp_dir)))

    def close(self) -> None:
        """SIGTERM to the raylets, then to the process group and to every other process of the
        cluster, SIGKILL to what is left after STOP_GRACE_S; then the temp dir is deleted.
        Idempotent.
        `self.leftovers` holds the pids still running afterwards (empty unless unkillable)."""
        leader, self._leader = self._leader, None
        if leader is not None:
            self._end(leader)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _end(self, leader: subprocess.Popen) -> None:
        # the leader is reaped last: until then it is a zombie (not counted as running) that
        # holds its pid, so the session and group ids signalled here cannot be anybody else's
        pgid = leader.pid
        if self._ready:
            self._end_raylets_first()
        signalled = {
            pid for pid in self.processes() if (stat := _proc_stat(pid)) and stat[1] == pgid
        }
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + (STOP_GRACE_S if self._ready else ABORT_GRACE_S)
        while (running := self.processes()) and time.monotonic() < deadline:
            # SIGTERM also to those outside the group, and to any started since (a leader
            # still bringing nodes up when closed)
            new = [pid for pid in running if pid not in signalled]
            _signal_pids(new, signal.SIGTERM)
            signalled.update(new)
            time.sleep(0.2)
        if self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            _signal_pids(self.processes(), signal.SIGKILL)
            self._wait_until_gone(10)
        self.leftovers = self.processes()
        with contextlib.suppress(subprocess.TimeoutExpired):
            leader.wait(timeout=10)
        if leader.stdin is not None:
            leader.stdin.close()
        self._sid = None  # from now on processes() goes by the temp dir alone

    def _end_raylets_first(self, seconds: float = 10) -> None:
        """SIGTERM to the raylets, and wait for them, while the GCS still answers: a raylet
        that has lost its GCS waits about 10 s for it before it exits (Ray's own shutdown, too,
        ends raylets first). This matters for the fake autoscaler's nodes, whose parent (the
        monitor) would not end them."""
        raylets = [pid for pid in self.processes() if _command_name(pid) == "raylet"]
        _signal_pids(raylets, signal.SIGTERM)
        deadline = time.monotonic() + seconds
        while any(_running(pid) for pid in raylets) and time.monotonic() < deadline:
            time.sleep(0.2)

    def _wait_until_gone(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.2)

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# FixedCluster


class FixedCluster(_Cluster):
    """`nodes` nodes on 127.0.0.1, the head one of them, each with `cpus_per_node` CPUs and
    `gpus_per_node` logical GPUs, built by `ray.cluster_utils.Cluster` in a child process.
    `node_env`: one mapping per node (the head first) of variables for that node's raylet and the
    workers it starts, as a machine's own environment would be (e.g. a node-local cache folder).

    Started by the constructor (up to `timeout` s); `close()` (or leaving the `with`) ends it.
    `env` adds to or overrides os.environ for the cluster's processes (so also for job drivers:
    e.g. PATH to find a console script) and for `.env`."""

    def __init__(
        self,
        nodes: int = 2,
        gpus_per_node: int = 2,
        cpus_per_node: int = 2,
        object_store_mb: int = OBJECT_STORE_MB,
        env: Mapping[str, str] | None = None,
        timeout: float = START_TIMEOUT_S,
        node_env: list[Mapping[str, str]] | None = None,
    ) -> None:
        if nodes < 1:
            raise ValueError("a cluster has at least its head node")
        if node_env is not None and len(node_env) != nodes:
            raise ValueError(
                f"node_env: expected one mapping per node ({nodes}), received {len(node_env)}"
            )
        super().__init__(env)
        spec = {
            "nodes": nodes,
            "cpus": cpus_per_node,
            "gpus": gpus_per_node,
            "node_env": [dict(e) for e in node_env or [{}] * nodes],
            "object_store_bytes": object_store_mb * 1024 * 1024,
            "temp_dir": self.temp_dir,
            "port": free_port(),
            "dashboard_port": free_port(),
            "agent_port": free_port(),
        }
        try:
            ready = self._start(spec, timeout)
        except RuntimeError as e:
            # Ray gives a starting node a fixed 30 s to register its raylet with the GCS; on 2
            # cores busy with training that can pass (seen once, with a third CPU-bound process
            # beside the suite's two): a second start, on fresh ports, in a fresh temp dir
            if STARTUP_TIMEOUT not in str(e):
                raise
            super().__init__(env)
            spec.update(
                temp_dir=self.temp_dir,
                port=free_port(),
                dashboard_port=free_port(),
                agent_port=free_port(),
            )
            ready = self._start(spec, timeout)
        self.address, self.dashboard = ready["address"], ready["dashboard"]
        self.node_ids, self.session_dir = ready["node_ids"], ready["session_dir"]

    def _start(self, spec: dict, timeout: float) -> dict:
        with self._closed_on_failure("the FixedCluster"):
            return json.loads(
                self._read_ready_line(self._spawn("fixed", spec, stdout_pipe=True), timeout)
            )

    @staticmethod
    def _read_ready_line(child: subprocess.Popen, timeout: float) -> str:
        """The child's one stdout line, which it prints once every node is alive."""
        assert child.stdout is not None
        deadline, data = time.monotonic() + timeout, b""
        try:
            while b"\n" not in data:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"no ready line within {timeout:.0f} s")
                readable, _, _ = select.select([child.stdout], [], [], min(left, 1.0))
                if readable:
                    chunk = os.read(child.stdout.fileno(), 65536)
                    if not chunk:
                        raise RuntimeError("the child exited before it was ready")
                    data += chunk
        finally:
            child.stdout.close()
        return data.split(b"\n", 1)[0].decode()


def _when_parent_dies(action: Callable[[], object]) -> None:
    """In a leader: run `action` once stdin, a pipe only the parent writes to, reaches EOF."""

    def watch() -> None:
        while sys.stdin.buffer.read(65536):
            pass
        action()

    threading.Thread(target=watch, daemon=True).start()


def _serve_fixed(spec: dict[str, Any]) -> None:
    """In the leader of a FixedCluster: start the cluster, report it on stdout, shut it down on
    SIGTERM or once the parent has died."""
    # Ray's own processes inherit fd 1; keep it for the one ready line only and send the rest to
    # stderr (a log file), so that nothing can ever block on a pipe nobody reads any more
    ready = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    stop: list[bool] = []
    _when_parent_dies(lambda: stop.append(True))

    from ray.cluster_utils import Cluster

    node_args = {
        "node_ip_address": "127.0.0.1",
        "num_cpus": spec["cpus"],
        "num_gpus": spec["gpus"],
        "object_store_memory": spec["object_store_bytes"],
    }
    # Cluster writes its ray_current_cluster address file to $RAY_TMPDIR/ray/ without creating it
    os.makedirs(os.path.join(spec["temp_dir"], "ray"), exist_ok=True)
    cluster = Cluster()
    head = cluster.add_node(
        **node_args,
        env_vars=spec["node_env"][0] or None,
        gcs_server_port=spec["port"],
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=spec["dashboard_port"],
        temp_dir=spec["temp_dir"],
        # the default, 52365, is taken as soon as a second cluster runs here
        dashboard_agent_listen_port=spec["agent_port"],
    )
    # a temp dir per node, as on separate machines: nodes sharing one would share the runtime env
    # folder too, and one node's agent unpacking a job's working_dir replaces the folder another
    # node's job driver runs in (its cwd vanishes: os.getcwd() fails in Tune)
    node_dirs = [spec["temp_dir"]] + [
        os.path.join(spec["temp_dir"], f"node{i}") for i in range(1, spec["nodes"])
    ]
    for node_dir, env in zip(node_dirs[1:], spec["node_env"][1:], strict=False):
        cluster.add_node(**node_args, temp_dir=node_dir, env_vars=env or None)
    cluster.wait_for_nodes(timeout=60)
    # A job's supervisor hands its driver the address in `<node temp dir>/ray_current_cluster`,
    # which `ray start` writes and Cluster does not; without it, it takes any GCS running on this
    # machine, which is another Ray's as soon as one runs beside this cluster (a second pytest
    # worker's): the driver then fails to connect
    for node_dir in node_dirs:
        Path(node_dir, "ray_current_cluster").write_text(head.gcs_address)
    dashboard = f"http://127.0.0.1:{spec['dashboard_port']}"
    wait_for_url(f"{dashboard}/api/version", 60)

    # each Node installed its own SIGTERM handler (kill that node's processes, then exit); ours,
    # installed last, shuts the whole cluster down in order instead
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    with contextlib.suppress(BrokenPipeError):  # the parent is gone: shut down at once
        ready.write(
            json.dumps(
                {
                    "address": head.gcs_address,
                    "dashboard": dashboard,
                    "node_ids": [n.node_id for n in cluster.list_all_nodes()],
                    "session_dir": head.get_session_dir_path(),
                }
            )
            + "\n"
        )
        ready.close()
    while not stop:
        time.sleep(0.2)
    cluster.shutdown()


# ---------------------------------------------------------------------------------------------
# AutoscalingCluster


class AutoscalingCluster(_Cluster):
    """A CPU-only head on 127.0.0.1 whose autoscaler starts fake worker nodes (each with
    `worker_resources`, e.g. {"CPU": 1, "GPU": 1}) on this machine on demand, up to
    `max_workers`, and ends them after `idle_timeout_minutes` idle.

    Not `ray.cluster_utils.AutoscalingCluster`: that one runs `ray stop --force`, which ends
    every Ray cluster on the machine.

    Process groups (checked with Ray 2.60): the autoscaler's monitor process, a child of the
    head, starts each worker node as a `ray._private.node.Node` without setsid, so the worker
    nodes' raylets and agents stay in the head's process group (and session). As in any Ray
    2.60 cluster, the raylets put each worker process (`ray::IDLE`, actors) in a process group
    of its own, still in the session, and a job's entrypoint runs in a new session; close()
    finds all of these by session id and temp dir (see `_Cluster.processes`).
    """

    def __init__(
        self,
        head_cpus: int = 2,
        worker_resources: Mapping[str, float] | None = None,
        max_workers: int = 2,
        idle_timeout_minutes: float = 1.0,
        upscaling_speed: float = 1.0,
        object_store_mb: int = OBJECT_STORE_MB,
        env: Mapping[str, str] | None = None,
        timeout: float = START_TIMEOUT_S,
    ) -> None:
        super().__init__(env)
        self._child_env.update(
            {
                "RAY_FAKE_CLUSTER": "1",  # the fake_multinode provider refuses to run without it
                "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # react within seconds, not the default 5
            }
        )
        port, dashboard_port = free_port(), free_port()
        self.address, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}"
        config = autoscaling_config(
            gcs_address=self.address,
            head_cpus=head_cpus,
            worker_resources={
                **(worker_resources or {"CPU": 1, "GPU": 1}),
                "object_store_memory": object_store_mb * 1024 * 1024,
            },
            max_workers=max_workers,
            idle_timeout_minutes=idle_timeout_minutes,
            upscaling_speed=upscaling_speed,
        )
        config_file = Path(self.temp_dir, "autoscaler.json")
        config_file.write_text(json.dumps(config, indent=1))
        ray_start = [
            str(RAY),
            "start",
            "--head",
            "--block",
            f"--autoscaling-config={config_file}",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard_port),
            # the defaults (52365, 10001, workers in 10002-19999) clash with any other
            # cluster here; worker ports 0 = the kernel's choice, as in Cluster
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--ray-client-server-port",
            str(free_port()),
            "--min-worker-port",
            "0",
            "--max-worker-port",
            "0",
            "--num-cpus",
            str(head_cpus),
            "--num-gpus",
            "0",
            "--object-store-memory",
            str(object_store_mb * 1024 * 1024),
            "--disable-usage-stats",
            "--temp-dir",
            self.temp_dir,
        ]
        with self._closed_on_failure("the AutoscalingCluster head"):
            head = self._spawn("guard", ray_start)
            # the dashboard answers only once the GCS is up; the head node then registers
            wait_for_url(f"{self.dashboard}/api/version", timeout, alive=head)
            self.node_ids = self._wait_for_head(head, timeout)
        self.session_dir = os.path.realpath(Path(self.temp_dir, "session_latest"))

    def _wait_for_head(self, head: subprocess.Popen, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while not (heads := [n["node_id"] for n in self.alive_nodes() if n.get("is_head_node")]):
            if _exited(head) or time.monotonic() > deadline:
                raise RuntimeError("the head node did not register")
            time.sleep(0.5)
        return heads


def autoscaling_config(
    *,
    gcs_address: str,
    head_cpus: int,
    worker_resources: Mapping[str, float],
    max_workers: int,
    idle_timeout_minutes: float,
    upscaling_speed: float,
) -> dict[str, Any]:
    """Cluster config for the fake_multinode provider (the layout of Ray's
    fake_multi_node/example.yaml, which the pip wheel does not ship)."""
    return {
        "cluster_name": "cxr-fake",
        "max_workers": max_workers,
        "provider": {
            "type": "fake_multinode",
            # where the nodes it starts join; without it the provider assumes port 6379
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            "ray.head.default": {
                "resources": {"CPU": head_cpus, "GPU": 0},
                "node_config": {},
                "max_workers": 0,
            },
            "ray.worker.gpu": {
                "resources": dict(worker_resources),
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_workers,
            },
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": upscaling_speed,
        "idle_timeout_minutes": idle_timeout_minutes,
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _guard(command: list[str]) -> int:
    """In the leader of an AutoscalingCluster: run `ray start --block` in this process group and
    SIGTERM the group once the parent has died."""
    head = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    _when_parent_dies(lambda: os.killpg(0, signal.SIGTERM))
    return head.wait()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("fixed", "guard"):
        sys.exit(
            "usage: ray_clusters.py fixed|guard '<json>' "
            "(started by FixedCluster, AutoscalingCluster)"
        )
    if sys.argv[1] == "fixed":
        _serve_fixed(json.loads(sys.argv[2]))
    else:
        sys.exit(_guard(json.loads(sys.argv[2])))

"""The Ray cluster trials and studies run on: joining or starting it, watching that it stays,
its capacity, and the checkpoint storage its nodes share."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ternarylm import tracking
from ternarylm.config import ConfigError, TrialConfig, ternarylm_home
from ternarylm.core.errors import Fault, one_line

class ClusterError(Fault):
    """The Ray cluster could not be started or joined."""


DRIVER_RESOURCE = "trial_driver"  # a custom resource for trial drivers (Tune trials), no CPU

# Ray Train settings of a cluster started here (a user's own value wins). Its controller polls
# the workers every 2 s by default: a trial of half a minute then loses seconds at its start and
# end waiting for the next poll. Its preemption watcher (another actor per trial) looks for node
# drains, which a cluster of this machine's processes never has. `cluster/` configs set these
# for clusters whose nodes can be preempted as they see fit.
LOCAL_CLUSTER_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
                     "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def ray_address() -> str | None:
    """The cluster to join: $RAY_ADDRESS, or the one `ray start` recorded on this machine if it
    still answers; None for a local cluster of our own.

    A recorded cluster that died since (crash, OOM kill) is not waited on, as Ray would for
    minutes; an explicit $RAY_ADDRESS where nothing answers is an error.
    """
    from ray._private.services import canonicalize_bootstrap_address

    explicit = os.environ.get("RAY_ADDRESS")
    address = canonicalize_bootstrap_address(None)
    if address is None or cluster_answers(address):
        return address
    if explicit:
        raise ConfigError(f"RAY_ADDRESS={explicit}: no Ray cluster answers there; start it "
                          f"(ray start --head) or unset RAY_ADDRESS to run on a local cluster")
    print(f"ternarylm: the Ray cluster last started on this machine ({address}) no longer "
          f"answers; starting a local cluster instead", file=sys.stderr, flush=True)
    return None


def connect_ray(address: str | None) -> str | None:
    """Join the cluster at `address` (from `ray_address`), or start a local one; returns the
    joined cluster's GCS address (None for a cluster of our own).

    A cluster started here offers `trial_driver` slots, as the cluster configs' heads do, so
    that trial drivers take no CPU from training workers: with 0.01 CPU each, two 1-CPU trials
    would not fit on 2 cores.

    Workers' output (Ray Train's reports, DeepSpeed) stays in Ray's log files, whose folder is
    printed, unless $TERNARYLM_VERBOSE=1 (`--verbose`) streams it to the console.
    """
    import ray

    if ray.is_initialized():
        return None
    stop_orphaned_sessions()
    # Errors on the console stay one line; the console shows our progress, not Ray's stream.
    quiet = {"logging_level": logging.WARNING, "log_to_driver": verbose()}
    try:
        if address is not None:
            ray.init(address=address, **quiet)
        else:
            for name, value in LOCAL_CLUSTER_ENV.items():  # its processes inherit these
                os.environ.setdefault(name, value)
            # Ray's notice that it turned token authentication on for a cluster of our own
            # would be a second line under every one-line error (and noise on every run).
            logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
            ray.init(address="local", resources={DRIVER_RESOURCE: 1000}, **quiet)
    except Exception as e:  # Ray raises bare Exceptions (a node's 30 s start-up limit), OSError...
        where = (f"could not join the Ray cluster at {address}" if address else
                 "could not start a local Ray cluster")
        raise ClusterError(f"{where} ({one_line(e)[:300]}); nothing was trained: run the same "
                           f"command again (on a loaded machine, once it is quieter, or start a "
                           f"cluster with `ray start --head`)") from e
    if address is None:
        record_session()
    if not verbose():
        print(f"worker logs: {session_logs()} (on each node; a study keeps this node's with its "
              f"MLflow run, artifact logs/; --verbose shows them here)", flush=True)
    return address


def _sessions() -> Path:
    """Where drivers record the local Ray clusters they start (`record_session`)."""
    return ternarylm_home() / "ray-sessions"


def _identity(p) -> list:
    """A process as recorded: its id and start time (an id alone may be reused)."""
    return [p.pid, p.create_time()]


def record_session() -> None:
    """Record the processes of the local Ray cluster this driver just started, by id and start
    time, and remove the record at a normal exit (Ray stops them then). A driver killed with
    SIGKILL leaves its cluster running; the next driver finds the record and stops them
    (`stop_orphaned_sessions`)."""
    import atexit

    import psutil
    import ray

    node = ray._private.worker._global_node
    procs = [psutil.Process(info.process.pid) for infos in node.all_processes.values()
             for info in infos if info.process is not None]
    with contextlib.suppress(psutil.Error):  # a process that ended already needs no stopping
        procs += [c for p in procs for c in p.children(recursive=True)]
    record = _sessions() / f"{os.getpid()}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"driver": _identity(psutil.Process()),
                                  "session_dir": node.get_session_dir_path(),
                                  "processes": [_identity(p) for p in procs]}))
    atexit.register(record.unlink, missing_ok=True)


def stop_orphaned_sessions() -> None:
    """Stop the local Ray clusters of drivers that died without stopping them (SIGKILL): the
    recorded processes that still run with their recorded start time, and what they started
    since; one line says how many. Records of live drivers are left alone."""
    import psutil

    for record in sorted(_sessions().glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            seen = json.loads(record.read_text())
            if _running(seen["driver"]) is not None:
                continue
            procs = [p for p in map(_running, seen["processes"]) if p is not None]
            with contextlib.suppress(psutil.Error):
                procs += [c for p in procs for c in p.children(recursive=True)]
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(procs, timeout=10)
            record.unlink()
            if procs:
                print(f"ternarylm: stopped {len(procs)} Ray processes left by driver "
                      f"{seen['driver'][0]}, which was killed (session "
                      f"{seen['session_dir']})", file=sys.stderr, flush=True)


def _running(identity: list):
    """The process recorded as `identity` if it still runs (same id, same start time)."""
    import psutil

    try:
        p = psutil.Process(identity[0])
        return p if p.create_time() == identity[1] and p.status() != psutil.STATUS_ZOMBIE else None
    except psutil.Error:
        return None


def session_logs() -> Path:
    """This node's log folder of the Ray session the process is connected to."""
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path())


def keep_worker_logs(uri: str, run_id: str) -> None:
    """Copy this node's worker logs (Ray Train's, DeepSpeed's, Tune's trial actors') to the
    run's `logs/` artifact: Ray's session folder is temporary, the study's run is not."""
    logs = session_logs()
    kept = [p for p in [*logs.glob("worker-*.out"), *logs.glob("worker-*.err"),
                        *logs.glob("train/*.log")] if p.is_file() and p.stat().st_size]
    if not kept:
        return
    with tempfile.TemporaryDirectory() as d:
        for p in kept:
            target = Path(d, p.relative_to(logs))
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(p.read_bytes())
        tracking.log_artifact(uri, run_id, d, "logs")


def verbose() -> bool:
    """Whether workers' logs stream to the console ($TERNARYLM_VERBOSE=1, `--verbose`)."""
    return os.environ.get("TERNARYLM_VERBOSE") == "1"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a local cluster's head)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_answers(address: str, timeout: float = 3.0) -> bool:
    """Whether anything accepts connections at a cluster's GCS address (host:port)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def cluster_watch(address: str | None, uri: str, run_id: str, what: str, every: float = 5.0,
                  misses: int = 3):
    """While inside, a watcher process polls the joined cluster's GCS; after `misses` failed
    polls in a row it ends the run and this process (`exit_lost_cluster`). An error raised
    inside because the cluster is gone ends them the same way at once. A driver whose cluster
    vanished would otherwise wait on it for a minute or more, in Ray calls (its shutdown
    included) that a thread of ours could not interrupt."""
    if address is None:  # a cluster of our own lives and dies with this process
        yield
        return
    watcher = subprocess.Popen(
        [sys.executable, "-m", "ternarylm.training.cluster", address, str(os.getpid()), uri, run_id,
         what, str(every), str(misses)], stdin=subprocess.DEVNULL)
    try:
        yield
    except Exception:
        if not cluster_answers(address):
            watcher.kill()  # one line, from here
            exit_lost_cluster(address, os.getpid(), uri, run_id, what)
        raise
    finally:
        watcher.terminate()
        watcher.wait()


def exit_lost_cluster(address: str, pid: int, uri: str, run_id: str, what: str) -> None:
    """The run FAILED with the reason, one line on stderr, and process `pid` ended."""
    reason = (f"the Ray cluster at {address} stopped answering during {what}; rerun the same "
              f"command on a live cluster to resume from the last checkpoint")
    with contextlib.suppress(Exception):  # the line and the exit matter more
        tracking.quiet_mlflow()
        tracking.end_run(uri, run_id, "FAILED", reason)
    print(f"ternarylm: error: {reason}", file=sys.stderr, flush=True)
    if pid == os.getpid():
        os._exit(1)  # not sys.exit: Ray's shutdown would wait a minute on the lost cluster
    os.kill(pid, signal.SIGKILL)


def _watch(address: str, pid: int, uri: str, run_id: str, what: str, every: float,
           misses: int) -> None:
    """The watcher process of `cluster_watch`; returns when the driver `pid` is gone."""
    missed = 0
    while _alive(pid):
        time.sleep(every)
        missed = 0 if cluster_answers(address) else missed + 1
        if missed >= misses and _alive(pid):
            exit_lost_cluster(address, pid, uri, run_id, what)
            return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def check_capacity(trials: list[TrialConfig]) -> None:
    """Every trial must fit the connected cluster, unless it autoscales."""
    import ray

    if autoscaling():
        return
    resources = ray.cluster_resources()
    for t in trials:
        t.check_capacity(resources)


def autoscaling() -> bool:
    """Whether the cluster adds nodes on demand (TERNARYLM_AUTOSCALING=1, set on its nodes)."""
    return os.environ.get("TERNARYLM_AUTOSCALING") == "1"


def describe_wait(pending: list[list[dict[str, float]]], free: dict[str, float]) -> str:
    """One line on what pending worker groups (their bundles) wait for, e.g. "waiting for the
    autoscaler: 2 worker groups need 1 x 1 CPU each; the cluster has 0 CPU free"."""
    def amount(resources: dict[str, float]) -> str:
        return " + ".join(f"{v:g} {k}" for k, v in sorted(resources.items()))

    shapes: dict[str, int] = {}
    for bundles in pending:
        shape = " + ".join(sorted({f"{bundles.count(b)} x {amount(b)}" for b in bundles}))
        shapes[shape] = shapes.get(shape, 0) + 1
    need = "; ".join(f"{n} worker group{'s' if n > 1 else ''} need{'s' if n == 1 else ''} "
                     f"{shape}{' each' if n > 1 else ''}" for shape, n in shapes.items())
    names = sorted({k for bundles in pending for b in bundles for k in b})
    has = ", ".join(f"{free.get(k, 0):g} {k}" for k in names)
    return f"waiting for the autoscaler: {need}; the cluster has {has} free"


def pending_worker_groups() -> list[list[dict[str, float]]]:
    """The bundles of every placement group (a trial's worker group) the cluster cannot place
    yet, on the connected cluster."""
    from ray.util import placement_group_table

    return [list(pg["bundles"].values()) for pg in placement_group_table().values()
            if pg["state"] in ("PENDING", "RESCHEDULING")]


def _fits(bundles: list[dict[str, float]], free: dict[str, float]) -> bool:
    need: dict[str, float] = {}
    for bundle in bundles:
        for k, v in bundle.items():
            need[k] = need.get(k, 0) + v
    return all(free.get(k, 0) >= v for k, v in need.items())


class NodeWait:
    """While an autoscaling cluster has worker groups waiting for nodes, `line()` says what they
    wait for (None otherwise): a study waiting for cloud nodes to boot must not look hung. It
    looks every `every` seconds and speaks when the wait changes or, unchanged, every `repeat`
    seconds."""

    def __init__(self, every: float = 2.0, repeat: float = 30.0):
        self.every, self.repeat = every, repeat
        self._next = time.monotonic() + every
        self._said, self._said_at = None, 0.0

    def line(self) -> str | None:
        now = time.monotonic()
        if not autoscaling() or now < self._next:
            return None
        import ray

        self._next = now + self.every
        free = ray.available_resources()
        # A group that fits what is free is being placed this moment, not waiting for nodes.
        pending = [g for g in pending_worker_groups() if not _fits(g, free)]
        if not pending:
            self._said = None  # the wait is over; the next one is said at once
            return None
        line = describe_wait(pending, free)
        if line == self._said and now - self._said_at < self.repeat:
            return None
        self._said, self._said_at = line, now
        return line


def session_processes(sid: int) -> list:
    """Every live process of one process session: a local cluster whose head was started with
    `start_new_session=True` holds all its processes (fake autoscaled nodes included) there."""
    import psutil

    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def stop_session(sid: int, grace: float = 10.0, sig: int = signal.SIGTERM) -> int:
    """Stop a local cluster by the ids of its session's processes, and nothing else on the
    machine: `sig` (SIGKILL: as if the machine vanished), SIGKILL
    after `grace` seconds. Returns how many processes are left (0 when all are gone)."""
    import psutil

    procs = session_processes(sid)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    return len(session_processes(sid))


def storage_path(cfg: TrialConfig) -> str:
    path = cfg.storage_path or os.environ.get("TERNARYLM_STORAGE_PATH")
    return path or str(ternarylm_home() / "runs")


def check_storage(path: str) -> None:
    """Refuse, before any run exists, checkpoint storage that cannot be written: a local
    folder is created and written to; a URI (s3://, gs://, ...) must be reachable."""
    if "://" in path and not path.startswith("file://"):
        import pyarrow.fs

        try:
            fs, root = pyarrow.fs.FileSystem.from_uri(path)
            fs.get_file_info(root)
        except Exception as e:  # pyarrow raises OSError, ArrowInvalid, ... by scheme
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ConfigError(f"storage_path {path} is not reachable ({first}); check the URI "
                              f"and its credentials, or use a local folder") from None
        return
    folder = Path(path.removeprefix("file://")).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"storage_path {folder} is not writable ({e.strerror}); pick a folder "
                          f"you can write to (--storage-path, storage_path or "
                          f"$TERNARYLM_STORAGE_PATH)") from None


if __name__ == "__main__":  # the watcher process of `cluster_watch`
    # A Ctrl-C reaches the whole foreground group: the driver ends this watcher itself, and
    # a traceback from here would follow the driver's last line.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _address, _pid, _uri, _run_id, _what, _every, _misses = sys.argv[1:]
    _watch(_address, int(_pid), _uri, _run_id, _what, float(_every), int(_misses))

"""Watch the Ray autoscaler grow and shrink a cluster shaped like cluster/aws.yaml, on this machine.

    python benchmarks/local_autoscaling.py             # a 2-trial study: nodes up, down, times
    python benchmarks/local_autoscaling.py --reclaim   # a 2-worker trial loses a node mid-trial
    python benchmarks/local_autoscaling.py --json      # ends with one JSON line (events, summary)

Ray's fake multi-node provider (`type: fake_multinode`, what `ray.cluster_utils.AutoscalingCluster`
uses) makes the real autoscaler launch and remove "nodes" as local raylets. The node types come
from cluster/aws.yaml, scaled down: the head offers only `trial_driver` (no CPU), the worker type
keeps its name and `min_workers: 0` but has 1 CPU and no GPU; the nodes get aws.yaml's docker
`-e` environment (TERNARYLM_AUTOSCALING=1, the worker-group start timeout, token auth) minus
the cloud endpoints, which become a local checkpoint folder and MLflow store that every local
node sees (on a real cluster: an s3:// or gs:// storage_path and an MLflow server).

`AutoscalingCluster` itself is not used: its start and shutdown stop every Ray cluster of the
user on this machine, it uses the fixed port 6379, and reads an example.yaml that Ray's wheels do
not ship. The cluster here has its own ports and temp folder, lives in its own process session,
and is stopped by the ids of that session's processes only.

With --reclaim, once the study has printed the result of step N (--reclaim-after-step, so Ray
Train has registered that step's checkpoint), a node that runs a training worker vanishes
(its raylet and every process on it SIGKILLed, as when a cloud reclaims a spot instance): Ray
Train restarts the worker group (`max_failures`), the autoscaler launches a node for it and
terminates the silent one through the provider, and the trial resumes from its last checkpoint
in the same MLflow run. MLflow: $MLFLOW_TRACKING_URI, else WORKDIR/mlflow.db.
"""

from __future__ import annotations

import os
import sys


import argparse
import contextlib
import json
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import yaml

from ternarylm.training.cluster import free_port, session_processes, stop_session

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "cluster" / "aws.yaml"
FAKE_HEAD_TYPE = "ray.head.default"  # the fake provider's name for the head node type
PLACEHOLDERS = ("YOUR-", "REPLACE-", "MLFLOW-SERVER-PRIVATE-IP")
# Settings of the fake provider (as in Ray's fake_multi_node/example.yaml): no SSH updaters.
FAKE_PROVIDER = {"type": "fake_multinode", "use_node_id_as_ip": True,
                 "disable_node_updaters": True, "disable_launch_config_check": True}
OBJECT_STORE_BYTES = 200 * 1024 ** 2  # per node: Ray's default (30% of RAM) per raylet is waste


def docker_env(launcher: dict) -> dict[str, str]:
    """The environment every node of a launcher config gets (`-e K=V` docker run options)."""
    env = {}
    for option in launcher.get("docker", {}).get("run_options", []):
        tokens = shlex.split(option, comments=True)
        for flag, value in zip(tokens, tokens[1:]):
            if flag in ("-e", "--env"):
                name, _, val = value.partition("=")
                env[name] = val
    return env


def node_env(launcher: dict) -> dict[str, str]:
    """The launcher's node environment without what names cloud services (placeholders,
    AWS_*): on this machine those are local folders, set by the caller."""
    return {k: v for k, v in docker_env(launcher).items()
            if not k.startswith("AWS_") and not any(p in v for p in PLACEHOLDERS)}


def fake_cluster_config(launcher: dict, gcs_address: str, *, cpus_per_node: int = 1,
                        max_nodes: int = 3, idle_timeout_minutes: float = 0.1) -> dict:
    """An autoscaling config for the fake provider with the launcher's node types, scaled down:
    the head keeps its resources (CPU 0, trial_driver); each worker type keeps its name,
    min_workers and custom resources, with at most `cpus_per_node` CPUs, no GPU (none here) and
    at most `max_nodes` nodes."""
    types = launcher["available_node_types"]
    head_type = launcher["head_node_type"]
    workers = {}
    for name, spec in types.items():
        if name == head_type:
            continue
        resources = {k: v for k, v in spec["resources"].items() if k not in ("CPU", "GPU")}
        resources["CPU"] = min(spec["resources"].get("CPU", cpus_per_node), cpus_per_node)
        workers[name] = {"resources": resources | {"object_store_memory": OBJECT_STORE_BYTES},
                         "node_config": {}, "min_workers": spec.get("min_workers", 0),
                         "max_workers": min(spec.get("max_workers", max_nodes), max_nodes)}
    head = {"resources": dict(types[head_type]["resources"]), "node_config": {},
            "max_workers": 0}
    return {
        "cluster_name": f"{launcher['cluster_name']}-local",
        "max_workers": min(launcher.get("max_workers", max_nodes), max_nodes),
        "upscaling_speed": launcher.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": FAKE_PROVIDER | {"gcs_address": gcs_address},
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "available_node_types": {FAKE_HEAD_TYPE: head, **workers},
        "head_node_type": FAKE_HEAD_TYPE,
    }


class LocalAutoscalingCluster:
    """A head with the fake autoscaler on loopback, in its own process session and temp folder.

    `env` is what clients (the study) need: RAY_ADDRESS, the launcher's node environment, and
    local checkpoint storage and MLflow store.
    """

    def __init__(self, workdir: Path, launcher: dict, *, idle_timeout_minutes: float = 0.1,
                 max_nodes: int = 3, heartbeat_timeout_s: int = 10):
        self.workdir = workdir
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.config = fake_cluster_config(launcher, self.address, max_nodes=max_nodes,
                                          idle_timeout_minutes=idle_timeout_minutes)
        self.env = {**os.environ, **node_env(launcher), "RAY_ADDRESS": self.address,
                    # Loopback only: Ray then binds the head to 127.0.0.1 and gives the fake
                    # nodes (started by the monitor) and clients that address, not this
                    # machine's network one.
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    "TERNARYLM_STORAGE_PATH": str(workdir / "storage"),
                    "MLFLOW_TRACKING_URI": os.environ.get(
                        "MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")}
        self._head_env = {
            **self.env,
            "RAY_FAKE_CLUSTER": "1",             # the fake provider refuses to run without it
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # decide every second, not every 5
            # A vanished node is terminated (and replaced) after this many seconds without
            # heartbeats (Ray's default: 30).
            "AUTOSCALER_HEARTBEAT_TIMEOUT_S": str(heartbeat_timeout_s),
        }
        self.proc: subprocess.Popen | None = None
        # Ray's temp folder: short, since Ray's socket paths inside must fit in 107 bytes.
        self.ray_temp = Path(tempfile.mkdtemp(prefix="tlm-ray-"))

    def start(self, timeout: float = 180) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "autoscaling.json"
        config.write_text(json.dumps(self.config, indent=1))
        head = dict(self.config["available_node_types"][FAKE_HEAD_TYPE]["resources"])
        cpus = head.pop("CPU", 0)
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token",
                        "--generate"], env=self.env, check=True, capture_output=True)
        log = self.workdir / "ray-head.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
             "--node-ip-address=127.0.0.1", f"--port={self.port}", f"--num-cpus={cpus}",
             f"--resources={json.dumps(head)}", f"--autoscaling-config={config}",
             f"--object-store-memory={OBJECT_STORE_BYTES}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={free_port()}",
             f"--temp-dir={self.ray_temp}", "--disable-usage-stats"],
            env=self._head_env, stdout=log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        (self.workdir / "head.pid").write_text(str(self.proc.pid))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {log.read_text()[-2000:]}")
            status = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "status",
                                     "--address", self.address], env=self.env,
                                    capture_output=True, timeout=60)
            if status.returncode == 0:
                return
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the head did not come up in {timeout} s")

    def stop(self) -> int:
        """Stop this cluster, fake nodes included (they run in the head's session)."""
        if self.proc is None:
            return 0
        left = stop_session(self.proc.pid, grace=3)  # no graceful Ray shutdown needed here
        self.proc.wait(timeout=30)
        return left


class NodeWatch:
    """Records worker nodes coming up and going away (from Ray's node table), with times."""

    def __init__(self, address: str, t0: float, every: float = 0.5, echo: bool = True):
        import ray

        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        self.t0, self.every, self.echo = t0, every, echo
        self.events: list[dict] = []
        self._alive: set[str] = set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-watch", daemon=True)
        self._thread.start()

    def worker_nodes(self) -> int:
        return len(self._alive)

    def _run(self) -> None:
        import ray

        while not self._done.wait(self.every):
            with contextlib.suppress(Exception):  # a poll during the head's shutdown
                alive = {n["NodeID"] for n in ray.nodes()
                         if n["Alive"] and n["Resources"].get("CPU", 0) > 0}
                for node in sorted(alive - self._alive):
                    self._event("up", node, len(alive))
                for node in sorted(self._alive - alive):
                    self._event("down", node, len(alive))
                self._alive = alive

    def _event(self, what: str, node: str, count: int) -> None:
        event = {"t": round(time.time() - self.t0, 1), "event": what, "node": node,
                 "worker_nodes": count}
        self.events.append(event)
        if self.echo:
            print(f"[{event['t']:7.1f} s] worker node {what:>4}: {node[-8:]}  "
                  f"({count} worker node(s) alive)", flush=True)

    def close(self) -> None:
        import ray

        self._done.set()
        self._thread.join(timeout=10)
        ray.shutdown()


def study_config(path: Path, corpus: Path, reclaim: bool) -> Path:
    """The small study: 2 trials of 1 worker each (12 steps), or (reclaim) 1 trial of 2 workers
    with 300 steps, a checkpoint every 30, so that a node is lost after checkpoints and well
    before the end."""
    workers, steps = (2, 300) if reclaim else (1, 12)
    seq_len, micro_batch = 64, 8
    trial = {"seq_len": seq_len, "num_workers": workers, "max_failures": 2,
             "data": {"source": str(corpus), "tokenizer": "char"},
             "train": {"micro_batch": micro_batch, "lr": 3e-3, "eval_max_tokens": 2048,
                       "train_sample_tokens": 2048}}
    config = {"name": "reclaim" if reclaim else "autoscaling", "sizes": ["nano"],
              "schemes": ["absmean"],
              "plans": ["all_ternary"] if reclaim else ["fp", "all_ternary"],
              "seeds": [0], "tokens": steps * workers * seq_len * micro_batch,
              "evals_per_trial": 10 if reclaim else 2, "max_concurrent": 2, "trial": trial,
              # Two worker groups (a cohort would train both trials in one) for two nodes.
              "cohorts": False}
    path.write_text(yaml.safe_dump(config))
    return path


def training_nodes(sid: int) -> set[str]:
    """The ids of the cluster's nodes whose raylet runs a Ray Train worker."""
    import psutil

    nodes = set()
    for p in session_processes(sid):
        with contextlib.suppress(psutil.Error):
            if "RayTrainWorker" not in " ".join(p.cmdline()):
                continue
            for parent in p.parents():
                flags = [a for a in parent.cmdline() if a.startswith("--node_id=")]
                if "raylet" in parent.name() and flags:
                    nodes.add(flags[0].split("=", 1)[1])
                    break
    return nodes


def reclaim_node(sid: int, node_id: str) -> int:
    """The node vanishes: its raylet, the processes it started and the node's agents are
    SIGKILLed at once, with no drain or notice. Returns how many processes were killed."""
    import psutil

    doomed = []
    for p in session_processes(sid):
        with contextlib.suppress(psutil.Error):
            if any(node_id in a for a in p.cmdline()):
                doomed += [p, *p.children(recursive=True)]
    for p in doomed:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return len({p.pid for p in doomed})


class Reclaimer:
    """Reclaims a node that runs a rank of the trial, once the study has printed a result of
    step >= `after`: Ray Train has registered that step's checkpoint by then (it reports to Tune
    after its checkpoint manager), so the trial has a checkpoint to resume from."""

    PROGRESS = re.compile(r": step (\d+)/\d+ ")

    def __init__(self, sid: int, t0: float, after: int):
        self.sid, self.t0, self.after = sid, t0, after
        self.record: dict = {}

    def __call__(self, line: str) -> None:
        match = self.PROGRESS.search(line)
        if self.record or not match or int(match.group(1)) < self.after:
            return
        nodes = training_nodes(self.sid)
        if not nodes:
            return
        node = min(nodes)
        killed = reclaim_node(self.sid, node)
        self.record = {"t": round(time.time() - self.t0, 1), "node": node,
                       "processes": killed, "after_step": int(match.group(1))}
        print(f"[{self.record['t']:7.1f} s] reclaimed worker node {node[-8:]} after the "
              f"result of step {match.group(1)} ({killed} processes killed)", flush=True)


def run_study(config: Path, env: dict, on_line=None) -> tuple[int, dict | None, list[str]]:
    """studies/scaling.py on the cluster; its lines are echoed with a prefix (and handed to
    `on_line`)."""
    proc = subprocess.Popen([sys.executable, str(REPO / "studies" / "scaling.py"), "--config",
                             str(config), "--json"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        print(f"  study | {line.rstrip()}", flush=True)
        if on_line is not None:
            on_line(line)
    rc = proc.wait()
    summary = None
    with contextlib.suppress(Exception):
        summary = json.loads(next(l for l in reversed(lines) if l.startswith("{")))
    return rc, summary, lines


def shared_sample() -> Path:
    root = Path(os.environ.get("TERNARYLM_SHARED_DATA", REPO.parent / "shared" / "data"))
    return root / "tinystories" / "tinystories_sample.txt"


def watch_study(cluster: LocalAutoscalingCluster, args: argparse.Namespace, t0: float) -> dict:
    """Run the study on the started cluster, recording worker nodes up and down until every
    idle one is removed (at most 2 minutes after the study)."""
    watch = NodeWatch(cluster.address, t0)
    reclaim = Reclaimer(cluster.proc.pid, t0, args.reclaim_after_step) if args.reclaim else None
    try:
        config = study_config(cluster.workdir / "study.yaml", args.data, args.reclaim)
        rc, summary, lines = run_study(config, cluster.env, reclaim)
        ended = time.time() - t0
        print(f"[{ended:7.1f} s] study ended (exit {rc}); waiting for idle nodes to be removed",
              flush=True)
        deadline = time.time() + 120
        while watch.worker_nodes() and time.time() < deadline:
            time.sleep(1)
        time.sleep(2 * watch.every)
    finally:
        watch.close()
    return {"study_rc": rc, "study": summary, "study_seconds": round(ended, 1),
            "waiting_lines": [line for line in lines if "waiting for the autoscaler" in line],
            "reclaimed": reclaim.record if reclaim else None, "events": watch.events}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reclaim", action="store_true",
                        help="one 2-worker trial; a node holding a rank vanishes mid-training")
    parser.add_argument("--reclaim-after-step", type=int, default=60,
                        help="reclaim once the study printed the result of this step")
    parser.add_argument("--data", type=Path, default=shared_sample(), help="a .txt corpus")
    parser.add_argument("--workdir", type=Path, help="checkpoints, MLflow store, cluster config "
                                                     "(default: a new temporary folder)")
    parser.add_argument("--idle-timeout-minutes", type=float, default=0.1)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.error(f"{args.data}: no such corpus; give --data FILE.txt")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ternarylm-autoscaling-"))
    cluster = LocalAutoscalingCluster(workdir, yaml.safe_load(LAUNCHER.read_text()),
                                      idle_timeout_minutes=args.idle_timeout_minutes)
    for name in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):  # for the node watch
        os.environ[name] = cluster.env[name]
    t0 = time.time()
    result: dict = {"workdir": str(workdir), "node_types": cluster.config["available_node_types"]}
    cluster.start()
    result["head_session"] = cluster.proc.pid
    workers = [k for k in cluster.config["available_node_types"] if k != FAKE_HEAD_TYPE]
    print(f"[{time.time() - t0:7.1f} s] head up at {cluster.address} (session "
          f"{cluster.proc.pid}); worker node types: {', '.join(workers)}", flush=True)
    try:
        result |= watch_study(cluster, args, t0)
    finally:
        result["processes_left"] = cluster.stop()
        result["seconds"] = round(time.time() - t0, 1)
    ok = result["study_rc"] == 0 and not result["processes_left"]
    if ok:
        shutil.rmtree(cluster.ray_temp, ignore_errors=True)
    print(f"[{result['seconds']:7.1f} s] cluster stopped ({result['processes_left']} "
          f"processes left); Ray's logs: {'removed' if ok else cluster.ray_temp}", flush=True)
    if args.json:
        print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

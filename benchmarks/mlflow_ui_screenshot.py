"""A screenshot of the MLflow UI opening a study's experiment, taken in headless Chromium.

Starts `mlflow server` on loopback over the study's store, checks through the REST API that
the experiment opens in the model-training view (tag mlflow.experimentKind) and that the
study's parent run has its trials nested under it, then has Chromium (Debian's package,
`apt-get install chromium`) render the experiment page to a PNG. Stops the server it started.

    python benchmarks/mlflow_ui_screenshot.py --out study.png \
        [--backend-store-uri sqlite:///$HOME/.ternarylm/mlflow.db] [--experiment ternarylm]

With --json the last line is {"url", "experiment_id", "experiment_kind", "parent_runs",
"nested_runs", "png", "png_bytes"}.
"""

import os
import sys

# benchmarks/tokenize.py shadows the stdlib module `tokenize`: drop this folder from the path.
sys.path = [p for p in sys.path
            if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, path: str, body: dict | None = None) -> dict:
    if body is None:
        request = urllib.request.Request(base + path)
    else:
        request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def wait_until_up(base: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit("mlflow_ui_screenshot: error: mlflow server exited; see its log")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5):
                return
        except OSError:
            time.sleep(1)
    sys.exit(f"mlflow_ui_screenshot: error: mlflow server not up after {timeout} s")


def study_view(base: str, experiment: str) -> dict:
    """The experiment's id and kind, and its parent runs with their nested trials."""
    query = urllib.parse.urlencode({"experiment_name": experiment})
    exp = api(base, f"/api/2.0/mlflow/experiments/get-by-name?{query}")["experiment"]
    tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
    runs = api(base, "/api/2.0/mlflow/runs/search",
               {"experiment_ids": [exp["experiment_id"]], "max_results": 1000}).get("runs", [])
    parents = {}
    for run in runs:
        run_tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        parent = run_tags.get("mlflow.parentRunId")
        if parent:
            parents.setdefault(parent, 0)
            parents[parent] += 1
    return {"experiment_id": exp["experiment_id"],
            "experiment_kind": tags.get("mlflow.experimentKind"),
            "parent_runs": len(parents), "nested_runs": sum(parents.values())}


def screenshot(url: str, out: Path, chromium: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                        "--window-size=1600,1000", "--virtual-time-budget=20000",
                        f"--screenshot={out}", url], check=True, capture_output=True,
                       timeout=180)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    home = Path(os.environ.get("TERNARYLM_HOME", Path.home() / ".ternarylm")).expanduser()
    parser.add_argument("--backend-store-uri", default=os.environ.get(
        "MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}"))
    parser.add_argument("--experiment", default="ternarylm")
    parser.add_argument("--out", default="mlflow_study.png")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("mlflow_ui_screenshot: error: no chromium found; apt-get install chromium",
              file=sys.stderr)
        return 2
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as d:
        log = open(Path(d) / "server.log", "w")
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host",
                                   "127.0.0.1", "--port", str(port), "--backend-store-uri",
                                   args.backend_store_uri, "--workers", "1"],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_up(base, server)
            view = study_view(base, args.experiment)
            # The UI's workflow switch defaults to GenAI; this opens the model-training view.
            url = (f"{base}/#/experiments/{view['experiment_id']}/runs"
                   f"?workflowType=machine_learning")
            out = Path(args.out).resolve()
            screenshot(url, out, chromium)
        finally:  # the server and the workers it forked: its own process session
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    result = {"url": url, **view, "png": str(out), "png_bytes": out.stat().st_size}
    print(f"{out}: {args.experiment} (kind {view['experiment_kind']}), {view['parent_runs']} "
          f"parent run(s) with {view['nested_runs']} nested")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

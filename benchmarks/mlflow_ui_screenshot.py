"""Screenshots of the MLflow UI over a study, taken in headless Chromium.

Starts `mlflow server` on loopback over the study's store, checks through the REST API that
the study's parent run has its trials nested under it, then has Chromium (Debian's package,
`apt-get install chromium`, driven by Playwright: `pip install playwright`, no browser
download) render, each in a fresh browser profile:

    01-experiment.png   the experiment's plain link `#/experiments/<id>`: what a new browser
                        opens (MLflow 3's UI picks GenAI or model training from the link's
                        `workflowType`, else the browser's last choice; not from the tag)
    02-runs.png         the link a study prints (`?workflowType=machine_learning`), the study's
                        row expanded: Dataset, Source and Models of every trial
    03-trial.png        one trial's run page (its dataset inputs, source, logged model)
    04-parent.png       the study's parent run page (its results and frontier tables)
    05-models.png       the experiment's Models tab (every trial's logged model)
    06-registered.png   the registered model's page (`ternarylm register STUDY`), if any

    python benchmarks/mlflow_ui_screenshot.py --out-dir screens \
        [--backend-store-uri sqlite:///$HOME/.ternarylm/mlflow.db] [--experiment ternarylm]

With --json the last line is {"experiment_id", "experiment_kind", "parent_runs",
"nested_runs", "registered_model", "pngs": {name: {"url", "bytes"}}}.
"""

import os
import sys

# benchmarks/tokenize.py shadows the stdlib module `tokenize`: drop this folder from the path.
sys.path = [p for p in sys.path
            if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

ML = "workflowType=machine_learning"
SETTLE_MS = 6000
"""How long a page gets to fetch and draw its runs, charts and tables after it loads."""


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


def wait_until_up(base: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"mlflow server not up after {timeout} s: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, artifacts_destination: str | None = None
                  ) -> Iterator[str]:
    """A real `mlflow server` on a free loopback port (its base URL), serving artifacts (to
    `artifacts_destination`, else MLflow's default beside the working directory); it and the
    workers it forked, its own process session, are stopped afterwards."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    extra = ["--artifacts-destination", artifacts_destination] if artifacts_destination else []
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "server.log"
        with open(log, "w") as out:
            server = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                 str(port), "--backend-store-uri", backend_store_uri, "--workers", "1", *extra],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_up(base, server, log)
            yield base
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def study_view(base: str, experiment: str) -> dict:
    """The experiment's id and kind, its parent runs with their nested trials, one trial and
    the newest parent."""
    query = urllib.parse.urlencode({"experiment_name": experiment})
    exp = api(base, f"/api/2.0/mlflow/experiments/get-by-name?{query}")["experiment"]
    tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
    runs = api(base, "/api/2.0/mlflow/runs/search",
               {"experiment_ids": [exp["experiment_id"]], "max_results": 1000,
                "order_by": ["attributes.start_time DESC"]}).get("runs", [])
    parents: dict[str, list[str]] = {}
    for run in runs:
        run_tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        if "mlflow.parentRunId" in run_tags and run["info"]["status"] == "FINISHED":
            parents.setdefault(run_tags["mlflow.parentRunId"], []).append(run["info"]["run_id"])
    if not parents:
        raise RuntimeError(f"experiment {experiment!r} has no finished nested runs")
    parent = next(r["info"]["run_id"] for r in runs if r["info"]["run_id"] in parents)
    models = api(base, "/api/2.0/mlflow/registered-models/search?max_results=10").get(
        "registered_models", [])
    return {"experiment_id": exp["experiment_id"],
            "experiment_kind": tags.get("mlflow.experimentKind"),
            "parent_runs": len(parents), "nested_runs": sum(map(len, parents.values())),
            "parent_run_id": parent, "trial_run_id": parents[parent][0],
            "registered_model": models[0]["name"] if models else None}


def pages(base: str, view: dict) -> dict[str, str]:
    exp = f"{base}/#/experiments/{view['experiment_id']}"
    out = {"01-experiment": exp, "02-runs": f"{exp}/runs?{ML}",
           "03-trial": f"{exp}/runs/{view['trial_run_id']}?{ML}",
           "04-parent": f"{exp}/runs/{view['parent_run_id']}?{ML}",
           "05-models": f"{exp}/models?{ML}"}
    if view["registered_model"]:
        out["06-registered"] = f"{base}/#/models/{urllib.parse.quote(view['registered_model'])}"
    return out


def close_assistant(page) -> None:
    """Close the MLflow Assistant side panel (it opens by default and hides the table's right
    columns)."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()
        page.wait_for_timeout(500)


def expand_parent(page) -> None:
    """Open the study's row in the runs table (the + beside its name), so that its trials'
    rows show."""
    page.locator('button[data-component-id$="runnamecellrenderer.tsx_46"]').first.click(
        timeout=20_000)
    page.wait_for_timeout(SETTLE_MS // 2)


def shoot(chromium: str, urls: dict[str, str], out_dir: Path) -> dict[str, dict]:
    from playwright.sync_api import sync_playwright

    shots = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            for name, url in urls.items():
                context = browser.new_context(viewport={"width": 1600, "height": 1000})
                page = context.new_page()  # a fresh profile: no remembered workflow type
                page.goto(url, wait_until="load", timeout=120_000)
                page.wait_for_timeout(SETTLE_MS)
                close_assistant(page)
                if name == "02-runs":
                    expand_parent(page)
                png = out_dir / f"{name}.png"
                page.screenshot(path=str(png), full_page=False)
                shots[name] = {"url": url, "bytes": png.stat().st_size}
                context.close()
        finally:
            browser.close()
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    home = Path(os.environ.get("TERNARYLM_HOME", Path.home() / ".ternarylm")).expanduser()
    parser.add_argument("--backend-store-uri", default=os.environ.get(
        "MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}"))
    parser.add_argument("--experiment", default="ternarylm")
    parser.add_argument("--out-dir", default="mlflow_screens")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright  # noqa: F401
    except ImportError:
        chromium = None
    if chromium is None:
        print("mlflow_ui_screenshot: error: needs Chromium and Playwright; apt-get install "
              "chromium && pip install playwright", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with mlflow_server(args.backend_store_uri) as base:
            view = study_view(base, args.experiment)
            shots = shoot(chromium, pages(base, view), out_dir)
    except (RuntimeError, urllib.error.HTTPError) as e:
        print(f"mlflow_ui_screenshot: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    for name, shot in shots.items():
        print(f"{out_dir / name}.png: {shot['url']}")
    print(f"{args.experiment} (kind {view['experiment_kind']}): {view['parent_runs']} parent "
          f"run(s) with {view['nested_runs']} nested; registered model "
          f"{view['registered_model']}")
    if args.json:
        print(json.dumps({**{k: view[k] for k in ("experiment_id", "experiment_kind",
                                                  "parent_runs", "nested_runs",
                                                  "registered_model")}, "pngs": shots}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

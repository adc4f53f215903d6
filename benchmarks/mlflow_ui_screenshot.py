"""Screenshot of the MLflow UI's page for a sweep experiment, as a first-time user sees it.

Starts a real ``mlflow server`` on 127.0.0.1 (SQLite backend in a temp dir), creates an
experiment through regvi's ``ensure_experiment`` (which tags it
``mlflow.experimentKind = custom_model_development``), logs a parent run with two nested trial
runs (params, metrics, a short loss curve) the way a sweep does, opens the experiment's page in
headless Chromium (fresh profile: no stored UI settings), expands the parent run, closes the
Assistant side panel and saves a screenshot.

    python benchmarks/mlflow_ui_screenshot.py [--out benchmarks/results/mlflow_ui.png]
        [--link sweep|plain] [--browser PATH]

``--link sweep`` (default) opens the link ``docs/sweeps.md`` gives,
``/#/experiments/<id>?workflowType=machine_learning``, and fails unless the page shows the runs
table with the parent and both trials. ``--link plain`` opens ``/#/experiments/<id>``: MLflow
3.17's UI takes the experiment kind from its global GenAI / Model training switch (URL
``workflowType``, else the browser's stored choice, default GenAI), not from the tag, so a
first-time user lands on the GenAI Overview there.

Prerequisites: a Chromium or Chrome binary, looked up as ``--browser``, ``$CHROMIUM``, then
``chromium``, ``chromium-browser``, ``google-chrome``, ``google-chrome-stable`` on PATH (Debian /
Ubuntu: ``apt-get install chromium``); the script stops with a clear message if none is found.
It drives the browser over the DevTools protocol with ``aiohttp`` (installed with Ray).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from regvi.sweep.tracking import TAG_PARENT, TAG_TRIAL, ensure_experiment  # noqa: E402
from tests.mlflow_server import free_port, mlflow_server, stop_server  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser(explicit: str | None) -> str:
    """Path of a Chromium/Chrome binary, or exit with what to install."""
    if explicit and not shutil.which(explicit):
        sys.exit(f"--browser {explicit}: not found or not executable")
    for name in (explicit, os.environ.get("CHROMIUM"), *BROWSERS):
        path = name and shutil.which(name)
        if path:
            return path
    sys.exit(
        "no headless browser found: looked for --browser, $CHROMIUM and "
        f"{', '.join(BROWSERS)} on PATH. Install one (Debian/Ubuntu: `apt-get install chromium`) "
        "or pass --browser /path/to/chrome."
    )


def log_sweep(uri: str) -> str:
    """A sweep-shaped experiment: one parent run and two nested trial runs; returns its id."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = ensure_experiment(uri, "regvi-quickstart")
    parent = c.create_run(exp, run_name="quickstart", tags={"regvi.sweep": "quickstart"})
    pid = parent.info.run_id
    trials = {"trial_0001": (128, 10, 0.61), "trial_0002": (256, 30, 0.67)}
    for i, (name, (hidden, latent, total)) in enumerate(trials.items()):
        run = c.create_run(exp, run_name=name, tags={TAG_PARENT: pid, TAG_TRIAL: name})
        now = int(time.time() * 1000)
        curve = [Metric("train_loss", 900.0 / (e + 1) + 50 * i, now, e) for e in range(10)]
        c.log_batch(
            run.info.run_id,
            metrics=[*curve, Metric("scib_total", total, now, 0)],
            params=[Param("n_hidden", str(hidden)), Param("n_latent", str(latent))],
            tags=[RunTag("regvi.state", "done")],
        )
        c.set_terminated(run.info.run_id)
    c.log_metric(pid, "best_scib_total", max(t[2] for t in trials.values()))
    c.set_terminated(pid)
    return exp


RUN_NAMES = "[...document.querySelectorAll('.ag-pinned-left-cols-container [role=row] a')]"
EXPANDERS = "button[data-component-id$='runnamecellrenderer.tsx_46']"  # the "+" of a parent run
ASSISTANT_CLOSE = "button[data-component-id='mlflow.assistant.chat_panel.close']"


async def _cdp(browser: str, url: str, out: Path, profile: Path) -> list[str]:
    """Open ``url`` in headless Chromium, expand parent runs, screenshot; returns the run names."""
    import aiohttp

    proc = subprocess.Popen(
        [
            browser,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",  # needed as root (containers); harmless otherwise
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--window-size=1400,900",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(600):
            if port_file.is_file() and port_file.read_text().strip():
                break
            if proc.poll() is not None:
                sys.exit(f"{browser} exited with {proc.returncode} before DevTools came up")
            await asyncio.sleep(0.1)
        port = port_file.read_text().split()[0]
        async with aiohttp.ClientSession() as http:
            targets = await (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
            page = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                ids = iter(range(1, 1 << 30))

                async def call(method: str, **params):
                    i = next(ids)
                    await ws.send_json({"id": i, "method": method, "params": params})
                    while (msg := await ws.receive_json()).get("id") != i:
                        pass
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    return msg["result"]

                async def js(expr: str):
                    r = await call("Runtime.evaluate", expression=expr, returnByValue=True)
                    return r["result"].get("value")

                await call(
                    "Emulation.setDeviceMetricsOverride",
                    width=1400,
                    height=900,
                    deviceScaleFactor=1,
                    mobile=False,
                )
                await call("Page.navigate", url=url)
                names: list[str] = []
                for _ in range(30):  # the runs table, if this page has one
                    await asyncio.sleep(1)
                    names = await js(f"{RUN_NAMES}.map(a => a.innerText)") or []
                    if names and await js(f'document.querySelectorAll("{EXPANDERS}").length'):
                        break
                # open the nested trials; close the Assistant side panel (room for metric columns)
                await js(f'document.querySelectorAll("{EXPANDERS}").forEach(b => b.click())')
                await js(f'document.querySelector("{ASSISTANT_CLOSE}")?.click()')
                await asyncio.sleep(3)
                names = await js(f"{RUN_NAMES}.map(a => a.innerText)") or []
                shot = await call("Page.captureScreenshot", format="png")
                out.write_bytes(base64.b64decode(shot["data"]))
                return names
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/mlflow_ui.png")
    ap.add_argument("--link", choices=("sweep", "plain"), default="sweep")
    ap.add_argument("--browser", default=None)
    args = ap.parse_args()
    browser = find_browser(args.browser)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = mlflow_server(Path(tmp), port)
        try:
            base = f"http://127.0.0.1:{port}"
            exp = log_sweep(base)
            url = f"{base}/#/experiments/{exp}"
            if args.link == "sweep":
                url += "?workflowType=machine_learning"
            args.out.parent.mkdir(parents=True, exist_ok=True)
            profile = Path(tmp) / "profile"
            profile.mkdir()
            names = asyncio.run(_cdp(browser, url, args.out.resolve(), profile))
            print(f"{url} -> {args.out}; runs table rows: {names or 'none (no runs table)'}")
            if args.link == "sweep" and sorted(names) != ["quickstart", "trial_0001", "trial_0002"]:
                sys.exit("the page does not show the parent run with its two nested trials")
        finally:
            stop_server(server)


if __name__ == "__main__":
    main()

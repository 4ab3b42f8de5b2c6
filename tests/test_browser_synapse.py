"""matrix-js-sdk in a real browser, on another origin, through the proxy (MSC3391 on) in
front of real Synapse.

Headless Chromium (Debian's package, driven by playwright-core: `tests/browser/drive.mjs`)
loads a page from a loopback port of its own, so every request the SDK makes to the
homeserver is cross-origin: each URL is preflighted with `OPTIONS` (the `Authorization`
header alone makes even a GET need one), and every response needs
`Access-Control-Allow-Origin`, or the page gets nothing but a `TypeError: Failed to fetch`.
The page (`tests/browser/page/scenario.js`, bundled by esbuild once per SDK version) sets,
reads, deletes and reads again one account data type with the SDK's public calls, its sync
loop running:

- matrix-js-sdk 37.5.0: `deleteAccountData` is the unstable MSC3391 `DELETE`, chosen
  because /versions advertises `org.matrix.msc3391`;
- matrix-js-sdk 43.0.0: `deleteAccountData` is `setAccountData(type, {})`, a `PUT {}` that
  then waits for the `{}` echo over /sync.

The same scenario run against Synapse with its own MSC3391 flag on, with no proxy, is the
control: a homeserver whose every answer carries CORS headers, seen by the same page.
"""

from __future__ import annotations

import functools
import http.server
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from rig.accounts import Account, register
from rig.programs import BROWSER_DIR, run_node_job
from rig.proxy_process import ProxyProcess
from rig.synapse import SynapseServer
from tests.matrix import MSC3391, V3, account_data_path

pytestmark = pytest.mark.synapse

SDK_VERSIONS = {"37": "37.5.0", "43": "43.0.0"}

# Every wait is bounded. In the page: each SDK call (one step) may take STEP_TIMEOUT_MS.
STEP_TIMEOUT_MS = 20_000
# The driver waits this long for the page's whole run, then reports how far it got.
RUN_TIMEOUT_MS = 90_000
# The driver process: Chromium's start (30 s at most), the page's load (30 s), the run.
DRIVER_TIMEOUT_S = 180
# esbuild bundling both SDK versions (about a second).
BUILD_TIMEOUT_S = 120


def access_line(method: str, prefix: str, status: int) -> re.Pattern[str]:
    """The proxy's access log line of an account data request (IDs logged as `{}`)."""
    return re.compile(
        rf"proxy\.access \[\w+\] \S+ {method} "
        + re.escape(prefix)
        + rf"/user/\{{\}}/account_data/\{{\}} {status} "
    )


def logged(proxy: ProxyProcess, line: re.Pattern[str], expected: int, timeout: float = 10.0) -> int:
    """How often `line` is in the proxy's log, once it is there `expected` times or after
    `timeout` seconds: the proxy writes an access line only after the response went out,
    so the browser can be faster than the log."""
    deadline = time.monotonic() + timeout
    while True:
        count = len(line.findall(proxy.log))
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


# --- the page server and the browser ---------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the built page; one stderr line per request would bury the test's output."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass(frozen=True)
class BrowserRun:
    returncode: int
    output: dict[str, Any]
    stderr: str

    @property
    def results(self) -> dict[str, Any]:
        return self.output.get("results") or {}

    def diagnosis(self) -> str:
        """What a failure message needs: the driver's error, the steps, the console's
        errors and warnings, and every request Chromium saw fail."""
        network = self.output.get("network", [])
        failed = [e for e in network if e.get("failed")]
        # A refused preflight is not a failed request to Chromium: its answer is the clue.
        refused = [e for e in network if e.get("method") == "OPTIONS" and not 200 <= e.get("status", 0) < 300]
        lines = [
            f"driver exit status {self.returncode}; driver error: {self.output.get('driverError')}",
            f"unexpected: {self.results.get('unexpected')}",
            "steps:",
            *(f"  {json.dumps(step)}" for step in self.results.get("steps", [])),
            "console errors and warnings:",
            *(
                f"  {m['type']}: {m['text']} ({m.get('url')})"
                for m in self.output.get("console", [])
                if m["type"] in ("error", "warning")
            ),
            f"page errors: {self.output.get('pageErrors')}",
            "failed requests:",
            *(f"  {json.dumps(e)}" for e in failed),
            "preflights not answered 2xx:",
            *(f"  {json.dumps(e)}" for e in refused),
            f"driver stderr (tail): {self.stderr[-2000:]}",
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class Browser:
    node: str
    chromium: str
    page_url: str

    @property
    def page_origin(self) -> str:
        return self.page_url.rsplit("/", 1)[0]

    def run(
        self, sdk: str, base_url: str, account: Account, kind: str, content: dict[str, Any]
    ) -> BrowserRun:
        job = {
            "pageUrl": self.page_url,
            "sdk": sdk,
            "chromium": self.chromium,
            "baseUrl": base_url,
            "userId": account.user_id,
            "accessToken": account.access_token,
            "deviceId": account.device_id,
            "type": kind,
            "content": content,
            "stepTimeoutMs": STEP_TIMEOUT_MS,
            "runTimeoutMs": RUN_TIMEOUT_MS,
        }
        done = run_node_job(self.node, BROWSER_DIR, "drive.mjs", "MSC3391_BROWSER_JOB", job, DRIVER_TIMEOUT_S)
        lines = done.stdout.strip().splitlines()
        assert lines, f"no output from drive.mjs (exit {done.returncode}):\n{done.stderr[-4000:]}"
        return BrowserRun(done.returncode, json.loads(lines[-1]), done.stderr)


@pytest.fixture(scope="session")
def browser(require: Callable[[str], str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """The page bundled (both SDK versions) and served on a loopback port of its own: an
    origin other than any homeserver's. Chromium itself starts anew for each run."""
    chromium = require("chromium")
    node = require("browser-js")
    site = tmp_path_factory.mktemp("browser-page")
    built = subprocess.run(
        [node, "build.mjs", str(site)],
        cwd=BROWSER_DIR,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    assert built.returncode == 0, f"build.mjs failed:\n{built.stdout}\n{built.stderr[-4000:]}"
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=site)
    )
    thread = threading.Thread(target=server.serve_forever, name="browser-page-server", daemon=True)
    thread.start()
    try:
        yield Browser(node, chromium, f"http://127.0.0.1:{server.server_address[1]}/index.html")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --- the scenario and what must hold -----------------------------------------------------------


def content_for(sdk: str) -> dict[str, Any]:
    return {"set_by": f"matrix-js-sdk {SDK_VERSIONS[sdk]} in Chromium"}


def run_scenario(browser: Browser, sdk: str, base_url: str, account: Account) -> tuple[BrowserRun, str]:
    kind = f"org.example.browser.v{sdk}"
    return browser.run(sdk, base_url, account, kind, content_for(sdk)), kind


def check_scenario(
    run: BrowserRun, browser: Browser, sdk: str, base_url: str, account: Account, kind: str
) -> None:
    """Everything the page reports, step by step, then the network as Chromium saw it."""
    diagnosis = run.diagnosis()
    assert run.output.get("driverError") is None, diagnosis
    results = run.results
    assert results.get("sdkVersion") == SDK_VERSIONS[sdk], diagnosis

    # Cross-origin: the page is on its own port, the SDK talks to another origin.
    assert results["pageOrigin"] == browser.page_origin, diagnosis
    assert results["homeserverOrigin"] == base_url, diagnosis
    assert results["pageOrigin"] != results["homeserverOrigin"]

    content = content_for(sdk)
    v3_path = account_data_path(V3, account.user_id, kind)
    not_found = {
        "isMatrixError": True,
        "name": "M_NOT_FOUND",
        "message": f"MatrixError: [404] Account data not found ({base_url}{v3_path})",
        "errcode": "M_NOT_FOUND",
        "httpStatus": 404,
        "data": {"errcode": "M_NOT_FOUND", "error": "Account data not found"},
    }
    expected_steps: list[tuple[str, Any]] = [
        # 37.5.0 reads this from /versions to pick the unstable DELETE; 43.0.0 does not use it.
        ("start", {"supportsMsc3391": True}),
        # setAccountData resolves with the PUT's answer once /sync echoed the type.
        ("set", {}),
        ("read", content),
        # 37.5.0 returns the DELETE's body; 43.0.0's deleteAccountData returns nothing.
        ("delete", {} if sdk == "37" else "undefined"),
        # The `{}` echo over /sync. 37.5.0's MemoryStore drops an event with empty content;
        # 43.0.0's keeps it, with `{}` as its content.
        ("deletion synced", {"content": {}, "inStore": "undefined" if sdk == "37" else {}}),
        # getAccountDataFromServer turns M_NOT_FOUND into null ...
        ("read after delete", None),
        # ... the request below it shows the SDK's MatrixError for the 404.
        ("read after delete, raw", {"thrown": not_found}),
    ]
    steps = results.get("steps", [])
    for index, (name, value) in enumerate(expected_steps):
        assert index < len(steps), f"the page stopped before step {name!r}\n{diagnosis}"
        step = steps[index]
        assert step["name"] == name, diagnosis
        assert step["ok"], f"step {name!r} failed in the browser: {step.get('error')}\n{diagnosis}"
        assert step["value"] == value, f"step {name!r} returned {step['value']!r}, not {value!r}\n{diagnosis}"
    assert len(steps) == len(expected_steps), diagnosis
    assert "unexpected" not in results, diagnosis
    assert run.returncode == 0, diagnosis

    # The account data requests as the SDK handed them to fetch, with their statuses:
    # 37.5.0 deletes with the unstable DELETE, 43.0.0 with a PUT (of `{}`, below).
    delete = (
        ("client", "DELETE", account_data_path(MSC3391, account.user_id, kind), 200)
        if sdk == "37"
        else ("client", "PUT", v3_path, 200)
    )
    made = [
        (r["client"], r["method"], r["path"], r.get("status"))
        for r in results["requests"]
        if "/account_data/" in r["path"]
    ]
    assert made == [
        ("client", "PUT", v3_path, 200),
        ("reader", "GET", v3_path, 200),
        delete,
        ("reader", "GET", v3_path, 404),
        ("reader", "GET", v3_path, 404),
    ], diagnosis

    # The same requests as Chromium sent them, with their bodies.
    network = run.output["network"]
    sent = [
        (e["method"], e.get("body"))
        for e in network
        if e["method"] != "OPTIONS" and "/account_data/" in e["path"]
    ]
    assert sent == [
        ("PUT", json.dumps(content, separators=(",", ":"))),
        ("GET", None),
        ("DELETE", None) if sdk == "37" else ("PUT", "{}"),
        ("GET", None),
        ("GET", None),
    ], diagnosis

    # CORS as the browser did it: every request carried the page's Origin, every answer
    # allowed it, and each account data URL the SDK wrote or read to was preflighted
    # (its Authorization header makes even a GET non-simple) with a 2xx.
    answered = [e for e in network if "status" in e]
    assert answered, diagnosis
    assert [e for e in answered if e["origin"] != browser.page_origin] == [], diagnosis
    assert [e for e in answered if e["allowOrigin"] not in ("*", browser.page_origin)] == [], diagnosis
    preflighted = {e["path"] for e in answered if e["method"] == "OPTIONS" and 200 <= e["status"] < 300}
    assert {path for _, _, path, _ in made} <= preflighted, diagnosis
    # The only request allowed to fail is the long-poll that stopClient aborts at the end.
    failures = [
        e
        for e in network
        if e.get("failed") and not (e["path"].endswith("/sync") and e["failed"] == "net::ERR_ABORTED")
    ]
    assert failures == [], diagnosis
    assert [m for m in run.output["console"] if "CORS" in m["text"]] == [], diagnosis
    assert run.output["pageErrors"] == [], diagnosis


# --- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sdk", sorted(SDK_VERSIONS))
def test_matrix_js_sdk_in_chromium_on_another_origin_sets_reads_deletes_and_gets_404_through_the_proxy(
    sdk: str,
    browser: Browser,
    synapse: SynapseServer,
    proxy_process: Callable[..., ProxyProcess],
    unique_name: Callable[[str], str],
) -> None:
    proxy = proxy_process(synapse.url, msc3391=True)
    account = register(proxy.url, unique_name("browser"))
    run, kind = run_scenario(browser, sdk, proxy.url, account)
    check_scenario(run, browser, sdk, proxy.url, account, kind)

    # The proxy itself answered them: its access log has the requests. 37.5.0: the set is
    # the one PUT and the delete the unstable DELETE; 43.0.0: two PUTs (the second `{}`).
    # The two 404 reads came last: once they are logged, so is everything before them.
    assert logged(proxy, access_line("GET", V3, 404), 2) == 2, proxy.log
    puts, deletes = (1, 1) if sdk == "37" else (2, 0)
    assert logged(proxy, access_line("PUT", V3, 200), puts) == puts, proxy.log
    assert logged(proxy, access_line("DELETE", MSC3391, 200), deletes) == deletes, proxy.log


@pytest.mark.parametrize("sdk", sorted(SDK_VERSIONS))
def test_the_same_browser_scenario_passes_against_synapse_with_its_own_msc3391(
    sdk: str, browser: Browser, synapse_msc3391: SynapseServer, unique_name: Callable[[str], str]
) -> None:
    """The control: no proxy, Synapse's own MSC3391 (its /versions advertises it too), and
    CORS headers on all of Synapse's answers. What fails above and passes here is the
    proxy's doing, not the page's or the browser's."""
    account = register(synapse_msc3391.url, unique_name("browser"))
    run, kind = run_scenario(browser, sdk, synapse_msc3391.url, account)
    check_scenario(run, browser, sdk, synapse_msc3391.url, account, kind)

"""A real Prometheus and Alertmanager on 127.0.0.1 for integration tests (Debian's packages:
Prometheus 2.42, Alertmanager 0.25; ``scripts/setup.sh test`` installs them).

Everything runs in the caller's temp dir, on free ports, and is torn down on exit::

    with webhook_receiver() as hook, \\
         alertmanager(tmp, hook.url) as am, \\
         prometheus(tmp, ["127.0.0.1:9400"], alertmanager=am) as prom:
        wait_until("a scrape", lambda: query(prom, "up") != [])
        hook.wait(lambda alerts: any(...), timeout=30)

``prometheus`` scrapes its targets as job ``llm-exporter`` (the default SLO selector) every
second, evaluates the committed ``deploy/prometheus/rules.yaml`` (or the given rule files) every
second, and keeps exemplars. Both context managers yield the server's base URL.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.engine_procs import free_port

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
JOB = "llm-exporter"
T = TypeVar("T")


def binary(*names: str) -> str | None:
    """The first of ``names`` on PATH (or in /usr/bin), else None."""
    for name in names:
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file()
                                       else None)
        if found:
            return found
    return None


PROMETHEUS = binary("prometheus")
PROMTOOL = binary("promtool")
ALERTMANAGER = binary("alertmanager", "prometheus-alertmanager")


def missing() -> list[str]:
    """Names of the servers this machine lacks (empty: the stack can run)."""
    return [n for n, b in (("prometheus", PROMETHEUS), ("promtool", PROMTOOL),
                           ("alertmanager", ALERTMANAGER)) if b is None]


def wait_until(what: str, check: Callable[[], T], timeout: float = 30.0,
               interval: float = 0.25) -> T:
    """Poll ``check`` until it returns something truthy; AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (OSError, ValueError) as e:  # not up yet, or a half-written answer
            last_error = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}"
                                 + (f" (last error: {last_error})" if last_error else ""))
        time.sleep(interval)


def get_json(url: str, **params: Any) -> Any:
    if params:
        url += "?" + urllib.parse.urlencode(params, doseq=True)
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def query(base: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    """Instant query; the result list (``metric`` and ``value`` per series). Raises on a
    query Prometheus rejects (HTTP 400), with its error message."""
    params: dict[str, Any] = {"query": expr}
    if at is not None:
        params["time"] = at
    try:
        body = get_json(f"{base}/api/v1/query", **params)
    except urllib.error.HTTPError as e:
        raise AssertionError(f"Prometheus rejected {expr!r}: {e.read().decode()}") from None
    assert body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


def value(base: str, expr: str, at: float | None = None) -> float | None:
    """The single value of an instant query, None when it returns nothing."""
    result = query(base, expr, at)
    assert len(result) <= 1, (expr, result)
    return float(result[0]["value"][1]) if result else None


def alerts(base: str) -> list[dict[str, Any]]:
    """Prometheus' active alerts (pending and firing): labels, annotations, state."""
    return list(get_json(f"{base}/api/v1/alerts")["data"]["alerts"])


def _wait_ready(name: str, proc: subprocess.Popen[bytes], url: str, log: Path,
                timeout: float) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited ({proc.returncode}):\n"
                                 f"{log.read_text(errors='replace')[-3000:]}")
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)

    wait_until(f"{name} to be ready at {url}", ready, timeout=timeout)


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 10) -> None:
    """TERM every process (last started first), then wait, KILLing what does not exit."""
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@contextlib.contextmanager
def _process(name: str, argv: list[str], log: Path, ready_url: str,
             timeout: float) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        _wait_ready(name, proc, ready_url, log, timeout)
        yield
    finally:
        stop_processes([proc])


@contextlib.contextmanager
def prometheus(tmp: Path, targets: Sequence[str], *,
               rule_files: Sequence[Path | str] = (DEFAULT_RULES,),
               alertmanager: str | None = None, job: str = JOB,
               scrape_interval: str = "1s", evaluation_interval: str = "1s",
               timeout: float = 30.0) -> Iterator[str]:
    """Run Prometheus scraping ``targets`` (host:port, path /metrics) as ``job``; yields its
    base URL. ``alertmanager`` is an Alertmanager base URL to send alerts to."""
    assert PROMETHEUS, "prometheus is not installed (scripts/setup.sh test)"
    home = Path(tmp) / f"prometheus-{free_port()}"
    home.mkdir(parents=True)
    port = free_port()
    config: dict[str, Any] = {
        "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                   "evaluation_interval": evaluation_interval},
        "rule_files": [str(Path(f).resolve()) for f in rule_files],
        "scrape_configs": [{"job_name": job,
                            "static_configs": [{"targets": list(targets)}]}],
    }
    if alertmanager:
        am = urllib.parse.urlparse(alertmanager)
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [am.netloc]}]}]}
    (home / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [PROMETHEUS, f"--config.file={home / 'prometheus.yml'}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--enable-feature=exemplar-storage",
            "--rules.alert.resend-delay=1s", "--log.level=warn"]
    base = f"http://127.0.0.1:{port}"
    with _process("prometheus", argv, home / "prometheus.log", f"{base}/-/ready", timeout):
        yield base


@contextlib.contextmanager
def alertmanager(tmp: Path, webhook_url: str, *, group_by: Sequence[str] = ("alertname",
                 "model", "severity"), timeout: float = 30.0) -> Iterator[str]:
    """Run Alertmanager sending every alert (group_wait 0 s) to ``webhook_url``; yields its
    base URL. Clustering is off (no listener on 0.0.0.0:9094)."""
    assert ALERTMANAGER, "alertmanager is not installed (scripts/setup.sh test)"
    home = Path(tmp) / f"alertmanager-{free_port()}"
    home.mkdir(parents=True)
    port = free_port()
    config = {
        "route": {"receiver": "webhook", "group_by": list(group_by), "group_wait": "0s",
                  "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "webhook",
                       "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}],
    }
    (home / "alertmanager.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [ALERTMANAGER, f"--config.file={home / 'alertmanager.yml'}",
            f"--storage.path={home / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=", "--log.level=warn"]
    base = f"http://127.0.0.1:{port}"
    with _process("alertmanager", argv, home / "alertmanager.log", f"{base}/-/ready",
                  timeout):
        yield base


@dataclass
class Webhook:
    """What Alertmanager delivered: one entry per notification (its JSON body)."""

    url: str
    notifications: list[dict[str, Any]] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def alerts(self) -> list[dict[str, Any]]:
        """Every alert of every notification, in arrival order."""
        with self._changed:
            return [a for n in self.notifications for a in n.get("alerts", [])]

    def wait(self, match: Callable[[dict[str, Any]], bool], timeout: float = 30.0
             ) -> dict[str, Any]:
        """The first delivered alert ``match`` accepts; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for a in (a for n in self.notifications for a in n.get("alerts", [])):
                    if match(a):
                        return dict(a)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching alert delivered in {timeout:g} s; "
                                         f"got {json.dumps(self.notifications)[:2000]}")
                self._changed.wait(left)

    def _add(self, body: dict[str, Any]) -> None:
        with self._changed:
            self.notifications.append(body)
            self._changed.notify_all()


@contextlib.contextmanager
def webhook_receiver() -> Iterator[Webhook]:
    """An HTTP endpoint on 127.0.0.1 recording Alertmanager's webhook notifications."""
    hook: Webhook

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", 0))
            hook._add(json.loads(self.rfile.read(length) or b"{}"))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hook = Webhook(f"http://127.0.0.1:{server.server_address[1]}/alerts")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hook
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

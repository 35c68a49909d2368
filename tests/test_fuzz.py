"""A bounded fuzz run: schemathesis draws requests for every operation in /openapi.json,
valid ones and broken ones (wrong types, missing fields, odd strings), against a real
`flywheel serve` in front of the fake upstream, with keys on. No request may get a 500."""

import os
import subprocess
import sys
import time
import urllib.request

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode

from flywheel.proxy.openapi import SPEC
from tests.conftest import free_port
from tests.test_auth import ADMIN_KEY, CLIENT_KEY

EXAMPLES = 50  # per operation and mode: ~1,500 requests in all, about half a minute


def _wait_until_up(url: str, proc: subprocess.Popen, log) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} not up")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    upstream_port, port = free_port(), free_port()
    env = {**os.environ, "FLYWHEEL_PROXY_API_KEYS": CLIENT_KEY, "FLYWHEEL_PROXY_ADMIN_KEYS": ADMIN_KEY,
           "FLYWHEEL_PROXY_ADAPTER_ROOTS": str(tmp), "FLYWHEEL_PROXY_SQL_TIMEOUT_S": "5"}
    logs = tmp / "upstream.log", tmp / "proxy.log"
    upstream = subprocess.Popen([sys.executable, "-m", "tests.fake_upstream", "--port", str(upstream_port)],
                                stdout=logs[0].open("w"), stderr=subprocess.STDOUT)
    proxy = subprocess.Popen([sys.executable, "-m", "flywheel", "serve", "--upstream",
                              f"http://127.0.0.1:{upstream_port}", "--port", str(port), "--db", str(tmp / "f.duckdb")],
                             stdout=logs[1].open("w"), stderr=subprocess.STDOUT, env=env)
    try:
        _wait_until_up(f"http://127.0.0.1:{upstream_port}/v1/models", upstream, logs[0])
        _wait_until_up(f"http://127.0.0.1:{port}/healthz", proxy, logs[1])
        yield f"http://127.0.0.1:{port}", logs[1]
    finally:
        for process in (proxy, upstream):
            process.terminate()
            process.wait(30)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "broken"])
def test_no_request_gets_a_500(served, mode):
    url, log = served
    schema = schemathesis.openapi.from_dict(SPEC)
    failures: list[str] = []
    for found in schema.get_all_operations():
        operation = found.ok()

        @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck), phases=[hypothesis.Phase.generate])
        @hypothesis.given(case=operation.as_strategy(mode))
        def check(case):
            # the admin key reaches every route, so each request gets past the keys to the handlers
            response = case.call(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
            if response.status_code == 500:
                failures.append(f"{case.method} {case.formatted_path}: {case.body!r:.300}")

        try:
            check()
        except hypothesis.errors.Unsatisfiable:  # nothing to break in it (a GET without parameters)
            continue
    assert not failures, f"{len(failures)} requests got a 500, e.g. {failures[:3]}\n{log.read_text()[-3000:]}"

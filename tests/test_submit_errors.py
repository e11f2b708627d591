"""`guardray submit` against a head that cannot take jobs: one line naming the likely cause, no traceback.

The head is a real HTTP server on 127.0.0.1 that speaks the part of the Ray Jobs API the real
`JobSubmissionClient` uses (version check, package upload, submit) and answers the submit the way a head whose
dashboard agent is not running does (`ray/dashboard/modules/job/job_head.py`): HTTP 500, "No available agent".
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
import ray

from tests.conftest import REPO

BIN = Path(sys.executable).parent  # the venv running the tests
NO_AGENT = "No available agent to submit job, please try again later."


class HeadWithoutAgent(BaseHTTPRequestHandler):
    """The Jobs API of a head whose dashboard agent never came up; records each request as 'METHOD path'."""

    packages: set[str] = set()
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.requests.append(f"GET {self.path}")
        if self.path == "/api/version":
            self._reply(200, json.dumps({"version": "4", "ray_version": ray.__version__, "ray_commit": "test",
                                         "session_name": "test"}), "application/json")
        elif self.path.startswith("/api/packages/"):
            self._reply(200 if self.path in self.packages else 404, "")
        else:
            self._reply(404, "not found")

    def do_PUT(self) -> None:  # noqa: N802
        self.requests.append(f"PUT {self.path}")
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.packages.add(self.path)
        self._reply(200, "")

    def do_POST(self) -> None:  # noqa: N802
        self.requests.append(f"POST {self.path}")
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/api/jobs/":
            self._reply(500, NO_AGENT)
        else:
            self._reply(404, "not found")

    def _reply(self, status: int, body: str, content_type: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:  # keep the test output quiet
        pass


@pytest.fixture
def head_without_agent() -> Iterator[str]:
    HeadWithoutAgent.packages, HeadWithoutAgent.requests = set(), []
    server = ThreadingHTTPServer(("127.0.0.1", 0), HeadWithoutAgent)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_submit_to_a_head_without_agent_is_one_line(head_without_agent: str) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # this head has no token auth
    result = subprocess.run([str(BIN / "guardray"), "submit", "jobs/local-smoke.yaml", "--address", head_without_agent],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "POST /api/jobs/" in HeadWithoutAgent.requests  # the real client got as far as submitting
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [result.stderr.strip().splitlines()[-1]]
    (line,) = errors
    assert line.startswith(f"error: --address {head_without_agent}: ")
    assert "dashboard agent is not running" in line and "ray stop" in line
    assert "--dashboard-agent-listen-port" in line
    assert "submitted" not in result.stdout

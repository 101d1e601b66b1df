"""Start a real ``ditgraph serve`` process on a free loopback port for the API tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
TEST_NODES = str(Path(__file__).resolve().parent / "_api_nodes.py")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def workflow(nodes: dict, name: str = "test") -> dict:
    return {"format": "ditgraph/workflow", "version": 1, "nodes": nodes, "meta": {"name": name}}


def count_workflow(steps: int = 3, delay: float = 0.0, prefix: str = "text", start: int = 0) -> dict:
    """SlowCount -> IntToText -> SaveText, plus a PreviewAny of the count."""
    return workflow({
        "1": {"type": "SlowCount", "inputs": {"steps": steps, "delay": delay, "start": start}},
        "2": {"type": "IntToText", "inputs": {"value": {"from": ["1", "value"]}}},
        "3": {"type": "SaveText", "inputs": {"text": {"from": ["2", "text"]}, "prefix": prefix}},
        "4": {"type": "PreviewAny", "inputs": {"value": {"from": ["1", "value"]}}},
    })


class ServerProcess:
    """``python -m app.cli serve`` with its folders under ``root``; restartable on the same database."""

    def __init__(self, root: Path, token: str | None = None, plugins: bool = True, extra_args: tuple = ()):
        self.root = Path(root)
        self.token = token
        self.plugins = plugins
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        for name in ("output", "input", "models", "workflows", "cwd"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self.output_dir = (self.root / "output").resolve()
        self.input_dir = (self.root / "input").resolve()
        self.workflows_dir = (self.root / "workflows").resolve()
        self.db = self.root / "queue.sqlite3"
        self.log_path = self.root / "server.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "NICEGUI_", "DITGRAPH_"))}
        env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), DITGRAPH_OUTPUTS=str(self.output_dir),
                   DITGRAPH_INPUTS=str(self.input_dir), DITGRAPH_MODELS=str(self.root / "models"),
                   DITGRAPH_WORKFLOWS=str(self.workflows_dir), DITGRAPH_DB=str(self.db), CUDA_VISIBLE_DEVICES="")
        if self.plugins:
            env["DITGRAPH_PLUGINS"] = TEST_NODES
        return env

    def start(self, timeout: float = 60) -> ServerProcess:
        args = [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port), "--device", "cpu", *self.extra_args]
        if self.token:
            args += ["--token", self.token]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(args, cwd=self.root / "cwd", env=self.env(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                response = httpx.get(self.base_url + "/api/status", headers=self.headers(), timeout=2)
                if response.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not answer within {timeout}s:\n{self.log()}")

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers(), timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def wait_run(self, client: httpx.Client, run_id: str, timeout: float = 30, until=("success", "failed", "cancelled")) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = client.get(f"/api/runs/{run_id}").json()
            if record.get("status") in until:
                return record
            time.sleep(0.05)
        raise AssertionError(f"run {run_id} did not reach {until} in {timeout}s: {record}")


_shared: dict[str, ServerProcess] = {}
TOKEN = "correct-horse-battery"


def _shared_process(key: str, **kwargs) -> ServerProcess:
    """One server process per kind for the whole test session (starting one costs seconds);
    stopped when the test process exits."""
    server = _shared.get(key)
    if server is None:
        import atexit
        import shutil
        import tempfile

        root = Path(tempfile.mkdtemp(prefix=f"ditgraph-api-test-{key}-"))
        server = _shared[key] = ServerProcess(root, **kwargs)
        atexit.register(shutil.rmtree, root, True)
        atexit.register(server.stop)
    if server.process is None or server.process.poll() is not None:
        server.start()
    return server


def shared_server() -> ServerProcess:
    """The server with the test nodes and no token."""
    return _shared_process("open")


def shared_token_server() -> ServerProcess:
    """The server with the test nodes that requires ``TOKEN``."""
    return _shared_process("token", token=TOKEN)


def wait_idle(server: ServerProcess, timeout: float = 60) -> None:
    """Until nothing is queued or running (earlier tests may have left runs behind)."""
    deadline = time.monotonic() + timeout
    with server.client() as client:
        while time.monotonic() < deadline:
            if not client.get("/api/runs", params={"limit": 1}).json()["queue"]:
                return
            time.sleep(0.05)
    raise AssertionError("the server's queue did not drain")

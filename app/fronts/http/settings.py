"""Server settings: folders, limits, token, allowed origins and hosts; refused combinations."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from app.core import paths

MB = 1 << 20
TOKEN_CHARS = re.compile(r"[!#-+\--:<-\[\]-~]+")  # RFC 6265 cookie-octets
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]", "ip6-localhost"}


class ConfigError(ValueError):
    """A server setting that cannot work (e.g. a public bind address without a token)."""


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8188
    token: str | None = None
    db_path: Path | None = None  # default: $DITGRAPH_DB or ~/ditgraph/queue.sqlite3
    workflows_dir: Path | None = None  # default: $DITGRAPH_WORKFLOWS or ~/ditgraph/workflows
    shipped_workflows_dir: Path = paths.REPO_ROOT / "graphs"
    max_upload_bytes: int = 32 * MB
    max_json_bytes: int = 16 * MB
    allowed_origins: list[str] = field(default_factory=list)  # extra origins trusted without a token
    allowed_hosts: list[str] = field(default_factory=list)  # extra Host names accepted without a token
    max_retries: int = 2
    keep_history: int = 10000
    ray: str | None = None  # dispatch to Ray workers at this address ("auto", HOST:PORT); None: in this process
    ray_device: str | None = None  # the Ray workers' device (default: one GPU each when the cluster has GPUs)
    ray_engine: dict = field(default_factory=dict)  # the workers' engine options (VRAM budget, cache policy)

    def __post_init__(self) -> None:
        if self.token is None:
            self.token = os.environ.get("DITGRAPH_TOKEN") or None
        if self.db_path is None:
            self.db_path = Path(os.environ.get("DITGRAPH_DB") or Path.home() / "ditgraph" / "queue.sqlite3")
        if self.workflows_dir is None:
            self.workflows_dir = Path(os.environ.get("DITGRAPH_WORKFLOWS") or Path.home() / "ditgraph" / "workflows")
        self.db_path = Path(self.db_path).expanduser()
        self.workflows_dir = Path(self.workflows_dir).expanduser()

    def check(self) -> None:
        if not is_loopback(self.host) and not self.token:
            raise ConfigError(f"refusing to listen on {self.host} without a token: anyone on the network could run code "
                              "on this machine. Pass --token T (or set DITGRAPH_TOKEN), or bind 127.0.0.1")
        if self.token is not None and len(self.token) < 8:
            raise ConfigError("the token must be at least 8 characters")
        if self.token is not None and not TOKEN_CHARS.fullmatch(self.token):
            # it travels in a header, a query string and a cookie: only characters all three carry unchanged
            raise ConfigError("the token may use only ASCII letters, digits and !#$%&'()*+-./:<=>?@[]^_`{|}~ "
                              "(no spaces, quotes, commas, semicolons or backslashes)")


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

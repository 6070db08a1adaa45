"""HOME/dorothy.toml: read once at start, every key validated, and every
error names the file and the key."""

import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..protocol.manifest import DEFAULT_CHUNK_SIZE


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Config:
    name: str
    listen_host: str = "127.0.0.1"
    listen_port: int = 7420
    max_active_total: int = 8
    max_active_per_peer: int = 2
    retry_initial_seconds: float = 1.0
    retry_max_seconds: float = 300.0
    connect_timeout_seconds: float = 10.0
    # A connection that brings no bytes for this long is dropped, so a stalled
    # peer cannot pin a transfer slot forever.
    idle_timeout_seconds: float = 120.0
    log_format: str = "text"
    chunk_size: int = DEFAULT_CHUNK_SIZE


# section -> key -> (field, type, check, description)
_SCHEMA = {
    "node": {
        "name": ("name", str, lambda v: 0 < len(v) <= 64, "a name of 1 to 64 characters"),
        "listen": ("listen", str, None, "HOST:PORT"),
    },
    "limits": {
        "max_active_total": ("max_active_total", int, lambda v: 1 <= v <= 1024, "an integer from 1 to 1024"),
        "max_active_per_peer": ("max_active_per_peer", int, lambda v: 1 <= v <= 64, "an integer from 1 to 64"),
    },
    "retry": {
        "initial_seconds": ("retry_initial_seconds", (int, float), lambda v: 0.01 <= v <= 3600, "0.01 to 3600"),
        "max_seconds": ("retry_max_seconds", (int, float), lambda v: 0.01 <= v <= 86400, "0.01 to 86400"),
    },
    "network": {
        "connect_timeout_seconds": ("connect_timeout_seconds", (int, float), lambda v: 0.1 <= v <= 600, "0.1 to 600"),
        "idle_timeout_seconds": ("idle_timeout_seconds", (int, float), lambda v: 1 <= v <= 86400, "1 to 86400"),
    },
    "transfer": {
        "chunk_size": (
            "chunk_size",
            int,
            lambda v: (1 << 16) <= v <= (1 << 22) and v & (v - 1) == 0,
            "a power of two from 65536 to 4194304",
        ),
    },
    "log": {
        "format": ("log_format", str, lambda v: v in ("text", "json"), "'text' or 'json'"),
    },
}


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def load_config(path: Path) -> Config:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing; is this a Dorothy home? (create one with 'dorothy init')") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    values = {}
    for section, table in raw.items():
        schema = _SCHEMA.get(section)
        if schema is None or not isinstance(table, dict):
            raise ConfigError(f"{path}: unknown section [{section}]")
        for key, value in table.items():
            if key not in schema:
                raise ConfigError(f"{path}: unknown key '{section}.{key}'")
            field, kind, check, description = schema[key]
            if isinstance(value, bool) or not isinstance(value, kind) or (check and not check(value)):
                raise ConfigError(f"{path}: '{section}.{key}' must be {description}, not {value!r}")
            values[field] = value
    if "name" not in values:
        raise ConfigError(f"{path}: missing 'node.name'")
    if "listen" in values:
        try:
            values["listen_host"], values["listen_port"] = parse_listen(values.pop("listen"))
        except ValueError as exc:
            raise ConfigError(f"{path}: 'node.listen' {exc}") from None
    if values.get("retry_initial_seconds", 1.0) > values.get("retry_max_seconds", 300.0):
        raise ConfigError(f"{path}: 'retry.initial_seconds' exceeds 'retry.max_seconds'")
    return Config(**values)


def render_config(name: str, listen: str) -> str:
    return (
        "# Dorothy node configuration. See README.md for every key.\n"
        "[node]\n"
        f"name = {name!r}\n"
        f"listen = {listen!r}\n"
        "\n[limits]\nmax_active_total = 8\nmax_active_per_peer = 2\n"
        "\n[retry]\ninitial_seconds = 1.0\nmax_seconds = 300.0\n"
    ).replace("'", '"')

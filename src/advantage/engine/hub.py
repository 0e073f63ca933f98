"""A local folder or a Hugging Face hub id: a name that is neither fails at once, naming the
field, instead of after a minute of network retries and a long traceback.

    exists on disk                      → the local path (`~` expanded)
    cannot be a hub id (a file suffix,  → "the folder ... does not exist"
      `./`, two slashes, ...)
    in the local hub cache              → the id (loads offline)
    HF_HUB_OFFLINE set                  → "... and hub downloads are unavailable offline"
    the hub's host cannot be reached    → "... and the hub (huggingface.co) cannot be reached"
    otherwise                           → the id (downloaded by transformers / datasets)
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from .configlib import ConfigError

HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")
"""`name` or `owner/name` (the hub's repository ids)."""
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".yaml", ".yml", ".py", ".txt")
TRUE = ("1", "true", "yes", "on")


def offline() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in TRUE
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""


def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the hub opens within `timeout` s (assumed yes behind a proxy)."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return True
    try:
        socket.create_connection((hub_host(), 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def looks_like_hub_id(name: str) -> bool:
    return bool(HUB_ID.fullmatch(name)) and not name.endswith(FILE_SUFFIXES) and ".." not in name


def _cached(repo_id: str, probe: str, repo_type: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, probe, repo_type=repo_type), str)
    except Exception:  # an id the cache cannot hold
        return False


def local_or_hub(
    name: str, field: str, probe: str = "config.json", repo_type: str = "model", kind="folder"
) -> str:
    """`name` as a local path when it exists, else as a hub id that can be loaded; otherwise a
    ConfigError naming `field`. `probe` is a file every such repository has (for the cache)."""
    path = Path(name).expanduser()
    if path.exists():  # absolute: what is written down of it (a LoRA adapter's base) holds anywhere
        return str(path.resolve())
    missing = f"{field}: the {kind} {name!r} does not exist"
    if not looks_like_hub_id(name):
        raise ConfigError(missing)
    if _cached(name, probe, repo_type):
        return name
    if offline():
        raise ConfigError(f"{missing}, and hub downloads are unavailable offline (HF_HUB_OFFLINE)")
    if not hub_reachable():
        raise ConfigError(f"{missing}, and the hub ({hub_host()}) cannot be reached to download it")
    return name

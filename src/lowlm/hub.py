"""The Hugging Face Hub, asked only when it can answer.

Without a network, transformers, huggingface_hub and datasets retry for half a minute before
they fail. Before lowlm's first Hub access it finds out once (HF_HUB_OFFLINE, or a connection
to the Hub's host that fails within a few seconds) and, when the Hub is out of reach, puts
those libraries in their offline mode: their local cache still serves what it holds, and
anything else fails at once with a message that says why.
"""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlparse

PROBE_SECONDS = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}
_unprobed = object()
_reason: object = _unprobed  # why the Hub cannot be reached; None when it can


def offline_reason() -> str | None:
    """Why the Hub cannot be reached (offline mode, no connection), or None; found out once
    per process, switching the HF libraries to offline mode when it cannot."""
    global _reason
    if _reason is _unprobed:
        _reason = _probe()
        if _reason is not None:
            _go_offline()
    return _reason  # type: ignore[return-value]


def unreachable_note() -> str:
    """A clause for messages about a name that is not a local path: empty when the Hub can be
    reached; else why not, and what still works."""
    reason = offline_reason()
    if reason is None:
        return ""
    return (
        f" ({reason}: only local paths and what the Hugging Face cache already holds can be "
        "used; download it where there is a connection, or point to a local copy)"
    )


def _probe() -> str | None:
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").upper() in _TRUE:
            return f"{variable} is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return None  # only the proxy knows; let the libraries try
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        return f"no connection to {host} ({exc.strerror or type(exc).__name__})"
    return None


def _go_offline() -> None:
    """Offline mode for the HF libraries: the environment for those not imported yet, their
    module constants for those that are (they read the variable once, at import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module, names in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
    ):
        loaded = sys.modules.get(module)
        for name in names if loaded is not None else ():
            setattr(loaded, name, True)

"""Auth by default off loopback, constant-time key checks, and secrets that never reach a message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from dinoforge.serve.backends.fake import FakeBackend
from dinoforge.serve.server import BackgroundServer, free_port
from dinoforge.serve.settings import ServeSettings

SECRET = "sk-very-secret-4242"


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "dinoforge.core.cli", "serve", "--port", str(free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.7", "example.org"])
def test_non_loopback_bind_needs_keys_or_an_explicit_opt_out(host: str) -> None:
    with pytest.raises(ValidationError, match="insecure-no-auth"):
        ServeSettings(host=host)
    assert ServeSettings(host=host, api_keys=[SECRET]).api_keys
    assert ServeSettings(host=host, insecure_no_auth=True).insecure_no_auth


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_binds_may_run_without_keys(host: str) -> None:
    assert ServeSettings(host=host).api_keys == []


def test_cli_refuses_an_open_public_bind_with_a_clear_message(tmp_path: Path) -> None:
    out = _serve("--host", "0.0.0.0", "--model", str(tmp_path / "missing"))
    assert out.returncode == 2
    assert "--insecure-no-auth" in out.stderr and "Traceback" not in out.stderr


def test_config_errors_never_print_the_keys(tmp_path: Path) -> None:
    # a whole-settings check fails: its pydantic "input" is every option, the keys included
    out = _serve("--api-key", SECRET, "--max-queue-size", "4", "--max-images", "8", "--model",
                 str(tmp_path / "missing"))
    assert out.returncode == 2 and "max_queue_size" in out.stderr
    assert SECRET not in out.stderr + out.stdout
    assert SECRET not in repr(ServeSettings(api_keys=[SECRET])) + str(ServeSettings(api_keys=[SECRET]))


def test_keys_of_any_length_and_bytes_are_checked_safely() -> None:
    keys = [SECRET, "k", "ключ-é"]
    with BackgroundServer(ServeSettings(port=0, api_keys=keys), backend=FakeBackend()) as server:
        for key in keys:
            headers = {"Authorization": ("Bearer " + key).encode()}
            assert httpx.get(server.url + "/v1/models", headers=headers).status_code == 200
        for bad in (SECRET[:-1], SECRET + "x", "k" * 10_000, "\u00ff\u00fe"):
            r = httpx.get(server.url + "/v1/models", headers={"Authorization": ("Bearer " + bad).encode()})
            assert r.status_code == 401 and SECRET not in r.text

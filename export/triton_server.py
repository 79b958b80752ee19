"""Start the ``tritonserver`` binary of the ``nvidia-pytriton`` wheel (in ``.venv-triton``) on local ports.

The wheel pins numpy<2, so it lives in its own venv (``export/triton_env.sh``). Its CPU build serves the Python
backend: the backend directory is assembled in a temporary folder with the stub matching the venv's Python,
and the stub finds ``libpython`` through ``LD_LIBRARY_PATH`` (the interpreter's ``LIBDIR``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from dinoforge.core.errors import MissingDependencyError

DEFAULT_VENV = Path(__file__).resolve().parents[1] / ".venv-triton"


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _venv_info(venv: Path) -> dict[str, str]:
    python = venv / "bin" / "python"
    if not python.is_file():
        raise MissingDependencyError(f"{venv} does not exist; run `make triton-env` (export/triton_env.sh)")
    code = ("import json, pathlib, sys, sysconfig, pytriton; r = pathlib.Path(pytriton.__file__).parent; "
            "print(json.dumps({'root': str(r), 'libdir': sysconfig.get_config_var('LIBDIR'), "
            "'version': f'{sys.version_info[0]}.{sys.version_info[1]}'}))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise MissingDependencyError(f"nvidia-pytriton is not importable in {venv}: {out.stderr.strip()}")
    return json.loads(out.stdout)


class TritonServer:
    """A real Triton server serving ``repo`` on free local ports; use as a context manager.

    Args:
        repo: model repository.
        venv: the venv holding nvidia-pytriton (default ``.venv-triton`` of this checkout).
        startup_timeout: seconds to wait for ``/v2/health/ready``.
        models: load only these models (explicit model control); default: every model of the repository.
    """

    def __init__(self, repo: str | Path, *, venv: str | Path = DEFAULT_VENV, startup_timeout: float = 60.0,
                 models: list[str] | None = None) -> None:
        self.repo = Path(repo)
        self.models = models
        self.venv = Path(venv)
        self.startup_timeout = startup_timeout
        self.http_port = self.grpc_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """HTTP endpoint ``127.0.0.1:PORT`` (for ``tritonclient.http``)."""
        return f"127.0.0.1:{self.http_port}"

    def _backends(self, info: dict[str, str], root: Path) -> Path:
        src = Path(info["root"]) / "tritonserver"
        python_dir = root / "backends" / "python"
        python_dir.mkdir(parents=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copyfile(src / "backends" / "python" / name, python_dir / name)
        stub = src / "python_backend_stubs" / info["version"] / "triton_python_backend_stub"
        if not stub.is_file():
            raise MissingDependencyError(f"no Triton Python stub for Python {info['version']} in {src}")
        shutil.copyfile(stub, python_dir / "triton_python_backend_stub")
        (python_dir / "triton_python_backend_stub").chmod(0o755)
        return root / "backends"

    def start(self) -> TritonServer:
        """Launch the server and wait until it reports ready; raises with the server log on failure."""
        info = _venv_info(self.venv)
        self._tmp = tempfile.TemporaryDirectory(prefix="dinoforge-tritonserver-")
        root = Path(self._tmp.name)
        backends = self._backends(info, root)
        libs = Path(info["root"]).parent / "nvidia_pytriton.libs"
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join(filter(None, [info["libdir"], str(libs), env.get("LD_LIBRARY_PATH")]))
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '')}"  # the stub's Python environment
        self.http_port, self.grpc_port = free_port(), free_port()
        cmd = [str(Path(info["root"]) / "tritonserver" / "bin" / "tritonserver"),
               f"--model-repository={self.repo}", f"--backend-directory={backends}",
               f"--http-port={self.http_port}", "--http-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
               "--grpc-address=127.0.0.1", "--allow-metrics=false", "--exit-on-error=true", "--exit-timeout-secs=5"]
        if self.models:
            cmd += ["--model-control-mode=explicit", *(f"--load-model={m}" for m in self.models)]
        self.log_path = root / "server.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {self.startup_timeout} s:\n{self.log()}")

    def log(self) -> str:
        """The server's output so far."""
        return self.log_path.read_text(errors="replace") if hasattr(self, "log_path") else ""

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 20 s) and remove its temporary files."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

"""Two (or more) "nodes" on this machine: one torchrun agent per node, joined by a c10d rendezvous.

Each agent is started exactly as on a real cluster node (``--nnodes N --rdzv-backend c10d --rdzv-endpoint
HOST:PORT --rdzv-id ID``); the rendezvous assigns the node ranks in the order the agents join. The only
single-machine concession is ``--local-addr 127.0.0.1``: the address the agents advertise to each other, so the
test never depends on this machine's hostname resolving.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

from tests.helpers import process_env


def free_port() -> int:
    """A TCP port nobody listens on right now (the rendezvous store binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def agent_command(*args: str, nnodes: int, nproc_per_node: int, port: int, rdzv_id: str) -> list[str]:
    """The torchrun line one node runs: ``python -m dinoforge.core.cli ARGS`` under a c10d rendezvous."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc_per_node}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id={rdzv_id}", "--local-addr=127.0.0.1", "--max-restarts=0",
            "-m", "dinoforge.core.cli", *args]


@dataclass
class AgentResult:
    """What one agent (one node) did: its exit status and its own and its workers' output."""

    returncode: int
    output: str

    def node_ranks(self) -> set[int]:
        """The node ranks its workers reported (each logs ``... (node G of N, ...)`` on joining the group)."""
        return {int(g) for g in re.findall(r"\(node (\d+) of \d+, local rank", self.output)}


def _stop(proc: subprocess.Popen) -> None:
    """End an agent that outlived the test and its workers (its own process group, started by us)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the agent forwards SIGTERM to its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def run_cli_nodes(*args: str, nnodes: int = 2, nproc_per_node: int = 1, timeout: float = 600,
                  **env: str) -> list[AgentResult]:
    """Run ``dinoforge ARGS`` as ``nnodes`` torchrun agents on this machine; one result per agent, never raises.

    Each agent writes to a file (not a pipe: a chatty worker never blocks). On timeout every agent is
    stopped and reports return code None -> -1.
    """
    port, rdzv_id = free_port(), f"test-{uuid.uuid4().hex[:12]}"
    cmd = agent_command(*args, nnodes=nnodes, nproc_per_node=nproc_per_node, port=port, rdzv_id=rdzv_id)
    logs = [tempfile.TemporaryFile() for _ in range(nnodes)]
    procs = [subprocess.Popen(cmd, env=process_env(**env), stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True) for log in logs]
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
    finally:
        for proc in procs:
            _stop(proc)
    results = []
    for proc, log in zip(procs, logs, strict=True):
        log.seek(0)
        results.append(AgentResult(proc.returncode if proc.returncode is not None else -1,
                                   log.read().decode(errors="replace")))
        log.close()
    return results


def assert_all_ok(results: list[AgentResult]) -> None:
    """Every agent exited 0, and the rendezvous gave each node its own rank ``0 .. nnodes-1``."""
    for i, res in enumerate(results):
        assert res.returncode == 0, f"agent {i} exited {res.returncode}:\n{res.output[-4000:]}"
    ranks = [res.node_ranks() for res in results]
    assert sorted(r for node in ranks for r in node) == list(range(len(results))), ranks

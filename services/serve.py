"""``hybridmoe serve``: every daemon on one machine, as child processes, for a developer or a demo.

Order: weights (publishes the checkpoint into shared memory), router, prefill, one decode per
entry of ``decode.numa_nodes``, gateway. Each child reports readiness over the sd_notify
protocol (the same one systemd uses), on a socket of its own in the run folder. The launcher
prints the URL once ``/health`` answers 200.

Ctrl-C (or SIGTERM) stops the children in reverse order (SIGTERM, then SIGKILL after a grace
period), unlinks any shared-memory segment still named in the manifest and removes the run
folder, so nothing is left behind. Children get SIGTERM from the kernel if the launcher itself
dies (PR_SET_PDEATHSIG), so no orphan outlives it. A decode or prefill that dies is logged and
the rest keep serving (the router re-homes its requests); if the weights, the router or the
gateway die, everything stops.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import torch

from shared import weight_store
from shared.config import Config, ConfigError, private_run_dir

_ESSENTIAL = ("weights", "router", "gateway")


def _pdeathsig() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Child:
    def __init__(self, name: str, role: str, argv: list[str], run: Path, env: dict[str, str]) -> None:
        self.name, self.role = name, role
        self.notify_path = run / f"notify-{name}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.notify_path))
        self.sock.setblocking(False)
        env = {**os.environ, **env, "NOTIFY_SOCKET": str(self.notify_path)}
        self.proc = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_pdeathsig)
        self.status = ""

    def poll_ready(self) -> bool:
        try:
            while True:
                data = self.sock.recv(4096).decode(errors="replace")
                for line in data.splitlines():
                    if line.startswith("STATUS="):
                        self.status = line[len("STATUS="):]
                if "READY=1" in data.splitlines():
                    return True
        except BlockingIOError:
            return False

    def close(self) -> None:
        self.sock.close()
        self.notify_path.unlink(missing_ok=True)


class Launcher:
    def __init__(self, cfg: Config) -> None:
        self.own_run = not cfg.run_dir or not Path(cfg.run_dir).exists()  # made here: removed here
        run = Path(cfg.run_dir) if cfg.run_dir else private_run_dir()
        run.mkdir(mode=0o700, parents=True, exist_ok=True)
        model = cfg.model.path
        if not model:
            from shared.generate import demo_model_path

            model = str(demo_model_path(progress=sys.stderr.isatty()))
        weights = cfg.weights if cfg.weights.namespace else replace(cfg.weights, namespace=f"serve{os.getpid()}")
        self.cfg = replace(cfg, run_dir=str(run), model=replace(cfg.model, path=model), weights=weights)
        self.run = run
        self.config_file = run / "config.toml"
        self.config_file.write_text(self.cfg.to_toml())
        self.children: list[_Child] = []
        self.stopping = False
        device = self.cfg.prefill.device
        self.cpu_prefill = device == "cpu" or (device == "auto" and not torch.cuda.is_available())

    def _argv(self, role: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "services.cli", role, "--config", str(self.config_file), *extra]

    def _spawn(self, name: str, role: str, *extra: str) -> _Child:
        env = {}
        if role == "decode" and self.cpu_prefill:
            # Prefill and decode share the cores: OpenMP threads that spin while idle steal them
            # from the other service (prefill's always sleep; services.cli sets that). Measured on
            # 2 cores (4 streams beside a 512-token CPU prefill): decode p90 TPOT 886 ms spinning vs
            # 137 ms sleeping, for 15% on decode alone.
            env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
        child = _Child(name, role, self._argv(role, *extra), self.run, env)
        self.children.append(child)
        return child

    def _wait_ready(self, child: _Child, timeout: float = 300) -> _Child:
        name = child.name
        deadline = time.monotonic() + timeout
        while not child.poll_ready():
            if self.stopping:
                raise KeyboardInterrupt
            if child.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {child.proc.returncode} before it was ready "
                                   "(its log is above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} was not ready after {timeout:.0f} s")
            time.sleep(0.05)
        return child

    def start(self) -> str:
        self._wait_ready(self._spawn("weights", "weights"), timeout=3600)
        # The rest only need the manifest: start them together, then wait for each.
        group = [self._spawn("router", "router"), self._spawn("prefill-0", "prefill", "--name", "prefill-0")]
        for i, node in enumerate(self.cfg.decode.numa_nodes):
            group.append(self._spawn(f"decode-{i}", "decode", "--name", f"decode-{i}", "--numa-node", str(node)))
        gw = self._spawn("gateway", "gateway")
        for child in (*group, gw):
            self._wait_ready(child)
        url = gw.status or f"http://{self.cfg.gateway.host}:{self.cfg.gateway.port}"
        self._wait_healthy(url)
        return url

    def _wait_healthy(self, url: str, timeout: float = 120) -> None:
        """Until /health answers 200 with every started service registered (the router hears of
        each through its first heartbeat; 200 alone means one of each kind)."""
        want = {"prefill": 1, "decode": len(self.cfg.decode.numa_nodes)}
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    body = json.loads(r.read())
                    if r.status == 200 and all(body.get(k, 0) >= n for k, n in want.items()):
                        return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}/health did not answer 200 within {timeout:.0f} s")
            if self.stopping:
                raise KeyboardInterrupt
            time.sleep(0.1)

    def watch(self) -> int:
        """Until a signal, or an essential child dies; returns the exit status."""
        reported: set[str] = set()
        while not self.stopping:
            for c in self.children:
                if c.proc.poll() is not None and c.name not in reported:
                    reported.add(c.name)
                    print(f"hybridmoe serve: {c.name} exited with status {c.proc.returncode}", file=sys.stderr)
                    if c.role in _ESSENTIAL:
                        return 1
            time.sleep(0.2)
        return 0

    def stop(self, grace: float = 10.0) -> None:
        order = ["gateway", "decode", "prefill", "router", "weights"]
        for role in order:
            group = [c for c in self.children if c.role == role and c.proc.poll() is None]
            for c in group:
                c.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for c in group:
                try:
                    c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    print(f"hybridmoe serve: {c.name} did not stop in {grace:.0f} s; killing it", file=sys.stderr)
                    c.proc.kill()
                    c.proc.wait()
        for c in self.children:
            c.close()
        try:  # the weights service unlinks on a clean stop; this covers one that was killed
            weight_store.unlink(weight_store.read_manifest(self.cfg.manifest))
            self.cfg.manifest.unlink(missing_ok=True)
        except weight_store.StoreError:
            pass
        for sock in self.run.glob("*.sock"):
            sock.unlink(missing_ok=True)
        self.config_file.unlink(missing_ok=True)
        if self.own_run:
            shutil.rmtree(self.run, ignore_errors=True)


def serve(cfg: Config) -> int:
    launcher = Launcher(cfg)

    def on_signal(signum, frame) -> None:
        launcher.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    status = 0
    try:
        url = launcher.start()
        print(f"hybridmoe is serving {launcher.cfg.model.path} at {url}/v1 (Ctrl-C stops it)", flush=True)
        status = launcher.watch()
    except KeyboardInterrupt:
        pass
    except (RuntimeError, ConfigError) as e:
        print(f"hybridmoe serve: error: {e}", file=sys.stderr)
        status = 1
    finally:
        launcher.stop()
    print("hybridmoe serve: stopped", file=sys.stderr, flush=True)
    return status

"""Start ``hybridmoe serve`` as a real process tree for the end-to-end tests, and check that it
leaves nothing behind when it stops."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

from services.engine.decode import DecodeEngine
from services.engine.prefill import PrefillEngine
from shared.config import Config
from shared.model import load_model
from shared.sampling import SamplingParams

REPO = Path(__file__).resolve().parent.parent


class Server:
    def __init__(self, model_path: Path, log_path: Path, **sections: dict) -> None:
        self.namespace = f"t{uuid.uuid4().hex[:8]}"
        self.run_dir = Path(tempfile.mkdtemp(prefix="hmt-", dir="/tmp"))
        os.rmdir(self.run_dir)  # serve makes it (and removes it: it is not ours to keep)
        overrides = {"run_dir": str(self.run_dir), "log_format": "json", "model.path": str(model_path),
                     "weights.namespace": self.namespace}
        overrides.update({f"{name}.{k}": v for name, table in sections.items() for k, v in table.items()})
        self.config = log_path.with_suffix(".toml")
        self.config.write_text(Config.load(None, **overrides).to_toml())
        self.log_path = log_path
        self.log = open(log_path, "a")  # noqa: SIM115 (closed in stop); O_APPEND: children write whole lines
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--config", str(self.config),
                                      "--port", "0"], stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     cwd=REPO)
        self.url = self._wait_url()

    def _wait_url(self, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if m := re.search(r"(http://\S+/v1)", line):
                return m.group(1)
            if not line and self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"hybridmoe serve did not start; its log:\n{self.log_path.read_text()[-4000:]}")

    def pids(self, role: str) -> list[int]:
        """Process ids of this server's children of ``role`` (by their command line)."""
        out = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(self.run_dir / "config.toml").encode() in cmd and role.encode() in cmd:
                out.append(int(p.name))
        return out

    def logs(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def records(self) -> list[dict]:
        """The JSON log records of every daemon (the launcher's own plain lines are skipped)."""
        out = []
        for line in self.logs():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def leftovers(self) -> list[str]:
        """Anything of this server that outlived it: processes, shm segments, its run folder."""
        left = [f"process {pid}" for role in ("weights", "router", "prefill", "decode", "gateway")
                for pid in self.pids(role)]
        left += [f"/dev/shm/{n}" for n in os.listdir("/dev/shm") if n.startswith(f"hm-{self.namespace}")]
        if self.run_dir.exists():
            left.append(f"{self.run_dir} ({sorted(os.listdir(self.run_dir))})")
        return left


class Reference:
    """The in-process engines on the same checkpoint, run the way the services run them: prompts
    longer than ``short_prompt`` through the prefill engine then decode, shorter ones in decode."""

    def __init__(self, model: Path, short_prompt: int, eos_token_id: int | None, device: str = "cpu",
                 chunk_size: int = 8192) -> None:
        """``device``: the prefill device and decode's attention device, as the services have them."""
        self.short_prompt = short_prompt
        self.prefill = PrefillEngine(load_model(model), device, chunk_size=chunk_size)
        self.decode = DecodeEngine(load_model(model), num_blocks=256, block_size=16, prefill_threshold=short_prompt,
                                   eos_token_id=eos_token_id, device=device)
        self.n = 0

    @torch.inference_mode()
    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        params = SamplingParams(max_tokens=max_tokens)
        rid = f"ref{self.n}"
        self.n += 1
        tokens = []
        if len(prompt) <= self.short_prompt:
            self.decode.add(rid, prompt, params)
        else:
            res = self.prefill.prefill(prompt, params)
            tokens.append(res.choice.token)
            self.decode.add(rid, prompt, params, kv=res.kv, first=res.choice)
        for ev in self.decode.run_all().get(rid, []):
            if ev.new:
                tokens.append(ev.token)
        return tokens

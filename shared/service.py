"""What every daemon shares: the IO thread of the compute services, readiness, signals, NUMA.

The prefill and decode services follow one pattern (IO thread, compute loop): :class:`ServiceIO`
owns every socket on its own thread. It decodes what arrives into ``inbox`` (a queue the compute
loop drains between steps), sends the service's heartbeat on time even while a long step runs,
and forwards what the compute loop hands to :meth:`ServiceIO.send` (zero-copy, through an inproc
socket). The compute loop never blocks on a socket.
"""

from __future__ import annotations

import gc
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from shared.messages import Cancel, Heartbeat, Message, encode, try_decode

ROUTER = b"router"  # the target name of the router in ServiceIO.send


class ServiceIO:
    """Sockets of a prefill or decode service: a DEALER to the router, an optional PULL socket
    bound for incoming KV, PUSH sockets to other services' KV endpoints (connected on first
    use), all driven by one thread."""

    def __init__(self, router_endpoint: str, identity: str, heartbeat: Callable[[], Heartbeat],
                 heartbeat_s: float, log, bind: str | None = None) -> None:
        self.router_endpoint, self.identity, self.bind = router_endpoint, identity, bind
        self.heartbeat, self.heartbeat_s, self.log = heartbeat, heartbeat_s, log
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.cancelled: set[str] = set()  # rids cancelled, visible to the compute loop at once
        self.ctx = zmq.Context.instance()
        self._outbox_addr = f"inproc://outbox-{id(self)}"
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"{identity}-io", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        self._out = self.ctx.socket(zmq.PUSH)  # used by the compute thread only
        self._out.connect(self._outbox_addr)

    def drain(self, wait: bool) -> list[Message]:
        """Everything in the inbox; with ``wait`` block up to 50 ms for the first message."""
        out: list[Message] = []
        try:
            out.append(self.inbox.get(timeout=0.05) if wait else self.inbox.get_nowait())
            while True:
                out.append(self.inbox.get_nowait())
        except queue.Empty:
            return out

    def send(self, msg: Message, target: bytes | str = ROUTER) -> None:
        """Send ``msg`` to the router or to a KV endpoint (an ``ipc://`` address)."""
        target = target.encode() if isinstance(target, str) else target
        self._out.send_multipart([target, *encode(msg)], copy=False)

    def _run(self) -> None:
        try:
            dealer = self.ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.IDENTITY, self.identity.encode())
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(self.router_endpoint)
            outbox = self.ctx.socket(zmq.PULL)
            outbox.bind(self._outbox_addr)
            poller = zmq.Poller()
            poller.register(dealer, zmq.POLLIN)
            poller.register(outbox, zmq.POLLIN)
            kv_in = None
            if self.bind:
                kv_in = self.ctx.socket(zmq.PULL)
                kv_in.setsockopt(zmq.LINGER, 0)
                kv_in.bind(self.bind)
                poller.register(kv_in, zmq.POLLIN)
        except BaseException as e:  # surfaced to the constructor
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        pushes: dict[bytes, zmq.Socket] = {}
        next_beat = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                try:
                    dealer.send_multipart(encode(self.heartbeat()))
                except Exception:  # a bug here must not silence the service for good
                    self.log.exception("heartbeat failed")
                next_beat = now + self.heartbeat_s
            for sock, _ in poller.poll(timeout=max(1, int((next_beat - time.monotonic()) * 1000))):
                if sock is outbox:
                    target, *frames = outbox.recv_multipart(copy=False)
                    dest = target.bytes
                    if dest == ROUTER:
                        dealer.send_multipart(frames, copy=False)
                    else:
                        if dest not in pushes:
                            push = self.ctx.socket(zmq.PUSH)
                            push.setsockopt(zmq.LINGER, 2000)
                            push.connect(dest.decode())
                            pushes[dest] = push
                        pushes[dest].send_multipart(frames, copy=False)
                    continue
                msg = try_decode(sock.recv_multipart(copy=False), self.log)
                if msg is None:
                    continue
                if isinstance(msg, Cancel):
                    self.cancelled.add(msg.rid)
                self.inbox.put(msg)
        for s in (dealer, outbox, kv_in, *pushes.values()):
            if s is not None:
                s.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._out.close(linger=0)


# --- process plumbing ----------------------------------------------------------------------------


def run_service(role: str, name: str, cfg, make: Callable[[], object]) -> int:
    """A daemon's life: build it (a failure is one clear log line and exit status 1), report
    ready, run its event loop until SIGTERM/SIGINT, report stopping, close it.

    What the build made (the model, its modules and tables, every import) is frozen out of the
    garbage collector before serving: a full collection of a process with the services imported
    (about 200,000 objects) took 45-50 ms here, a decode step's worth, at a time nobody chooses;
    after ``gc.freeze()`` one walks only what serving made since."""
    from shared import log as logging

    set_title(f"hm-{name}")
    try:
        service = make()
    except Exception as e:
        logging.setup(role, cfg.log_format, cfg.log_level, name=name).error("cannot start", error=str(e))
        return 1
    gc.collect()
    gc.freeze()
    notify("READY=1")
    service.log.info("serving", pid=os.getpid())
    try:
        service.event_loop()
    finally:
        notify("STOPPING=1")
        service.close()
        service.log.info("stopped")
    return 0


class Stopper:
    """Turns SIGTERM and SIGINT into a flag the event loop checks (a clean drain, not a trace)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.event.set()

    @property
    def stopping(self) -> bool:
        return self.event.is_set()


def notify(state: str = "READY=1") -> None:
    """Tell systemd (or ``hybridmoe serve``) about this service (sd_notify protocol)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(state.encode(), addr)
        except OSError:
            pass  # the supervisor went away; nothing to tell


def set_title(title: str) -> None:
    """Name the process in ps/top (Linux: the comm name, 15 characters)."""
    try:
        Path("/proc/self/comm").write_text(title[:15])
    except OSError:
        pass


def numa_cpus(node: int) -> list[int]:
    """The CPUs of NUMA node ``node`` that this process may use; ValueError if there are none."""
    path = Path(f"/sys/devices/system/node/node{node}/cpulist")
    allowed = sorted(os.sched_getaffinity(0))
    if not path.exists():
        if node == 0:  # no NUMA information (a container, a single-node machine): all CPUs
            return allowed
        raise ValueError(f"NUMA node {node} does not exist on this machine")
    cpus: list[int] = []
    for part in path.read_text().strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus += range(int(lo), int(hi or lo) + 1)
    cpus = [c for c in cpus if c in set(allowed)]
    if not cpus:
        raise ValueError(f"NUMA node {node} has no CPU this process may use")
    return cpus

"""The gateway in-process against a fake router: authentication, health, and what happens to
requests in flight when the router restarts."""

from __future__ import annotations

import asyncio
import threading
import time

import zmq
from aiohttp.test_utils import TestClient, TestServer

from services.gateway import Gateway
from shared.config import Config
from shared.messages import Heartbeat, RouterStatus, Submit, encode, try_decode


class FakeRouter(threading.Thread):
    """Answers every gateway heartbeat with a status; records submits; ``epoch`` can change."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.epoch = endpoint, "first"
        self.submits: list[Submit] = []
        self.stop = threading.Event()
        self.bound = threading.Event()

    def run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.bind(self.endpoint)
        self.bound.set()
        while not self.stop.is_set():
            if not sock.poll(50):
                continue
            ident, *frames = sock.recv_multipart()
            msg = try_decode(frames, None)
            if isinstance(msg, Heartbeat):
                sock.send_multipart([ident, *encode(RouterStatus(epoch=self.epoch, prefill=1, decode=1,
                                                                 max_context=512))])
            elif isinstance(msg, Submit):
                self.submits.append(msg)
        sock.close(linger=0)


def test_auth_health_and_router_restart(tiny_models, tmp_path):
    cfg = Config.load(None, **{"run_dir": str(tmp_path), "model.path": str(tiny_models["tiny-qwen3-moe", "bf16"]),
                               "model.name": "tiny", "gateway.api_key": "sekret", "router.heartbeat_s": 0.05,
                               "log_format": "json"})
    router = FakeRouter(cfg.router_endpoint)
    router.start()
    assert router.bound.wait(5)

    async def scenario() -> None:
        gw = Gateway(cfg)
        async with TestClient(TestServer(gw.app)) as client:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
                r = await client.get("/v1/models", headers=headers)
                assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error"
            auth = {"Authorization": "Bearer sekret"}
            r = await client.get("/v1/models", headers=auth)
            assert r.status == 200 and (await r.json())["data"][0]["id"] == "tiny"
            deadline = time.monotonic() + 5
            while (r := await client.get("/health")).status != 200:  # /health needs no key
                assert time.monotonic() < deadline, await r.text()
                await asyncio.sleep(0.05)
            # A request in flight when the router restarts fails with 503 instead of hanging.
            pending = asyncio.create_task(client.post("/v1/completions", headers=auth, json={
                "model": "tiny", "prompt": "hello", "max_tokens": 4}))
            while not router.submits:
                await asyncio.sleep(0.02)
            router.epoch = "second"
            r = await asyncio.wait_for(pending, 10)
            body = await r.json()
            assert r.status == 503 and "restarted" in body["error"]["message"]
            assert router.submits[0].prompt and router.submits[0].params.max_tokens == 4

    try:
        asyncio.run(scenario())
    finally:
        router.stop.set()
        router.join(5)

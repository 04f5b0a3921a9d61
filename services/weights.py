"""The weights service: publishes the checkpoint into POSIX shared memory and keeps it there.

Start: read the checkpoint tensor by tensor into shared-memory segments (a progress bar on a
terminal), write the manifest into the run folder, report ready. If the manifest there already
describes the same checkpoint and its segments exist (this service restarted), nothing is
reloaded. Stop (SIGTERM/SIGINT): remove the manifest and unlink the segments; services that still
map them keep working until they exit, and the memory is freed with the last mapping.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from tqdm import tqdm

from shared import log as logging
from shared import weight_store
from shared.config import Config
from shared.service import Stopper, notify, set_title


def model_path(cfg: Config) -> str:
    if cfg.model.path:
        return cfg.model.path
    from shared.generate import demo_model_path

    return str(demo_model_path(progress=sys.stderr.isatty()))


def run_weights(cfg: Config) -> int:
    set_title("hm-weights")
    log = logging.setup("weights", cfg.log_format, cfg.log_level)
    stopper = Stopper()
    t0, started = time.perf_counter(), time.time()
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="publishing weights", unit="tensor", disable=not sys.stderr.isatty())
        bar.update(done - bar.n)

    try:
        path = model_path(cfg)
        manifest = weight_store.publish(path, cfg.manifest, cfg.weights.namespace, cfg.model.dtype,
                                        cfg.weights.quant, progress)
    except Exception as e:
        log.error("cannot publish the weights", error=str(e))
        return 1
    finally:
        if bar is not None:
            bar.close()
    size = sum(s["size"] for s in manifest["segments"])
    huge = weight_store.shm_huge_pages()
    log.info("published", model=manifest["model"], segments=len(manifest["segments"]), gib=round(size / 2**30, 3),
             seconds=round(time.perf_counter() - t0, 2), reused=manifest["published"] < started, shm_huge=huge)
    if huge in ("never", "deny"):
        log.warning("the weights are in 4 KB pages", shm_huge=huge,
                    hint="mount -o remount,huge=advise /dev/shm before the weights service starts: the CPU "
                         "kernels read 2 MB pages faster (README, Huge pages)")
    notify("READY=1")
    try:
        stopper.event.wait()
    finally:
        notify("STOPPING=1")
        n = weight_store.unlink(manifest)
        try:
            os.unlink(cfg.manifest)
        except FileNotFoundError:
            pass
        log.info("stopped", unlinked_segments=n)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def main(cfg: Config, args: argparse.Namespace) -> int:
    return run_weights(cfg)

"""The kernel probe (cython_kernels/probes): it builds from the headers as they are and measures
both modes, so that a kernel change can always be timed against its base in C."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

PROBES = Path(__file__).resolve().parent.parent / "cython_kernels" / "probes"

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="the probe is built with gcc")


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probe") / "probe"
    subprocess.run(["bash", str(PROBES / "probe.sh"), str(out)], check=True, capture_output=True, timeout=300)
    return out


def _run(probe: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(probe), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HM_PROBE_THREADS": "2", **env})


def test_incache_reports_both_builds(probe):
    r = _run(probe, "incache", "int4_g32", "32", "256", "3")
    assert r.returncode == 0, r.stderr
    m = re.search(r"a ([\d.]+) ns \(([\d.]+) cycles at 3\.6 GHz\), b ([\d.]+) ns .* b/a ([\d.]+)", r.stdout)
    assert m, r.stdout
    a, cycles, b, ratio = map(float, m.groups())
    assert a > 0 and b > 0 and cycles == pytest.approx(a * 3.6, rel=0.01)
    assert ratio == pytest.approx(b / a, rel=0.01)


def test_dram_reports_builds_and_the_plain_read(probe):
    r = _run(probe, "dram", "fp8", "64", "300", "1", HM_PROBE_BYTES="2000000", HM_PROBE_REPS="1")
    assert r.returncode == 0, r.stderr
    m = re.search(r"2 threads, (\d+) copies: a ([\d.]+) us .* b ([\d.]+) us .* read ([\d.]+) us", r.stdout)
    assert m, r.stdout
    copies, a, b, read = map(float, m.groups())
    assert copies == 2000000 // (64 * 300) and min(a, b, read) > 0


def test_dram_in_huge_pages_says_how_many_it_got(probe):
    # (each copy is aligned to and padded to 2 MB: few large copies, not many small ones)
    r = _run(probe, "dram", "fp8", "256", "4096", "1", HM_PROBE_BYTES="3000000", HM_PROBE_REPS="1", HM_PROBE_HUGE="1")
    assert r.returncode == 0, r.stderr
    m = re.search(r"2 copies: a ([\d.]+) us .* read ([\d.]+) us", r.stdout)
    assert m and min(map(float, m.groups())) > 0, r.stdout
    m = re.search(r"2 MB pages: (\d+) MB in this process, for (\d+) MB of weights", r.stdout)
    assert m, r.stdout
    assert int(m.group(2)) == 2  # (how many 2 MB pages the kernel grants is its business, not asserted)


@pytest.mark.parametrize("args", [[], ["incache", "fp4", "16", "128", "1"], ["dram", "int4_g128", "16", "100", "1"],
                                  ["incache", "bf16", "16", "128", "65"]])
def test_bad_arguments_print_usage(probe, args):
    r = _run(probe, *args)
    assert r.returncode == 2 and "usage: probe" in r.stderr

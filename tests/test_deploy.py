"""The shipped config and systemd units agree with the code that reads them."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

from services.cli import build_parser
from shared.config import Config

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "systemd").glob("*.service"))


def test_example_config_documents_the_defaults():
    assert Config.load(ROOT / "deploy" / "hybridmoe.toml") == Config()


def _unit(path: Path) -> configparser.ConfigParser:
    p = configparser.ConfigParser(strict=False, interpolation=None)
    p.optionxform = str
    p.read_string(path.read_text())
    return p


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_units_run_real_commands_as_notify_services(path):
    unit = _unit(path)
    svc = unit["Service"]
    assert svc["Type"] == "notify" and svc["User"] == "hybridmoe" and svc["RuntimeDirectory"] == "hybridmoe"
    argv = shlex.split(svc["ExecStart"].replace("%i", "1"))
    assert argv[0].endswith("/hybridmoe")
    args = build_parser().parse_args(argv[1:])  # exits (fails the test) on an unknown flag
    assert args.command in path.name and args.config == "/etc/hybridmoe/hybridmoe.toml"
    if path.name.startswith("hybridmoe-decode@"):
        assert args.numa_node == 1 and args.name == "decode-1"
    assert unit["Install"]["WantedBy"] == "hybridmoe.target" and unit["Unit"]["PartOf"] == "hybridmoe.target"


def test_target_wants_every_singleton_unit():
    wants = _unit(ROOT / "systemd" / "hybridmoe.target")["Unit"]["Wants"].split()
    assert sorted(wants) == sorted(p.name for p in UNITS if "@" not in p.name)

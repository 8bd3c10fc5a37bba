"""docker-compose.yaml: parses, exposes nothing beyond loopback, mounts files that exist,
and its Prometheus/Alertmanager configs pass the tools' own checks. (No Docker engine
runs in CI; this is what can be proven without one.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yaml").read_text())


@pytest.mark.parametrize("name", sorted(COMPOSE["services"]))
def test_published_ports_bind_loopback_only(name):
    for port in COMPOSE["services"][name].get("ports", []):
        assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


@pytest.mark.parametrize("name", sorted(COMPOSE["services"]))
def test_mounted_files_exist(name):
    for volume in COMPOSE["services"][name].get("volumes", []):
        source = str(volume).split(":")[0]
        if source.startswith("./"):
            assert (REPO / source).exists(), f"{name} mounts missing {source}"


def test_compose_prometheus_config_is_valid():
    result = subprocess.run(
        [shutil.which("promtool") or "promtool", "check", "config", "prometheus.compose.yml"],
        cwd=REPO / "monitoring" / "prometheus", capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_alertmanager_config_is_valid():
    result = subprocess.run(
        [shutil.which("amtool") or "amtool", "check-config", "alertmanager.compose.yml"],
        cwd=REPO / "monitoring" / "alertmanager", capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr

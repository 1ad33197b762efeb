"""mesh.cpu_devices: how many CPU devices a run makes, set before JAX starts its backends."""

import os
import subprocess
import sys

import jax
import pytest

from p3o_jax import config_checks, host_devices
from p3o_jax.config_base import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_with(cpu_devices):
  c = base_config()
  c.mesh.cpu_devices = cpu_devices
  return c


def test_count_reads_the_setting(monkeypatch):
  monkeypatch.setattr(host_devices, "cores", lambda: 4)
  assert host_devices.count(config_with("1")) == 1
  assert host_devices.count(config_with("3")) == 3
  assert host_devices.count(config_with("cores")) == 4
  with pytest.raises(ValueError, match="mesh.cpu_devices='two'"):
    host_devices.count(config_with("two"))
  assert config_checks.cpu_devices("cores") is None and config_checks.cpu_devices("2") is None
  assert "positive integer" in config_checks.cpu_devices("0")


def test_configure_leaves_fixed_counts_alone(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert host_devices.configure(config_with("2")) == "CPU devices set by XLA_FLAGS"
  monkeypatch.setenv("XLA_FLAGS", "")
  assert host_devices.configure(config_with("2"), multi_process=True) == "CPU devices as the job started them"
  devices = jax.device_count()  # this test process's backends are running (and keep their 8 devices)
  assert "not applied" in host_devices.configure(config_with("2"))
  assert jax.device_count() == devices


def test_configure_makes_the_devices_in_a_fresh_process():
  code = ("import jax; from p3o_jax import host_devices; from p3o_jax.config_base import base_config; "
          "c = base_config(); c.mesh.cpu_devices = '3'; print(host_devices.configure(c)); print(jax.device_count())")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split()[-1] == "3" and "mesh.cpu_devices=3" in out.stdout

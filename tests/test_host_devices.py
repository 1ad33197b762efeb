"""mesh.cpu_devices: how many CPU devices a run makes, set before JAX starts its backends."""

import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
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
  # Start this worker's backends under conftest's XLA_FLAGS first: started below with the flags
  # cleared, they would hold one device for every later test in the worker.
  devices = jax.device_count()
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert host_devices.configure(config_with("2")) == "CPU devices set by XLA_FLAGS"
  monkeypatch.setenv("XLA_FLAGS", "")
  assert host_devices.configure(config_with("2"), multi_process=True) == "CPU devices as the job started them"
  assert "not applied" in host_devices.configure(config_with("2"))  # the backends are running
  assert jax.device_count() == devices


def test_configure_makes_the_devices_in_a_fresh_process():
  code = ("import jax; from p3o_jax import host_devices; from p3o_jax.config_base import base_config; "
          "c = base_config(); c.mesh.cpu_devices = '3'; print(host_devices.configure(c)); print(jax.device_count())")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split()[-1] == "3" and "mesh.cpu_devices=3" in out.stdout


def test_a_child_process_gets_exactly_the_device_count_asked_for():
  flags = "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8"
  assert host_devices.xla_flags_with_device_count(flags, 2) == (
      "--xla_force_host_platform_device_count=2 --xla_cpu_enable_fast_math=false")
  assert host_devices.xla_flags_with_device_count("", 1) == "--xla_force_host_platform_device_count=1"
  code = "import jax; print(jax.device_count())"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=host_devices.xla_flags_with_device_count(flags, 3))
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split()[-1] == "3"


def test_sampler_devices_follow_the_setting_and_the_model_size(monkeypatch):
  """sampler.cpu_devices='auto' samples on one device per core when the trainer holds one device
  and the policy is small; a bigger policy, a bigger training mesh or a setting of 1 keep the
  sampler on the trainer's device; N takes the first N devices."""
  one, two = SimpleNamespace(size=1), SimpleNamespace(size=2)  # training meshes
  cpus = [SimpleNamespace(platform="cpu", id=i) for i in range(8)]  # whatever this worker's backend holds
  monkeypatch.setattr(host_devices.jax, "devices", lambda: cpus)
  monkeypatch.setattr(host_devices, "cores", lambda: 2)
  config, small = base_config(), {"w": np.zeros((10, 10), np.float32)}
  assert host_devices.sampler_devices(config, one, small) == cpus[:2]
  monkeypatch.setattr(host_devices, "SAMPLE_PER_CORE_MAX_PARAMS", 99)
  assert host_devices.sampler_devices(config, one, small) is None
  config.sampler.cpu_devices = "3"
  assert host_devices.sampler_devices(config, one, small) == cpus[:3]  # by config, whatever the size
  assert host_devices.sampler_devices(config, two, small) is None
  config.sampler.cpu_devices = "1"
  assert host_devices.sampler_devices(config, one, small) is None
  assert host_devices.sampler_count(config) == 1
  config.sampler.cpu_devices = "many"
  with pytest.raises(ValueError, match="sampler.cpu_devices='many'"):
    host_devices.sampler_count(config)
  assert config_checks.sampler_cpu_devices("auto") is None and "positive integer" in config_checks.sampler_cpu_devices("0")

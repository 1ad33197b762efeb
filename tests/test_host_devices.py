"""mesh.cpu_devices: how many CPU devices a run makes, decided from the config before JAX starts."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from p3o_jax import config_checks, host_devices
from p3o_jax.config_base import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_with(hidden=None, hf="", cpu_devices="auto"):
  c = base_config()
  c.model.hf = hf
  if hidden is not None:
    c.model.arch = ml_collections.ConfigDict(dict(hidden_size=hidden))
  c.mesh.cpu_devices = cpu_devices
  return c


def test_auto_splits_a_small_policy_over_the_cores(monkeypatch):
  monkeypatch.setattr(host_devices, "cores", lambda: 4)
  assert host_devices.choose(config_with(64))[0] == 4
  assert host_devices.choose(config_with(host_devices.SMALL_HIDDEN))[0] == 4
  count, why = host_devices.choose(config_with(host_devices.SMALL_HIDDEN + 1))
  assert count is None and "one CPU device" in why
  monkeypatch.setattr(host_devices, "cores", lambda: 1)
  assert host_devices.choose(config_with(64))[0] is None
  assert host_devices.choose(config_with(64, cpu_devices="3"))[0] == 3  # explicit wins


def test_auto_reads_a_local_hf_config(tmp_path, monkeypatch):
  monkeypatch.setattr(host_devices, "cores", lambda: 2)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 128}))
  assert host_devices.policy_hidden_size(config_with(hf=str(tmp_path))) == 128
  assert host_devices.choose(config_with(hf=str(tmp_path)))[0] == 2
  count, why = host_devices.choose(config_with(hf="EleutherAI/pythia-1b"))  # a hub id: not read
  assert count is None and "unknown" in why


def test_bad_setting_is_named():
  with pytest.raises(ValueError, match="mesh.cpu_devices='two'"):
    host_devices.choose(config_with(64, cpu_devices="two"))
  assert config_checks.cpu_devices("auto") is None and config_checks.cpu_devices("2") is None
  assert "positive integer" in config_checks.cpu_devices("0")


def test_configure_leaves_fixed_counts_alone(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert host_devices.configure(config_with(64)) == "CPU devices set by XLA_FLAGS"
  monkeypatch.setenv("XLA_FLAGS", "")
  assert host_devices.configure(config_with(64), multi_process=True) == "CPU devices as the job started them"
  monkeypatch.setattr(host_devices, "cores", lambda: 2)
  devices = jax.device_count()  # this test process's backends are running (and keep their 8 devices)
  assert "not applied" in host_devices.configure(config_with(64))
  assert jax.device_count() == devices


def test_configure_makes_the_devices_in_a_fresh_process():
  code = ("import jax; from p3o_jax import host_devices; from p3o_jax.config_base import base_config; "
          "c = base_config(); c.mesh.cpu_devices = '3'; print(host_devices.configure(c)); print(jax.device_count())")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split()[-1] == "3" and "mesh.cpu_devices=3" in out.stdout

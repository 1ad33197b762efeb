"""The pipeline as 2 JAX processes x 2 CPU devices (gloo) against 1 process x 4 devices.

Each run starts real `python -m p3o_jax.main` processes on 127.0.0.1 with explicit
--coordinator_address / --num_processes / --process_id; tests/processes.py ends every one.
"""
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

import processes as mp

MESHES = {"data4": ["--config.mesh.data=4"], "data2_fsdp2": ["--config.mesh.data=2", "--config.mesh.fsdp=2"]}


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_two_processes_match_one(mesh, tmp_path):
  """data2_fsdp2 trains the RL policies with LoRA adapters, sharded like their kernels, and
  offline DPO beside them (its reference log-probs computed by both processes)."""
  lora = mesh == "data2_fsdp2"
  algos = ("p3o", "ppo", "dpo") if lora else ("p3o",)  # data4: the full-parameter RL update
  config = mp.DEMO + ":runlocal,algos=" + "+".join(algos)
  args = MESHES[mesh] + (["--config.lora.rank=4"] if lora else [])
  one = mp.run_main(str(tmp_path / "one"), processes=1, devices=4, args=args, config=config)
  two = mp.run_main(str(tmp_path / "two"), processes=2, devices=2, args=args, config=config)
  rl = tuple(f"rl/{algo}" for algo in algos)

  for stage in ("sft", "rm", *rl, "eval"):  # written once (process 0), equal to one process's
    rows = mp.assert_metrics_close(str(tmp_path / "one" / stage / "metrics.jsonl"),
                                   str(tmp_path / "two" / stage / "metrics.jsonl"))
    assert rows > 0, stage
  for stage in ("sft", "rm", *rl):  # RL's Adam steps may lift a rounding difference on a ~0 gradient to ~lr / 10
    mp.assert_exports_close(str(tmp_path / "one" / stage / "hf"), str(tmp_path / "two" / stage / "hf"),
                            outlier_tol=5e-5 if stage.startswith("rl") else None)
  assert os.path.isfile(tmp_path / "two" / "eval" / "report.md")
  for algo in algos:  # the adapters, gathered from both processes' shards
    adapters = [tmp_path / run / "rl" / algo / "adapter" / "adapter_model.safetensors" for run in ("one", "two")]
    assert all(path.is_file() for path in adapters) == lora and any(path.is_file() for path in adapters) == lora
    if lora:
      one_adapter, two_adapter = (load_file(str(path)) for path in adapters)
      assert one_adapter.keys() == two_adapter.keys() and len(one_adapter) > 0
      for name in one_adapter:
        np.testing.assert_allclose(two_adapter[name], one_adapter[name], rtol=1e-3, atol=1e-5, err_msg=name)

  # Each process's loader read only its own rows: half of every batch, its half.
  for process, output in enumerate(two):
    read = mp.rows_read(output)
    stages = (("sft", 4), ("rm", 4), ("rl", 3)) + ((("dpo", 4),) if lora else ())
    assert set(read) == {stage for stage, _ in stages}, read
    for stage, steps in stages:
      who, count, rows, batch = read[stage]
      half = batch // 2
      assert who == process and rows == f"{process * half}:{(process + 1) * half}", (stage, read[stage])
      assert count == steps * half, (stage, read[stage])
  assert mp.rows_read(one[0])["sft"][2] == "0:64"

  import torch
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "two" / "rl" / "p3o" / "hf"))
  with torch.no_grad():
    logits = model(torch.tensor([[1, 2, 3]])).logits
  assert np.isfinite(logits.numpy()).all()


def test_checkpoint_moves_between_process_counts(tmp_path):
  """One SFT run checkpointed every 2 steps and resumed twice, moving from 2 processes (data4) to 1
  (data2_fsdp2) and back to 2: the same metrics and export as an uninterrupted run."""
  sft = ["--config.stage=sft", "--config.ckpt.every=2"]
  straight = str(tmp_path / "straight")
  mp.run_main(straight, processes=1, devices=4, args=[*sft, "--config.sft.steps=6", *MESHES["data4"]])
  moved = str(tmp_path / "moved")
  legs = [(2, 2, MESHES["data4"]), (1, 4, MESHES["data2_fsdp2"]), (2, 2, MESHES["data2_fsdp2"])]
  for leg, (processes, devices, mesh) in enumerate(legs):
    steps = 2 * (leg + 1)
    out = mp.run_main(moved, processes=processes, devices=devices, args=[*sft, f"--config.sft.steps={steps}", *mesh])
    assert (leg == 0) or f"sft: resumed from step {steps - 2}" in out[0], (leg, out[0][-2000:])
    assert sorted(os.listdir(os.path.join(moved, "sft", "ckpt")), key=int)[-1] == str(steps)
  assert mp.assert_metrics_close(os.path.join(straight, "sft", "metrics.jsonl"),
                                 os.path.join(moved, "sft", "metrics.jsonl")) == 6
  mp.assert_exports_close(os.path.join(straight, "sft", "hf"), os.path.join(moved, "sft", "hf"))


def test_bad_process_id_and_unreachable_coordinator_fail_clearly(tmp_path):
  with pytest.raises(AssertionError, match=r"--process_id=2 is out of range for --num_processes=2"):
    mp.run_main(str(tmp_path / "bad_id"), processes=1, devices=1, timeout=120, distributed_args=lambda i, port: [
        "--distributed", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=2"])
  # Process 1 of 2, and nobody listens on the port: a named error after --distributed_timeout.
  with pytest.raises(AssertionError, match=r"the coordinator 127\.0\.0\.1:\d+ did not answer within 3s"):
    mp.run_main(str(tmp_path / "no_coordinator"), processes=1, devices=1, timeout=120,
                distributed_args=lambda i, port: ["--distributed", f"--coordinator_address=127.0.0.1:{port}",
                                                  "--num_processes=2", "--process_id=1", "--distributed_timeout=3"])
  # Process 0 of 2 whose partner never starts: it says so and exits 2 instead of hanging.
  with pytest.raises(AssertionError, match=r"(?s)exit codes \[2\].*a process never joined"):
    mp.run_main(str(tmp_path / "alone"), processes=1, devices=1, timeout=120,
                distributed_args=lambda i, port: ["--distributed", f"--coordinator_address=127.0.0.1:{port}",
                                                  "--num_processes=2", "--process_id=0", "--distributed_timeout=3"])

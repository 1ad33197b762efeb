"""A workdir's ownership and state: its lock, which stages finished, which config it ran.

    <workdir>/.lock               host and pid of the run that owns it (`Lock`)
    <workdir>/config.json         the config of the latest run; earlier ones as config.json.<time>
    <workdir>/<stage>/COMPLETE    written once the stage's export (hf/, report) is whole

main.run removes a stage's marker when the stage starts and writes it after the export, so
a stage that stopped (signal) or failed has no marker. A stage refuses to read the output of
an upstream stage whose directory exists without one (`check_inputs`): it would read a
missing or stale export.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

from p3o_jax import checkpoint, config_checks, distributed, paths

log = logging.getLogger(__name__)

COMPLETE_NAME = "COMPLETE"


class IncompleteStageError(RuntimeError):
  """An upstream stage stopped or failed before its export was written."""


def stage_dir(workdir: str, stage: str, algo: str | None = None) -> str:
  """<workdir>/sft, <workdir>/rm, <workdir>/rl/<algo>, <workdir>/eval."""
  return paths.join(workdir, "rl", algo) if stage == "rl" else paths.join(workdir, stage)


def is_complete(directory: str) -> bool:
  """The stage's marker is there, or its hf/ is a link to the export of a complete stage
  elsewhere (bench/study_runs.py links every run's sft/hf and rm/hf to one shared base)."""
  root = paths.resolve(directory)
  if root.joinpath(COMPLETE_NAME).is_file():
    return True
  export = root / "hf"
  if paths.is_local(root) and os.path.islink(export):
    return paths.resolve(os.path.realpath(export)).parent.joinpath(COMPLETE_NAME).is_file()
  return False


def mark_complete(directory: str, **info) -> None:
  """Process 0 writes the marker; every process waits for it, so none reads it before it exists."""
  if distributed.is_main():
    record = {"time": time.time(), "host": socket.gethostname(), **info}
    paths.write_text(paths.join(directory, COMPLETE_NAME), json.dumps(record) + "\n")
  distributed.barrier(f"complete:{directory}")


def clear_complete(directory: str) -> None:
  marker = paths.resolve(directory).joinpath(COMPLETE_NAME)
  if distributed.is_main() and marker.exists():
    marker.unlink()


def _require(workdir: str, stage: str, name: str, needed_by: str, *, given_by: str | None = None) -> None:
  """Upstream `stage` (directory `name` under workdir) must be complete when its directory exists;
  when it does not, `given_by` names the config field that replaces it (else it is an error)."""
  directory = paths.resolve(workdir) / name
  if directory.exists():
    if not is_complete(directory):
      raise IncompleteStageError(
          f"stage {needed_by} reads the output of stage {name}, but {directory} is incomplete (no "
          f"{COMPLETE_NAME} marker: it was stopped or failed before its export). Finish it first: "
          f"rerun with --config.stage={stage}" + (f" (and --config.rl.algo={name.split('/')[1]})" if stage == "rl" else ""))
  elif not given_by:
    raise IncompleteStageError(f"stage {needed_by} reads the output of stage {name}, but {directory} does not "
                               f"exist: run --config.stage={stage} first")


def check_inputs(config, workdir: str, stage: str) -> None:
  """Raises IncompleteStageError when `stage` would read an unfinished upstream stage."""
  reward_given = bool(config.model.reward_fn or config.model.reward_hf)
  needed_by = f"rl/{config.rl.algo}" if stage == "rl" else stage
  if stage in ("rm", "rl", "eval"):
    _require(workdir, "sft", "sft", needed_by, given_by="model.hf" if config.model.hf else None)
  if stage in ("rl", "eval") and not reward_given:  # a given reward leaves rm/ unread
    _require(workdir, "rm", "rm", needed_by)
  if stage == "eval":
    rl_root = paths.resolve(workdir) / "rl"
    for algo in sorted(p.name for p in rl_root.iterdir()) if rl_root.is_dir() else []:
      _require(workdir, "rl", f"rl/{algo}", needed_by, given_by="-")


# ----------------------------------------------------------------------------- ownership

LOCK_NAME = ".lock"


class WorkdirLockedError(RuntimeError):
  """Another live run owns the workdir."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


class Lock:
  """`<workdir>/.lock` holding {"host", "pid", "time"} of the run that owns the workdir.

  Created exclusively (O_EXCL) on local disks; on object stores (gs://, s3://) checked, then
  written, which guards against a second run started by mistake but is not atomic. A lock
  left by a dead process on this host is taken over with a warning; a live owner, or one on
  another host (whose processes cannot be checked from here), is an error naming it. Only
  process 0 of a multi-process job holds it.
  """

  def __init__(self, workdir: str):
    self.path = paths.resolve(workdir) / LOCK_NAME
    self.held = False

  def _owner(self) -> dict:
    try:
      owner = json.loads(self.path.read_text())
      return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
      return {}

  def _write(self) -> None:
    text = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}) + "\n"
    if not paths.is_local(self.path):
      self.path.write_text(text)
      return
    fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as f:
      f.write(text)

  def acquire(self) -> "Lock":
    if not distributed.is_main():
      return self
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # a stale lock is removed, then created again (another run may race us)
      if not self.path.exists():
        try:
          self._write()
          self.held = True
          return self
        except FileExistsError:
          continue
      owner = self._owner()
      host, pid = owner.get("host"), owner.get("pid")
      since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["time"])) if "time" in owner else "?"
      if host == socket.gethostname() and isinstance(pid, int) and (pid == os.getpid() or not _alive(pid)):
        log.warning("workdir lock %s was left by process %d on %s, which is gone; taking it over", self.path,
                    pid, host)
        self.path.unlink(missing_ok=True)
        continue
      raise WorkdirLockedError(
          f"workdir {self.path.parent} is in use by process {pid} on host {host} (since {since}): {self.path}. "
          "Wait for that run to end or stop it; if it is gone, delete the lock file.")
    raise WorkdirLockedError(f"could not take the workdir lock {self.path}: other runs keep creating it")

  def release(self) -> None:
    if self.held and self._owner().get("pid") == os.getpid():
      self.path.unlink(missing_ok=True)
    self.held = False

  def __enter__(self) -> "Lock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# ----------------------------------------------------------------------------- config changes

# Fields a resumed stage may see changed without ckpt.allow_changes: they set how long a stage
# runs (with a decaying optim.schedule the remaining steps follow the new length), where and
# how often it saves and logs, how it is evaluated, and how the work is laid out on devices
# (orbax restores onto any mesh; remat recomputes the same values).
SAFE_TO_CHANGE = ("stage", "pipeline.algos", "sft.steps", "rm.steps", "rl.iterations", "eval.*", "log.*",
                  "ckpt.every", "ckpt.keep", "ckpt.resume", "ckpt.allow_changes", "mesh.*",
                  "model.remat", "sampler.cpu_devices")  # where the sampler decodes never changes its samples

# The fields each stage's checkpoint depends on ('*' everything but the exclusions after it).
STAGE_FIELDS = {
    "sft": (("task", "seed", "model.*", "data.*", "sft.*", "sampler.max_new_tokens"), ()),
    "rm": (("task", "seed", "model.*", "data.*", "rm.*", "sampler.*"), ()),
    "rl": (("*",), ("sft.*", "rm.*")),
}


class ConfigChangedError(ValueError):
  """A resumed stage's config differs from its checkpoint's in fields that matter."""


def _matches(field: str, patterns) -> bool:
  return any(p == "*" or field == p or (p.endswith(".*") and field.startswith(p[:-1])) for p in patterns)


def allowed_changes(config) -> tuple[str, ...]:
  """ckpt.allow_changes: 'rl.beta,optim.*' -> ('rl.beta', 'optim.*'); each must name a field."""
  text = config.ckpt.get("allow_changes", "") if "ckpt" in config else ""
  names = tuple(n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip())
  fields = [path for path, _ in config_checks.flatten(config)]
  unknown = [n for n in names if not any(_matches(f, (n,)) for f in fields)]
  if unknown:
    raise config_checks.ConfigError(f"ckpt.allow_changes names {', '.join(unknown)}, which match no config field")
  return names


def config_changes(saved: dict, current: dict, stage: str, allowed=()) -> list[str]:
  """'field: saved -> current' for each field of `stage` that differs and may not change."""
  include, exclude = STAGE_FIELDS[stage]
  out = []
  for field in sorted(set(saved) | set(current)):
    if not _matches(field, include) or _matches(field, exclude) or _matches(field, SAFE_TO_CHANGE + tuple(allowed)):
      continue
    old, new = saved.get(field, "<absent>"), current.get(field, "<absent>")
    if old != new:
      out.append(f"{field}: {old!r} -> {new!r}")
  return out


def fingerprint(config) -> dict:
  """The config as {dotted field: JSON value}: what every checkpoint saves and a resume compares."""
  return {path: checkpoint.to_jsonable(value) for path, value in config_checks.flatten(config)}


def check_resume(config, directory: str, stage: str) -> None:
  """Raises ConfigChangedError when the stage in `directory` would resume a checkpoint saved
  with a different config (fields of SAFE_TO_CHANGE and ckpt.allow_changes excepted)."""
  if not config.ckpt.resume:
    return
  step, saved = checkpoint.saved_config(paths.join(directory, "ckpt"))
  if step is None:
    return
  if saved is None:
    log.warning("checkpoint step %d in %s has no saved config (an older run); changes are not checked", step,
                directory)
    return
  changes = config_changes(saved, fingerprint(config), stage, allowed_changes(config))
  if changes:
    raise ConfigChangedError(
        f"{directory} would resume checkpoint step {step}, saved with a different config:\n  " + "\n  ".join(changes)
        + "\nRevert them, use a new workdir, or accept them with --config.ckpt.allow_changes="
        + ",".join(c.split(":")[0] for c in changes))


def write_config(workdir: str, config) -> None:
  """<workdir>/config.json; a previous, different one is kept as config.json.<its time>."""
  if not distributed.is_main():
    return
  target = paths.resolve(workdir) / "config.json"
  text = config.to_json_best_effort(indent=2)
  if target.exists():
    old = target.read_text()
    if old == text:
      return
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(target.stat().mtime))
    paths.write_text(os.fspath(target.parent / f"config.json.{stamp}"), old)
    log.info("the previous config.json differs; kept as config.json.%s", stamp)
  paths.write_text(os.fspath(target), text)

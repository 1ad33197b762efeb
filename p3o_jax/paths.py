"""Workdir paths: local folders, `file://` URLs, or cloud URLs (gs://, s3://, ...) via `etils.epath`,
orbax's own path library. Every file the package writes or reads goes through `resolve`.

    resolve("runs/demo")              -> epath.Path("/abs/runs/demo")
    resolve("file:///tmp/run")        -> epath.Path("/tmp/run")
    resolve("gs://bucket/run")        -> epath.Path("gs://bucket/run")   (never a folder named "gs:")
"""

from __future__ import annotations

import os
import shutil
import tempfile

from etils import epath

PathLike = str | os.PathLike


def resolve(path: PathLike) -> epath.Path:
  text = os.fspath(path)
  if text.startswith("file://"):
    text = text[len("file://"):]
  if "://" in text:
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_local(path: PathLike) -> bool:
  return "://" not in os.fspath(resolve(path))


def join(path: PathLike, *parts: str) -> str:
  """resolve(path) / parts, as a string (configs and logs show it as the user wrote it)."""
  return os.fspath(resolve(path).joinpath(*parts))


def write_text(path: PathLike, text: str) -> None:
  """Writes a small text file whole: to a temporary sibling and renamed into place where the
  filesystem can rename (local), in one write elsewhere."""
  target = resolve(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  if not is_local(target):
    target.write_text(text)
    return
  fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=os.fspath(target.parent))
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, os.fspath(target))
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def local_dir(path: PathLike) -> str:
  """A local folder with `path`'s files: the folder itself when local, else a copy made in a
  temporary folder (for readers that need real files: safetensors, tokenizers)."""
  source = resolve(path)
  if is_local(source):
    return os.fspath(source)
  if not source.is_dir():
    raise FileNotFoundError(f"{path} is not a directory")
  target = tempfile.mkdtemp(prefix="p3o_jax-")
  for item in source.iterdir():
    if not item.is_dir():
      item.copy(epath.Path(target) / item.name)
  return target


def publish_dir(local: str, path: PathLike) -> None:
  """Moves a finished local folder to `path`: an atomic rename when `path` is local (an old
  folder there is replaced), file by file otherwise."""
  target = resolve(path)
  if is_local(target):
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
      os.replace(local, os.fspath(target))
      return
    old = tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=os.fspath(target.parent))
    os.rmdir(old)
    os.replace(os.fspath(target), old)
    os.replace(local, os.fspath(target))
    shutil.rmtree(old, ignore_errors=True)
    return
  if target.exists():
    target.rmtree()
  target.mkdir(parents=True, exist_ok=True)
  for name in sorted(os.listdir(local)):
    epath.Path(local, name).copy(target / name)
  shutil.rmtree(local, ignore_errors=True)

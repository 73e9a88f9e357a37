"""Files on disk: the package's one atomic writer (files and folders) and safetensors-only reads.

Every output melora writes (adapters, results.json, tables, exported LoRAs) goes through
``atomic_write_text`` / ``write_json_atomic`` / ``atomic_directory``: a reader sees the old content
or the new one, never a half-written file or folder, also when the writer is killed. A folder is a
symlink into a hidden versions folder beside it (see ``atomic_directory``). Written files and folders
follow the user's umask.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would (mkstemp/mkdtemp create 0600/0700)."""
    path = Path(path)
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~_umask())


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temp file in the same folder, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON at ``path``, written atomically (non-JSON values become strings)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_yaml_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as YAML at ``path``, written atomically."""
    import yaml

    return atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


# ---- folders: a versioned layout behind a symlink --------------------------------------------------------
#
#   parent/
#     name -> .name.versions/v-<time_ns>-<pid>     the folder readers open (a relative symlink)
#     .name.versions/
#       .lock                                      flock'ed by the one writer saving ``name``
#       v-<time_ns>-<pid>/                         the complete current version
#       tmp-<pid>-<random>/                        a save in progress (stale if its writer died)
#
# A save writes a new version, then swaps the symlink with one os.replace, so a reader opening
# ``name/<file>`` always lands in a complete folder, also when the writer is killed at any moment.

VERSIONS_SUFFIX = ".versions"
_LOCK_NAME = ".lock"
# An old real folder moved into the store while it becomes a symlink (sorts before every save's version).
_MIGRATING = f"v-{0:020d}-migrating-"
# Leftovers of the old two-rename writer (".name.<random>.tmp" / ".name.<random>.old"): it took no lock, so
# they are removed only once this old.
_LEGACY_STALE_AFTER_S = 3600.0


def _version_store(target: Path) -> Path:
    return target.parent / f".{target.name}{VERSIONS_SUFFIX}"


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder below ``folder`` (a power cut after the swap must not expose empty files)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not fsync folders
        pass
    finally:
        os.close(fd)


def _follow_umask_tree(folder: Path) -> None:
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            follow_umask(Path(root) / name)
    follow_umask(folder)


@contextmanager
def _writer_lock(store: Path, target: Path, timeout: float) -> Iterator[None]:
    """Hold the exclusive flock of ``store``; wait up to ``timeout`` seconds, then say who holds it."""
    import fcntl

    lock_path = store / _LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    raise TimeoutError(
                        f"{target} is being saved by another process (pid {holder} holds {lock_path}); waited "
                        f"{timeout:g} s. Wait for that save to finish, or save to another folder."
                    ) from None
                time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _versions(store: Path) -> list[Path]:
    """Complete versions in ``store``, oldest first (names start with a zero-padded time)."""
    if not store.is_dir():
        return []
    return sorted(p for p in store.iterdir() if p.name.startswith("v-") and p.is_dir())


def _legacy_leftovers(target: Path) -> list[Path]:
    return [
        p
        for p in target.parent.glob(f".{glob.escape(target.name)}.*")
        if p.suffix in (".tmp", ".old") and p.is_dir() and not p.is_symlink()
    ]


def _current_version(target: Path, store: Path) -> Path | None:
    """The version ``target`` links to, if it is one of ``store``'s."""
    if not target.is_symlink():
        return None
    pointed = Path(os.path.normpath(target.parent / os.readlink(target)))
    return pointed if pointed.parent == store else None


def _point(target: Path, version: Path) -> None:
    """Make ``target`` a symlink to ``version`` with one atomic rename (a legacy real folder is moved aside)."""
    link = target.parent / f".{target.name}.link-{os.getpid()}-{secrets.token_hex(4)}"
    os.symlink(os.path.relpath(version, target.parent), link)
    try:
        if target.is_dir() and not target.is_symlink():
            _migrate_real_folder(target, link)
        else:
            os.replace(link, target)
    except BaseException:
        if link.is_symlink():
            link.unlink()
        raise
    _fsync_dir(target.parent)


def _migrate_real_folder(target: Path, link: Path) -> None:
    """Turn a folder written by an older melora into the symlink layout; the folder itself is moved aside.

    On Linux ``renameat2(RENAME_EXCHANGE)`` swaps the folder and the new link in one step. Elsewhere it takes
    two renames; a crash between them leaves ``target`` missing, and readers and the next save then use the
    newest complete version in the store (see ``resolve_adapter_dir``).
    """
    aside = _version_store(target) / f"{_MIGRATING}{secrets.token_hex(4)}"  # sorts before any save
    if _rename_exchange(link, target):
        shutil.rmtree(link, ignore_errors=True)  # ``link`` now names the old folder
        return
    os.rename(target, aside)
    try:
        os.replace(link, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where not available."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _recover_and_clean(target: Path, store: Path) -> None:
    """Under the writer lock: repair what a killed save left behind, and delete its leftovers.

    - ``target`` missing because a swap was interrupted (see ``_interrupted_swap``): point it at the folder
      readers use meanwhile. (A ``target`` deleted on purpose stays deleted.)
    - temp folders in the store: only a writer holding the lock creates them, so any found now belong to a
      dead process; superseded versions likewise.
    """
    if not target.exists():
        interrupted = _interrupted_swap(target)
        if interrupted is not None and interrupted.parent != store:  # the old writer's ".old" folder
            restored = store / f"v-{time.time_ns():020d}-restored"
            os.rename(interrupted, restored)
            shutil.rmtree(interrupted.parent, ignore_errors=True)
            interrupted = restored
        if interrupted is not None:
            _point(target, interrupted)
    current = _current_version(target, store)
    for path in store.iterdir():
        if path.name.startswith("tmp-") or (path.name.startswith("v-") and path != current):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
    for path in target.parent.glob(f".{glob.escape(target.name)}.link-*"):  # a new link not swapped in yet
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:  # the old folder after a RENAME_EXCHANGE
            shutil.rmtree(path, ignore_errors=True)
    now = time.time()
    for path in _legacy_leftovers(target):
        if now - path.stat().st_mtime > _LEGACY_STALE_AFTER_S:
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_directory(target: str | os.PathLike, lock_timeout: float = 600.0) -> Iterator[Path]:
    """Yield an empty temp folder; on success it becomes ``target``'s content in one atomic step.

    ``target`` becomes a symlink into the hidden folder ``.<name>.versions`` beside it, swapped with one
    ``os.replace``: a reader opening ``target/<file>`` sees the old complete folder or the new one, never a
    missing or half-written one, even when the writer is killed at any moment. Concurrent saves to the same
    ``target`` take turns (an flock on ``.<name>.versions/.lock``; after ``lock_timeout`` seconds of waiting
    a TimeoutError names the holder). Each save first deletes what killed saves left behind, and the
    version it replaces. Written files and folders follow the umask. On an exception the temp folder is
    removed and ``target`` is left exactly as it was.

    Copy such a folder with ``cp -rL`` (or ``shutil.copytree``, which follows the link); a plain ``cp -r`` of
    ``target`` alone copies the link.
    """
    target = Path(os.path.abspath(target))
    if target.is_file():
        raise FileExistsError(f"{target} is a file; atomic_directory writes folders.")
    store = _version_store(target)
    store.mkdir(parents=True, exist_ok=True)
    follow_umask(store)
    with _writer_lock(store, target, lock_timeout):
        _recover_and_clean(target, store)
        tmp = Path(tempfile.mkdtemp(dir=store, prefix=f"tmp-{os.getpid()}-"))
        try:
            yield tmp
            _follow_umask_tree(tmp)
            _fsync_tree(tmp)
            version = store / f"v-{time.time_ns():020d}-{os.getpid()}"
            os.rename(tmp, version)
            _fsync_dir(store)
            previous = _current_version(target, store)
            try:
                _point(target, version)
            except BaseException:
                if _current_version(target, store) != version:
                    shutil.rmtree(version, ignore_errors=True)
                raise
            if previous is not None and previous != version:
                shutil.rmtree(previous, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def resolve_adapter_dir(adapter_dir: str | os.PathLike) -> Path:
    """The complete folder ``adapter_dir`` stands for right now, pinned against concurrent saves.

    For a folder saved by ``atomic_directory`` that is the current version behind the symlink; reading
    several files from the returned folder gives one consistent save (the next save deletes it once it
    has swapped in its own version: read soon, or use ``read_adapter``, which retries). If a killed save
    left ``adapter_dir`` missing, the complete folder it left is returned. Any other folder: as is.
    """
    path = Path(os.path.abspath(adapter_dir))
    if path.exists():
        return Path(os.path.realpath(path))
    interrupted = _interrupted_swap(path)
    if interrupted is None:
        return path
    logger.warning("%s is missing after an interrupted save; reading %s", path, interrupted)
    return interrupted


def _interrupted_swap(target: Path) -> Path | None:
    """For a missing ``target``: the complete folder an interrupted swap left, else None (really missing).

    Two writers leave ``target`` missing for a moment: migrating an old real folder without
    RENAME_EXCHANGE (the old folder waits in the store as ``v-0...-migrating-*``; the newest version is
    the one being swapped in), and melora's earlier two-rename writer (the old folder waits in
    ``.<name>.<random>.old/<name>``).
    """
    store = _version_store(target)
    versions = _versions(store)
    if any(p.name.startswith(_MIGRATING) for p in versions):
        return versions[-1]
    legacy = [p / target.name for p in _legacy_leftovers(target) if (p / target.name).is_dir()]
    return max(legacy, key=lambda p: p.stat().st_mtime) if legacy else None


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping from ``path``; keys may use dashes or underscores (both become underscores)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}".replace("\n", " ")) from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value, got {type(data).__name__}.")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def save_adapter(model: Any, output_dir: str | os.PathLike, **kwargs: Any) -> Path:
    """``model.save_pretrained(output_dir)`` done atomically (safetensors; a crash leaves no half-written folder)."""
    with atomic_directory(output_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **kwargs)
    return Path(output_dir)


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The adapter_config.json of ``adapter_dir`` as a dict, with a clear error when missing or corrupt."""
    return _read_config_file(resolve_adapter_dir(adapter_dir), Path(adapter_dir))


def read_adapter_weights(adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of ``adapter_model.safetensors`` (never a pickle file), with a clear error when corrupt."""
    return _read_weights_file(resolve_adapter_dir(adapter_dir), Path(adapter_dir))


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of ``adapter_dir``, both from the same save even while another process re-saves it."""
    for _ in range(20):
        root = resolve_adapter_dir(adapter_dir)
        try:
            return _read_config_file(root, Path(adapter_dir)), _read_weights_file(root, Path(adapter_dir))
        except FileNotFoundError:
            if resolve_adapter_dir(adapter_dir) == root:  # not a concurrent save: the file is really missing
                raise
    raise RuntimeError(f"{adapter_dir} was re-saved 20 times while being read; try again.")


def _read_config_file(root: Path, shown: Path) -> dict[str, Any]:
    """``root``/adapter_config.json; errors name ``shown`` (the folder the caller passed)."""
    path = root / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{shown / ADAPTER_CONFIG} does not exist: {shown} is not a saved PEFT adapter folder."
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{shown / ADAPTER_CONFIG} was removed while being read.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{shown / ADAPTER_CONFIG} is not valid JSON ({err}); re-save the adapter.") from err


def _read_weights_file(root: Path, shown: Path) -> dict[str, torch.Tensor]:
    path = root / ADAPTER_WEIGHTS
    if not path.is_file():
        pickled = root / "adapter_model.bin"
        hint = (
            " Only safetensors are read; re-save it with safe_serialization=True." if pickled.exists() else ""
        )
        raise FileNotFoundError(f"{shown / ADAPTER_WEIGHTS} does not exist.{hint}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        if not path.exists():  # removed since the check above: a concurrent save replaced the version
            raise FileNotFoundError(f"{shown / ADAPTER_WEIGHTS} was removed while being read.") from None
        raise ValueError(
            f"{shown / ADAPTER_WEIGHTS} is truncated or corrupted ({err}); re-save or re-download the adapter."
        ) from err

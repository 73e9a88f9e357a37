"""Adapter folders: saved atomically into a plain directory, never touching files melora did not write, and
read (config and safetensors weights, never a pickle) as one consistent save.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from melora.atomic import follow_umask

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# ---- folders: plain directories, replaced atomically ------------------------------------------------------
#
# A save writes its files into a hidden staging folder beside the target (``.<name>.melora-tmp-<pid>-<hex>``),
# fsyncs them, then puts them in place in one of three ways:
#
#   target missing            -> rename the staging folder to it (one atomic step)
#   target holds only names   -> swap the two folders with renameat2(RENAME_EXCHANGE) (one atomic step),
#   the new save writes          then delete the old content, now under the staging name
#   anything else             -> move each new file in with os.replace, weights first, the config last;
#   (other files; or no          every other file of the folder stays where it is
#   exchange on this system)
#
# The target stays a plain folder (or the folder a user's symlink points to). Saves into one parent folder
# take turns on an flock of that parent folder; a save first removes staging folders of killed saves.

_STAGING = ".melora-tmp-"
# Files written last when new files are moved in one by one (a reader that finds the config finds the weights).
_WRITTEN_LAST = (ADAPTER_CONFIG, "config.json")
_STAGE_INSIDE = ".melora-staging"


class SaveConflictError(FileExistsError):
    """The target folder holds files melora did not write under the names a save would write."""


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system refuses it."""
    if not sys.platform.startswith("linux") or os.environ.get("MELORA_NO_RENAME_EXCHANGE"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # not on this file system
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


@contextmanager
def _parent_lock(parent: Path, target: Path, timeout: float) -> Iterator[None]:
    """Hold the exclusive flock of folder ``parent``; wait up to ``timeout`` seconds, then say so."""
    import fcntl

    fd = os.open(parent, os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"{target} cannot be saved: another process has been saving into {parent} for "
                        f"{timeout:g} s (it holds an flock on that folder). Wait for it, or save elsewhere."
                    ) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _resolve_target(target: str | os.PathLike) -> tuple[Path, Path | None]:
    """(the folder a save writes, the version folder of melora's old symlink layout or None).

    A user's own symlink is followed (the save lands where it points, the link stays); a link into
    ``.<name>.versions/`` is melora's old layout, which the save turns back into a plain folder.
    """
    path = Path(os.path.abspath(target))
    if path.is_symlink():
        pointed = Path(os.path.normpath(path.parent / os.readlink(path)))
        if pointed.parent == _version_store(path):
            return path, pointed
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; an adapter is saved as a folder: pass a folder path.")
    return path, None


def _version_store(target: Path) -> Path:
    return target.parent / f".{target.name}.versions"


def _clean_staging(parent: Path, target: Path) -> None:
    """Staging folders of killed saves of ``target`` (only a lock holder makes them: any found now is dead)."""
    for path in parent.glob(f".{glob.escape(target.name)}{_STAGING}*"):
        _remove(path)
    inside = target / _STAGE_INSIDE
    if target.is_dir() and not target.is_symlink() and inside.is_dir():
        _remove(inside)


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


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
    except OSError:  # some file systems do not fsync folders
        pass
    finally:
        os.close(fd)


def _follow_umask_tree(folder: Path) -> None:
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            follow_umask(Path(root) / name)
    follow_umask(folder)


def _is_adapter_folder(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file() or (folder / "config.json").is_file()


def _conflicts(new: Path, target: Path) -> list[str]:
    """Names the save would overwrite in a folder that is not a saved adapter or model (the user's files),
    and names where a file would replace a folder or the reverse."""
    if not target.is_dir():
        return []
    ours = _is_adapter_folder(target)
    found = []
    for entry in sorted(os.listdir(new)):
        old = target / entry
        if not (old.exists() or old.is_symlink()):
            continue
        if (new / entry).is_dir() != (old.is_dir() and not old.is_symlink()):
            found.append(entry)
        elif (new / entry).is_dir():
            found += [f"{entry}/{name}" for name in _conflicts(new / entry, old)]
        elif not ours:
            found.append(entry)
    return found


def _move_in(new: Path, target: Path) -> None:
    """Move every file of ``new`` into ``target`` with os.replace: weights and the rest first, configs last."""
    entries = sorted(os.listdir(new), key=lambda name: (name in _WRITTEN_LAST, name))
    for entry in entries:
        source, dest = new / entry, target / entry
        if source.is_dir() and dest.is_dir():
            _move_in(source, dest)
        else:
            os.replace(source, dest)
    _fsync_dir(target)


@contextmanager
def atomic_directory(target: str | os.PathLike, lock_timeout: float = 600.0) -> Iterator[Path]:
    """Yield an empty staging folder; on success its files become ``target``'s, atomically where possible.

    ``target`` stays a plain folder that ``cp -r``, ``rm -rf``, ``git add`` and hub uploads treat as usual
    (a symlink of the user's is followed and kept). Files melora did not write are never deleted or moved:

    - ``target`` missing, empty, or holding only names this save writes (an earlier save): the new folder
      replaces it in one atomic step (a rename, or Linux's ``renameat2(RENAME_EXCHANGE)``), so a reader sees
      the old complete folder or the new one, also when the writer is killed at any moment.
    - ``target`` holds other files too (or the file system has no atomic exchange): each new file is moved
      in with ``os.replace``, weights first and ``adapter_config.json`` last; the other files stay. Every file
      is old or new, never half-written; a reader at that moment may pair a new weights file with the old
      config, and a kill in between leaves such a pair (save again to repair it).
    - A file of the user's (in a folder that is not a saved adapter or model) under a name the save writes
      (``README.md``, say): nothing is written and ``SaveConflictError`` names the files.

    Saves into one parent folder take turns (an flock on the parent; ``TimeoutError`` after ``lock_timeout``
    seconds). A folder saved by an earlier melora as a symlink into ``.<name>.versions/`` becomes a plain folder
    again, keeping its files. On an exception ``target`` is left as it was. Modes follow the umask.
    """
    target, legacy = _resolve_target(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _parent_lock(parent, target, lock_timeout):
        _clean_staging(parent, target)
        existing = target.is_dir() and legacy is None
        # Stage beside the target when a folder rename can reach it; inside it otherwise (a mount point,
        # or a parent the user may not write to).
        beside = os.access(parent, os.W_OK) and (
            not existing or os.stat(parent).st_dev == os.stat(target).st_dev
        )
        if legacy is not None and not beside:
            raise PermissionError(f"{target} cannot be re-saved: its folder {parent} is not writable.")
        if beside:
            stage = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}{_STAGING}{os.getpid()}-"))
        else:
            stage = target / _STAGE_INSIDE
            stage.mkdir()
        try:
            yield stage
            conflicts = _conflicts(stage, target) if existing else []
            if conflicts:
                shown = ", ".join(conflicts[:8]) + (
                    f" and {len(conflicts) - 8} more" if len(conflicts) > 8 else ""
                )
                raise SaveConflictError(
                    f"{target} already holds {shown}, not written by melora; nothing was saved. "
                    "Move those files, or save into a new or empty folder."
                )
            if legacy is not None:
                _copy_missing(legacy, stage)
            _follow_umask_tree(stage)
            if existing:
                os.chmod(stage, stat.S_IMODE(os.stat(target).st_mode))
            _fsync_tree(stage)
            _put_in_place(stage, target, existing, legacy, beside)
        finally:
            if stage.exists() or stage.is_symlink():
                _remove(stage)


def _copy_missing(version: Path, stage: Path) -> None:
    """Files of an old-layout version that the new save does not write (nothing of the old folder is lost)."""
    for entry in os.listdir(version):
        source, dest = version / entry, stage / entry
        if dest.exists():
            continue
        if source.is_dir():
            shutil.copytree(source, dest, symlinks=True)
        else:
            shutil.copy2(source, dest, follow_symlinks=False)


def _put_in_place(stage: Path, target: Path, existing: bool, legacy: Path | None, beside: bool) -> None:
    parent = target.parent
    if legacy is not None:  # the old symlink layout: the link becomes the plain folder, the store goes
        if not _rename_exchange(stage, target):
            target.unlink()
            os.rename(stage, target)
        _fsync_dir(parent)
        shutil.rmtree(_version_store(target), ignore_errors=True)
        return
    if not existing:
        os.rename(stage, target)
        _fsync_dir(parent)
        return
    only_ours = set(os.listdir(target)) <= set(os.listdir(stage))
    if beside and only_ours and _rename_exchange(stage, target):
        _fsync_dir(parent)
        return  # ``stage`` now holds the old content; the caller removes it
    _move_in(stage, target)


def resolve_adapter_dir(adapter_dir: str | os.PathLike) -> Path:
    """The real folder ``adapter_dir`` names (symlinks followed, also melora's old versioned layout)."""
    return Path(os.path.realpath(os.path.abspath(adapter_dir)))


def save_adapter(model: Any, output_dir: str | os.PathLike, **kwargs: Any) -> Path:
    """``model.save_pretrained(output_dir)`` done atomically (see ``atomic_directory``; safetensors only)."""
    with atomic_directory(output_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **kwargs)
    return Path(output_dir)


def find_adapter_folder(path: str | os.PathLike) -> Path | None:
    """The adapter folder ``path`` names: itself when it holds adapter_config.json, else its ``adapter/`` (the
    run folder of ``melora glue`` / ``melora instruct``); None when neither does."""
    for candidate in (Path(path), Path(path) / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    return None


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The adapter_config.json of ``adapter_dir`` as a dict, with a clear error when missing or corrupt."""
    return read_adapter(adapter_dir, weights=False)[0]


def read_adapter_weights(adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of ``adapter_model.safetensors`` (never a pickle file), with a clear error when corrupt."""
    return read_adapter(adapter_dir)[1]


def read_adapter(
    adapter_dir: str | os.PathLike, weights: bool = True
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of ``adapter_dir``, both from one save even while another process re-saves it.

    Both files are opened through one descriptor of the folder, so a save that swaps in a new folder
    meanwhile cannot pair the old config with the new weights; a read the swap cut short is retried.
    """
    shown = Path(adapter_dir)
    for _ in range(20):
        try:
            fd = os.open(resolve_adapter_dir(adapter_dir), os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{shown / ADAPTER_CONFIG} does not exist: {shown} is not a saved PEFT adapter folder."
            ) from None
        except NotADirectoryError:
            raise NotADirectoryError(f"{shown} is a file, not a saved PEFT adapter folder.") from None
        try:
            config = _read_config_file(fd, shown)
            return config, (_read_weights_file(fd, shown) if weights else {})
        except FileNotFoundError:
            if _same_folder(fd, adapter_dir):
                raise
            # the folder was swapped out (and is being deleted) while being read: read the new one
        finally:
            os.close(fd)
    raise RuntimeError(f"{adapter_dir} was re-saved 20 times while being read; try again.")


def _same_folder(fd: int, adapter_dir: str | os.PathLike) -> bool:
    """Whether ``adapter_dir`` still names the folder open as ``fd``."""
    try:
        now = os.stat(resolve_adapter_dir(adapter_dir))
    except FileNotFoundError:
        return False
    before = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (before.st_dev, before.st_ino)


def _read_bytes(fd: int, name: str) -> bytes | None:
    try:
        file_fd = os.open(name, os.O_RDONLY, dir_fd=fd)
    except FileNotFoundError:
        return None
    with os.fdopen(file_fd, "rb") as handle:
        return handle.read()


def _read_config_file(fd: int, shown: Path) -> dict[str, Any]:
    """adapter_config.json of the folder open as ``fd``; errors name ``shown`` (the folder the caller passed)."""
    raw = _read_bytes(fd, ADAPTER_CONFIG)
    if raw is None:
        raise FileNotFoundError(
            f"{shown / ADAPTER_CONFIG} does not exist: {shown} is not a saved PEFT adapter folder."
        )
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{shown / ADAPTER_CONFIG} is not valid UTF-8 JSON ({err}); re-save the adapter."
        ) from err
    if not isinstance(config, dict):
        raise ValueError(
            f"{shown / ADAPTER_CONFIG} holds a JSON {type(config).__name__}, not an object of options; "
            "re-save the adapter."
        )
    return config


def _read_weights_file(fd: int, shown: Path) -> dict[str, torch.Tensor]:
    raw = _read_bytes(fd, ADAPTER_WEIGHTS)
    if raw is None:
        try:
            os.stat("adapter_model.bin", dir_fd=fd)
            hint = " Only safetensors are read; re-save it with safe_serialization=True."
        except FileNotFoundError:
            hint = ""
        raise FileNotFoundError(f"{shown / ADAPTER_WEIGHTS} does not exist.{hint}")
    try:
        return load(raw)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{shown / ADAPTER_WEIGHTS} is truncated or corrupted ({err}); re-save or re-download the adapter."
        ) from err

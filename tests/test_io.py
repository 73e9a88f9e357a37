"""Atomic folder saves: crashes at any step, killed writers, polling readers and concurrent writers.

The multi-process tests fork (no re-import of torch in the children) and write with safetensors' numpy
backend, so each runs in a few seconds.
"""

from __future__ import annotations

import copy
import fcntl
import json
import multiprocessing
import os
import random
import signal
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

import melora.io as mio
from melora import MELoRAConfig, save_adapter
from melora.io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    atomic_directory,
    read_adapter,
    read_adapter_config,
    read_adapter_weights,
    resolve_adapter_dir,
)
from tests.tiny_models import TinyMLP

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and flock")
FORK = multiprocessing.get_context("fork") if hasattr(os, "fork") else None


def _write_version(folder: Path, k: int, size: int = 4096, writer: int = 0) -> None:
    """Version ``k`` of a fake adapter: the config says k, every weight equals k (a mix is visible)."""
    (folder / ADAPTER_CONFIG).write_text(json.dumps({"k": k, "writer": writer}))
    save_numpy({"w": np.full(size, k, dtype=np.float32)}, str(folder / ADAPTER_WEIGHTS))


def _save(target: Path, k: int, size: int = 4096, writer: int = 0) -> None:
    with atomic_directory(target) as tmp:
        _write_version(tmp, k, size, writer)


def _check_pair(config: dict, weights: dict) -> int:
    """k of a consistent (config, weights) pair; AssertionError for a mixed or partial one."""
    w = np.asarray(weights["w"])
    assert (w == w[0]).all(), "weights from two saves"
    assert config["k"] == int(w[0]), f"config of save {config['k']} with weights of save {int(w[0])}"
    return config["k"]


def _store_entries(target: Path) -> list[str]:
    return sorted(p.name for p in (target.parent / f".{target.name}.versions").iterdir())


def _only_current_version_left(target: Path) -> bool:
    entries = _store_entries(target)
    current = Path(os.readlink(target)).name
    siblings = sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))
    return entries == sorted([".lock", current]) and siblings == [f".{target.name}.versions"]


def _mlp_adapter(seed: int):
    torch.manual_seed(seed)
    config = MELoRAConfig(r=1, n=4, target_modules=["lin1"], init_weights=False)
    return get_peft_model(TinyMLP(), config).eval()


# ---- layout and loading ---------------------------------------------------------------------------------


def test_saves_swap_a_symlink_that_peft_and_melora_readers_follow(tmp_path):
    torch.manual_seed(0)
    base = TinyMLP().eval()
    first = get_peft_model(
        copy.deepcopy(base), MELoRAConfig(r=1, n=4, target_modules=["lin1"], init_weights=False)
    )
    second = get_peft_model(
        copy.deepcopy(base), MELoRAConfig(r=1, n=4, target_modules=["lin1"], init_weights=False)
    )
    x = torch.randn(3, 32)
    target = tmp_path / "adapter"
    save_adapter(first, target)
    save_adapter(second, target)
    assert target.is_symlink() and target.is_dir()
    assert _only_current_version_left(target)  # the first save's version is gone
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), target).eval()
    torch.testing.assert_close(loaded(x), second.eval()(x))
    assert not torch.allclose(loaded(x), first.eval()(x))
    assert read_adapter_config(target)["peft_type"] == "MELORA"
    weights = read_adapter_weights(target)
    torch.testing.assert_close(
        weights["base_model.model.lin1.melora_A"], second.base_model.model.lin1.melora_A["default"]
    )
    config, pinned = read_adapter(target)
    assert config["n"] == 4 and pinned.keys() == weights.keys()
    assert resolve_adapter_dir(target) == Path(os.path.realpath(target))


def test_an_old_real_folder_is_migrated_in_place(tmp_path):
    target = tmp_path / "a"
    target.mkdir()
    _write_version(target, 1)
    (target / "stale.txt").write_text("from the old folder")
    _save(target, 2)
    assert target.is_symlink() and not (target / "stale.txt").exists()
    assert _check_pair(*read_adapter(target)) == 2
    assert _only_current_version_left(target)


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_saved_files_and_folders_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        save_adapter(_mlp_adapter(0), tmp_path / "a")
    finally:
        os.umask(old)
    folder = Path(os.path.realpath(tmp_path / "a"))
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {
        "adapter_config.json": file_mode,
        "adapter_model.safetensors": file_mode,
        "README.md": file_mode,
    }
    assert stat.S_IMODE(folder.stat().st_mode) == dir_mode
    assert stat.S_IMODE(folder.parent.stat().st_mode) == dir_mode


# ---- crashes injected between the steps -----------------------------------------------------------------


class Crash(RuntimeError):
    pass


def _crash_on(monkeypatch, name: str, when=lambda *args: True):
    real = getattr(os, name)

    def crashing(*args, **kwargs):
        if when(*args):
            raise Crash(f"injected crash in os.{name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(mio.os, name, crashing)


@pytest.mark.parametrize("step", ["while writing", "fsync", "rename into the store", "symlink swap"])
def test_a_crash_at_any_step_leaves_the_old_adapter_readable(tmp_path, monkeypatch, step):
    target = tmp_path / "a"
    _save(target, 1)
    if step == "fsync":

        def crashing_fsync(folder):
            raise Crash("injected crash in fsync")

        monkeypatch.setattr(mio, "_fsync_tree", crashing_fsync)
    elif step == "rename into the store":
        _crash_on(monkeypatch, "rename", when=lambda src, dst, *a: "tmp-" in str(src))
    elif step == "symlink swap":
        _crash_on(monkeypatch, "replace", when=lambda src, dst, *a: ".link-" in str(src))
    with pytest.raises(Crash):
        with atomic_directory(target) as tmp:
            _write_version(tmp, 2)
            if step == "while writing":
                raise Crash("while writing")
    assert _check_pair(*read_adapter(target)) == 1
    assert json.loads((target / ADAPTER_CONFIG).read_text())["k"] == 1  # the plain path too
    assert _only_current_version_left(target)
    monkeypatch.undo()
    _save(target, 3)
    assert _check_pair(*read_adapter(target)) == 3 and _only_current_version_left(target)


def test_a_crash_while_migrating_an_old_folder_without_exchange_restores_it(tmp_path, monkeypatch):
    target = tmp_path / "a"
    target.mkdir()
    _write_version(target, 1)
    monkeypatch.setattr(mio, "_rename_exchange", lambda a, b: False)
    _crash_on(monkeypatch, "replace", when=lambda src, dst, *a: ".link-" in str(src))
    with pytest.raises(Crash):
        _save(target, 2)
    assert target.is_dir() and not target.is_symlink()  # moved back
    assert _check_pair(*read_adapter(target)) == 1


def test_a_kill_while_migrating_an_old_folder_without_exchange_is_recovered(tmp_path):
    target = tmp_path / "a"
    target.mkdir()
    _write_version(target, 1)

    def killed_between_the_renames():
        mio._rename_exchange = lambda a, b: False
        real = os.replace

        def replace(src, dst, *args, **kwargs):
            if ".link-" in str(src):
                os._exit(9)  # the old folder is in the store, the link not yet in place
            return real(src, dst, *args, **kwargs)

        mio.os.replace = replace
        _save(target, 2)

    child = FORK.Process(target=killed_between_the_renames)
    child.start()
    child.join(30)
    assert child.exitcode == 9 and not target.exists()
    assert _check_pair(*read_adapter(target)) == 2  # readers use the complete new version meanwhile
    assert _check_pair(*read_adapter(resolve_adapter_dir(target))) == 2
    with atomic_directory(target) as tmp:  # the next save repairs the link first; it fails here ...
        assert target.is_symlink() and _check_pair(*read_adapter(target)) == 2
        _write_version(tmp, 3)
    assert _check_pair(*read_adapter(target)) == 3 and _only_current_version_left(target)


def test_the_old_writers_dot_old_folder_is_read_and_then_cleaned(tmp_path):
    """melora's earlier writer, killed between its two renames, left only ``.a.<random>.old/a``."""
    target = tmp_path / "a"
    old = tmp_path / ".a.x1y2z3.old" / "a"
    old.mkdir(parents=True)
    _write_version(old, 1)
    assert _check_pair(*read_adapter(target)) == 1
    _save(target, 2)
    assert _check_pair(*read_adapter(target)) == 2 and _only_current_version_left(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.versions", "a"]


def test_a_deleted_adapter_stays_deleted(tmp_path):
    target = tmp_path / "a"
    _save(target, 1)
    target.unlink()  # what `rm -rf a` does to the link
    assert resolve_adapter_dir(target) == target
    with pytest.raises(FileNotFoundError, match=r"a/adapter_config\.json does not exist"):
        read_adapter(target)


# ---- killed writers, stale temp folders -------------------------------------------------------------------


def _dead_pid() -> int:
    child = FORK.Process(target=lambda: None)
    child.start()
    child.join()
    return child.pid


def test_stale_temp_folders_of_a_dead_process_are_cleaned_on_the_next_save(tmp_path):
    target = tmp_path / "a"
    _save(target, 1)

    def killed_mid_save():
        with atomic_directory(target) as tmp:
            _write_version(tmp, 2, size=1 << 20)
            os._exit(9)

    child = FORK.Process(target=killed_mid_save)
    child.start()
    child.join(30)
    assert child.exitcode == 9
    store = tmp_path / ".a.versions"
    stale = [p for p in store.iterdir() if p.name.startswith(f"tmp-{child.pid}-")]
    assert len(stale) == 1 and (stale[0] / ADAPTER_WEIGHTS).stat().st_size > 4 << 20
    (store / f"tmp-{_dead_pid()}-abc").mkdir()
    (store / "v-00000000000000000001-999").mkdir()  # a version written but never swapped in
    os.symlink(".a.versions/v-gone", tmp_path / ".a.link-999-0000")
    old_tmp, fresh_tmp = tmp_path / ".a.q1w2e3.tmp", tmp_path / ".a.r4t5y6.tmp"  # the old writer's
    old_tmp.mkdir()
    fresh_tmp.mkdir()
    os.utime(old_tmp, (time.time() - 7200, time.time() - 7200))
    assert _check_pair(*read_adapter(target)) == 1
    _save(target, 3)
    assert _check_pair(*read_adapter(target)) == 3
    assert _store_entries(target) == sorted([".lock", Path(os.readlink(target)).name])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".a.r4t5y6.tmp", ".a.versions", "a"]  # a fresh pid-less temp may still be in use


def test_kill_9_at_random_moments_always_leaves_old_or_new(tmp_path):
    """20 writers killed with SIGKILL at random moments of back-to-back saves of a 2 MB adapter."""
    target = tmp_path / "a"
    _save(target, 0)
    rng = random.Random(0)
    kills, survived, mid_save, last_k = 20, 0, 0, 0

    def saver(first_k: int):
        for k in range(first_k, first_k + 10_000):
            _save(target, k, size=1 << 19)

    for _ in range(kills):
        child = FORK.Process(target=saver, args=(last_k + 1,))
        child.start()
        time.sleep(rng.uniform(0.0, 0.08))
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        assert child.exitcode == -signal.SIGKILL
        entries = _store_entries(target)
        if any(name.startswith("tmp-") for name in entries) or sum(n.startswith("v-") for n in entries) > 1:
            mid_save += 1  # the kill left a temp folder or a version not yet swapped in or not yet deleted
        k = _check_pair(*read_adapter(target))
        raw = json.loads((target / ADAPTER_CONFIG).read_text())["k"]
        w = load_numpy(str(target / ADAPTER_WEIGHTS))["w"]
        assert k >= last_k and raw == k == int(w[0]) and (w == k).all()
        last_k = k
        survived += 1
    print(f"kill -9: {survived}/{kills} left a readable old-or-new adapter ({mid_save} mid-save)")
    assert survived == kills
    assert mid_save > 0, "no kill landed inside a save: the test did not test anything"
    _save(target, 10_000)
    assert _check_pair(*read_adapter(target)) == 10_000 and _only_current_version_left(target)


# ---- readers during saves; concurrent writers --------------------------------------------------------------


def test_a_polling_reader_never_sees_a_missing_or_mixed_adapter(tmp_path):
    target = tmp_path / "a"
    _save(target, 0)
    seconds = 2.5

    def writer():
        k, end = 1, time.monotonic() + seconds
        while time.monotonic() < end:
            _save(target, k, size=1 << 16)
            k += 1

    child = FORK.Process(target=writer)
    child.start()
    reads = failures = 0
    seen = set()
    problems = []
    while child.is_alive() or reads == 0:
        for how in ("read_adapter", "plain path"):
            reads += 1
            try:
                if how == "read_adapter":
                    seen.add(_check_pair(*read_adapter(target)))
                else:  # what PeftModel.from_pretrained does: open each file through the path
                    json.loads((target / ADAPTER_CONFIG).read_text())
                    w = load_numpy(str(target / ADAPTER_WEIGHTS))["w"]
                    assert (w == w[0]).all()
            except Exception as err:  # every failure is counted
                failures += 1
                problems.append(f"{how}: {err!r}")
    child.join(30)
    print(f"polling reader: {failures} failed of {reads} reads, {len(seen)} versions seen")
    assert child.exitcode == 0
    assert failures == 0, problems[:5]
    assert reads > 100 and len(seen) > 5, "the writer did not save often enough to test anything"


def test_concurrent_writers_take_turns(tmp_path):
    target = tmp_path / "a"
    log = tmp_path / "log"

    def writer(who: int):
        for k in range(12):
            with atomic_directory(target) as tmp:
                start = time.monotonic()
                _write_version(tmp, 100 * who + k, size=1 << 15, writer=who)
                time.sleep(0.005)
                with open(log, "a") as handle:
                    handle.write(f"{who} {start} {time.monotonic()}\n")

    children = [FORK.Process(target=writer, args=(who,)) for who in (1, 2)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    assert [child.exitcode for child in children] == [0, 0]
    spans = sorted(tuple(map(float, line.split()[1:])) for line in log.read_text().splitlines())
    assert len(spans) == 24
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), "saves overlapped"
    config, weights = read_adapter(target)
    assert _check_pair(config, weights) % 100 == 11 and _only_current_version_left(target)


def test_a_held_lock_gives_a_clear_timeout(tmp_path):
    target = tmp_path / "a"
    _save(target, 1)
    with open(tmp_path / ".a.versions" / ".lock", "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.truncate(0)
        handle.write("4242\n")
        handle.flush()
        with pytest.raises(
            TimeoutError,
            match=r"a is being saved by another process \(pid 4242 holds .*\.lock\); waited 0\.2 s",
        ):
            with atomic_directory(target, lock_timeout=0.2) as tmp:
                _write_version(tmp, 2)
    assert _check_pair(*read_adapter(target)) == 1

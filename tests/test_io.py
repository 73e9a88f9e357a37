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

import melora.adapter_folder as mio
from melora import MELoRAConfig, save_adapter
from melora.adapter_folder import (
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


def _leftovers(target: Path) -> list[str]:
    """Hidden staging folders (or an old-layout store) left beside ``target``."""
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def _plain(target: Path) -> bool:
    return target.is_dir() and not target.is_symlink() and not _leftovers(target)


def _mlp_adapter(seed: int):
    torch.manual_seed(seed)
    config = MELoRAConfig(r=1, n=4, target_modules=["lin1"], init_weights=False)
    return get_peft_model(TinyMLP(), config).eval()


# ---- layout and loading ---------------------------------------------------------------------------------


def _project_folder(root: Path) -> dict[str, bytes]:
    """A user's project: files and a sub-folder melora did not write. Returns path -> content."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir()
    files = {"train.py": b"print('mine')\n", "data/x.csv": b"a,b\n1,2\n", ".env": b"SECRET=1\n"}
    for name, content in files.items():
        (root / name).write_bytes(content)
    return files


def _assert_untouched(root: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        assert (root / name).read_bytes() == content, f"{name} of the user changed or vanished"


def test_saves_replace_a_plain_folder_that_peft_and_melora_readers_follow(tmp_path):
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
    inode = target.stat().st_ino
    save_adapter(second, target)
    assert _plain(target) and target.stat().st_ino != inode  # a new folder swapped in, nothing left beside
    assert sorted(os.listdir(target)) == ["README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS]
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
    assert resolve_adapter_dir(target) == target


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "no-exchange"])
def test_saving_into_a_folder_with_user_files_keeps_every_one_of_them(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(mio, "_rename_exchange", lambda a, b: False)
    project = tmp_path / "project"
    files = _project_folder(project)
    inode = project.stat().st_ino
    save_adapter(_mlp_adapter(0), project)
    save_adapter(_mlp_adapter(1), project)  # a re-save replaces our files only
    _assert_untouched(project, files)
    assert project.stat().st_ino == inode and not project.is_symlink() and not _leftovers(project)
    assert sorted(os.listdir(project)) == sorted(
        [".env", "README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS, "data", "train.py"]
    )
    w = read_adapter_weights(project)["base_model.model.lin1.melora_A"]
    torch.testing.assert_close(w, _mlp_adapter(1).base_model.model.lin1.melora_A["default"].detach())


def test_export_lora_into_the_current_project_folder_keeps_the_users_files(tmp_path):
    """`melora export-lora ADAPTER .` inside a project deleted train.py and data/ and exited 0."""
    import subprocess
    import sys

    adapter = tmp_path / "adapter"
    save_adapter(_mlp_adapter(0), adapter)
    project = tmp_path / "project"
    files = _project_folder(project)
    done = subprocess.run(
        [sys.executable, "-m", "melora.cli", "export-lora", str(adapter), "."],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    _assert_untouched(project, files)
    assert not project.is_symlink() and not _leftovers(project)
    assert json.loads((project / ADAPTER_CONFIG).read_text())["peft_type"] == "LORA"


def test_a_user_file_under_a_name_the_save_writes_is_refused_and_kept(tmp_path):
    project = tmp_path / "project"
    files = _project_folder(project)
    (project / "README.md").write_text("my project\n")
    files["README.md"] = b"my project\n"
    with pytest.raises(
        mio.SaveConflictError, match=r"project already holds README\.md, not written by melora"
    ):
        save_adapter(_mlp_adapter(0), project)
    _assert_untouched(project, files)
    assert not (project / ADAPTER_CONFIG).exists() and not _leftovers(project)


def test_a_file_at_the_target_is_refused(tmp_path):
    (tmp_path / "out").write_text("a file\n")
    with pytest.raises(NotADirectoryError, match=r"out is a file; an adapter is saved as a folder"):
        save_adapter(_mlp_adapter(0), tmp_path / "out")
    assert (tmp_path / "out").read_text() == "a file\n"


def test_a_temporary_directory_can_be_saved_into_and_cleaned_up(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with tempfile.TemporaryDirectory() as d:
        mio_export = __import__("melora").export_lora
        save_adapter(_mlp_adapter(0), Path(d) / "melora")
        mio_export(Path(d) / "melora", d)  # into the temporary folder itself
        assert (Path(d) / ADAPTER_CONFIG).is_file() and not Path(d).is_symlink()
    assert list(tmp_path.iterdir()) == []  # neither the folder nor anything beside it is left


def test_cp_r_rm_rf_and_git_add_treat_a_saved_adapter_as_a_plain_folder(tmp_path):
    import shutil
    import subprocess

    out = tmp_path / "out"
    save_adapter(_mlp_adapter(0), out)
    save_adapter(_mlp_adapter(1), out)
    subprocess.run(["cp", "-r", str(out), str(tmp_path / "copy")], check=True)
    assert _check_same(read_adapter(tmp_path / "copy"), read_adapter(out))
    if shutil.which("git"):
        subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
        subprocess.run(["git", "-C", str(tmp_path), "add", "out"], check=True)
        listed = subprocess.run(
            ["git", "-C", str(tmp_path), "ls-files", "-s", "out"], check=True, capture_output=True, text=True
        ).stdout.split("\n")
        modes = {line.split()[0] for line in listed if line}
        assert modes == {"100644"} and len([line for line in listed if line]) == 3  # files, no link (120000)
    shutil.rmtree(out)
    assert not out.exists() and not _leftovers(out)


def _check_same(a, b) -> bool:
    (config_a, weights_a), (config_b, weights_b) = a, b
    return config_a == config_b and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_b)


def test_a_users_symlink_is_followed_and_kept(tmp_path):
    bigdisk = tmp_path / "bigdisk"
    bigdisk.mkdir()
    out = tmp_path / "out"
    os.symlink(bigdisk / "adapter", out)  # dangling until the first save
    save_adapter(_mlp_adapter(0), out)
    save_adapter(_mlp_adapter(1), out)
    assert out.is_symlink() and os.readlink(out) == str(bigdisk / "adapter")
    assert (bigdisk / "adapter" / ADAPTER_WEIGHTS).is_file() and not (bigdisk / "adapter").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bigdisk", "out"]
    assert _check_same(read_adapter(out), read_adapter(bigdisk / "adapter"))


def _old_layout(tmp_path: Path, k: int) -> Path:
    """A folder saved by melora < 0.3: ``a -> .a.versions/v-<time>-<pid>`` with a lock file in the store."""
    store = tmp_path / ".a.versions"
    version = store / "v-00000001700000000000-123"
    version.mkdir(parents=True)
    (store / ".lock").write_text("123\n")
    _write_version(version, k)
    (version / "tokenizer.json").write_text("{}")  # a file the next save does not write
    os.symlink(".a.versions/v-00000001700000000000-123", tmp_path / "a")
    return tmp_path / "a"


def test_an_adapter_in_the_old_symlink_layout_loads_and_a_resave_makes_it_a_plain_folder(tmp_path):
    target = _old_layout(tmp_path, 1)
    assert _check_pair(*read_adapter(target)) == 1
    _save(target, 2)
    assert _plain(target) and _check_pair(*read_adapter(target)) == 2
    assert (target / "tokenizer.json").read_text() == "{}"  # nothing of the old folder is lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_the_old_layout_without_exchange_becomes_a_plain_folder_too(tmp_path, monkeypatch):
    monkeypatch.setattr(mio, "_rename_exchange", lambda a, b: False)
    target = _old_layout(tmp_path, 1)
    _save(target, 2)
    assert _plain(target) and _check_pair(*read_adapter(target)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_saved_files_and_folders_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        save_adapter(_mlp_adapter(0), tmp_path / "a")
    finally:
        os.umask(old)
    folder = tmp_path / "a"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {
        "adapter_config.json": file_mode,
        "adapter_model.safetensors": file_mode,
        "README.md": file_mode,
    }
    assert stat.S_IMODE(folder.stat().st_mode) == dir_mode


def test_a_resave_keeps_the_mode_of_the_folder(tmp_path):
    target = tmp_path / "a"
    _save(target, 1)
    os.chmod(target, 0o750)
    _save(target, 2)
    assert stat.S_IMODE(target.stat().st_mode) == 0o750 and _check_pair(*read_adapter(target)) == 2


# ---- crashes injected between the steps -----------------------------------------------------------------


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("step", ["while writing", "fsync", "exchange", "moving files in"])
def test_a_crash_at_any_step_leaves_the_old_adapter_readable(tmp_path, monkeypatch, step):
    target = tmp_path / "a"
    _save(target, 1)
    if step == "fsync":
        monkeypatch.setattr(mio, "_fsync_tree", lambda folder: (_ for _ in ()).throw(Crash("fsync")))
    elif step == "exchange":
        monkeypatch.setattr(mio, "_rename_exchange", lambda a, b: (_ for _ in ()).throw(Crash("exchange")))
    elif step == "moving files in":  # no exchange: the first os.replace (the weights) crashes
        monkeypatch.setattr(mio, "_rename_exchange", lambda a, b: False)
        monkeypatch.setattr(mio.os, "replace", lambda *a, **k: (_ for _ in ()).throw(Crash("replace")))
    with pytest.raises(Crash):
        with atomic_directory(target) as tmp:
            _write_version(tmp, 2)
            if step == "while writing":
                raise Crash("while writing")
    assert _check_pair(*read_adapter(target)) == 1
    assert json.loads((target / ADAPTER_CONFIG).read_text())["k"] == 1  # the plain path too
    assert _plain(target)
    monkeypatch.undo()
    _save(target, 3)
    assert _check_pair(*read_adapter(target)) == 3 and _plain(target)


def test_without_exchange_the_weights_are_replaced_before_the_config(tmp_path, monkeypatch):
    monkeypatch.setattr(mio, "_rename_exchange", lambda a, b: False)
    target = tmp_path / "a"
    _save(target, 1)
    moved = []
    real = os.replace

    def recording(src, dst, *args, **kwargs):
        moved.append(Path(dst).name)
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(mio.os, "replace", recording)
    _save(target, 2)
    assert moved == [ADAPTER_WEIGHTS, ADAPTER_CONFIG] and _check_pair(*read_adapter(target)) == 2


def test_a_deleted_adapter_stays_deleted(tmp_path):
    target = tmp_path / "a"
    _save(target, 1)
    import shutil

    shutil.rmtree(target)
    assert resolve_adapter_dir(target) == target
    with pytest.raises(FileNotFoundError, match=r"a/adapter_config\.json does not exist"):
        read_adapter(target)


# ---- killed writers, stale staging folders ------------------------------------------------------------------


def test_a_staging_folder_of_a_killed_save_is_cleaned_on_the_next_save(tmp_path):
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
    stale = _leftovers(target)
    assert len(stale) == 1 and (tmp_path / stale[0] / ADAPTER_WEIGHTS).stat().st_size > 4 << 20
    (tmp_path / "b").mkdir()  # the user's: never touched
    assert _check_pair(*read_adapter(target)) == 1
    _save(target, 3)
    assert _check_pair(*read_adapter(target)) == 3 and _plain(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "no-exchange"])
def test_kill_9_at_random_moments_always_leaves_old_or_new(tmp_path, where, exchange, monkeypatch):
    """20 writers killed with SIGKILL at random moments of back-to-back saves of a 2 MB adapter.

    With the exchange the folder is always one complete save; without it each file is old or new
    (the weights may already be new while the config is old), never missing or half-written."""
    if where == "tmpfs":
        if not Path("/dev/shm").is_dir() or not os.access("/dev/shm", os.W_OK):
            pytest.skip("no writable tmpfs at /dev/shm")
        import tempfile

        tmp_path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="melora-test-"))
    if not exchange:
        monkeypatch.setattr(mio, "_rename_exchange", lambda a, b: False)
    try:
        _kill_test(tmp_path / "a", exchange)
    finally:
        if where == "tmpfs":
            import shutil

            shutil.rmtree(tmp_path, ignore_errors=True)


def _kill_test(target: Path, exchange: bool) -> None:
    _save(target, 0, writer=0)
    rng = random.Random(0)
    kills, mid_save, mixed, last_k, last_raw = 20, 0, 0, 0, 0

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
        mid_save += bool(_leftovers(target))  # the kill left a staging folder (or the old one after a swap)
        raw = json.loads((target / ADAPTER_CONFIG).read_text())["k"]
        w = load_numpy(str(target / ADAPTER_WEIGHTS))["w"]
        assert (w == w[0]).all() and w.size == 1 << 19 or raw == 0, "a half-written weights file"
        if exchange:
            assert _check_pair(*read_adapter(target)) == raw == int(w[0])
        else:
            assert int(w[0]) in (raw, raw + 1)  # weights first: at most one save ahead of the config
            mixed += int(w[0]) != raw
        # never back to an older save: neither file (the config may stay one save behind the weights, also
        # across a kill that landed before the next save wrote anything)
        assert raw >= last_raw and int(w[0]) >= last_k
        last_k, last_raw = max(raw, int(w[0])), raw
    print(
        f"kill -9 ({'exchange' if exchange else 'per file'}): {kills} kills, {mid_save} mid-save, {mixed} mixed"
    )
    assert mid_save > 0, "no kill landed inside a save: the test did not test anything"
    _save(target, 10_000)
    assert _check_pair(*read_adapter(target)) == 10_000 and _plain(target)


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
    assert _check_pair(config, weights) % 100 == 11 and _plain(target)


def test_a_held_lock_gives_a_clear_timeout(tmp_path):
    target = tmp_path / "a"
    _save(target, 1)
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(
            TimeoutError, match=r"a cannot be saved: another process has been saving into .* for 0\.2 s"
        ):
            with atomic_directory(target, lock_timeout=0.2) as tmp:
                _write_version(tmp, 2)
    finally:
        os.close(fd)
    assert _check_pair(*read_adapter(target)) == 1

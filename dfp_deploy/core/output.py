"""Own the output folder: a marker listing what dfp-deploy wrote, the locked swap into place, stale staging cleanup.

dfp-deploy deletes only what it provably wrote. Every output holds `.dfp-deploy-output`, a JSON manifest of its
files with their SHA-256; a folder without a valid marker is never replaced, a listed file whose content changed
is never deleted, and files a user added to an output are moved into the new output on a rebuild. A build stages
into `.<out>.building-<pid>` (marked "staging" from its first moment, so a killed build's leftovers can be proven
ours); the swap into place holds an exclusive `flock` on `.<out>.lock` and defers signals, so two builds cannot
interleave their renames and an interrupt cannot leave the previous output parked under `.<out>.old-<pid>`.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dfp_deploy.core import interrupts
from dfp_deploy.core.atomic import write_json_atomic
from dfp_deploy.core.digest import file_sha256
from dfp_deploy.core.errors import InputError

try:
    import fcntl
except ImportError:  # Windows: no flock; the swap runs unlocked there
    fcntl = None

MARKER = ".dfp-deploy-output"
TOOL = "dfp-deploy"
FORMAT = 1
_MAX_MARKER_BYTES = 16 << 20


def staging_path(out: Path, pid: int | None = None) -> Path:
    return out.parent / f".{out.name}.building-{os.getpid() if pid is None else pid}"


def parked_path(out: Path, pid: int | None = None) -> Path:
    """Where the previous output waits during the swap (a few renames, under the lock)."""
    return out.parent / f".{out.name}.old-{os.getpid() if pid is None else pid}"


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def resolve(out: Path) -> Path:
    """The folder to replace: a symlinked --out is followed to its target, so the link stays a link."""
    out = Path(out)
    return Path(os.path.realpath(out)) if out.is_symlink() else out


def _header(state: str) -> dict:
    from dfp_deploy import __version__

    return {"tool": TOOL, "format": FORMAT, "state": state, "dfp_deploy_version": __version__,
            "host": socket.gethostname(), "pid": os.getpid(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def start_staging(out: Path) -> Path:
    """Create this process's staging folder next to `out`, marked as ours before anything is written into it."""
    stage = staging_path(out)
    if os.path.lexists(stage):
        # a dead build that had our pid; remove it only if it is provably a dfp-deploy staging folder
        _remove_stale(stage, out, pid=os.getpid())
        if os.path.lexists(stage):
            raise InputError(f"output: {stage} exists and is not a dfp-deploy staging folder; move it away")
    stage.mkdir()
    write_json_atomic(stage / MARKER, _header("staging"))
    return stage


def discard_staging(stage: Path) -> None:
    """Remove this process's staging folder after a failed or interrupted build (only if it still is ours)."""
    marker = _read_marker_quietly(stage)
    if marker is not None and marker.get("pid") == os.getpid() and marker.get("host") == socket.gethostname():
        with interrupts.deferred():  # a second Ctrl-C must not leave half a staging folder behind
            shutil.rmtree(stage, ignore_errors=True)


def write_marker(folder: Path) -> dict:
    """Mark `folder` as a finished dfp-deploy output: the manifest of every file in it with its SHA-256."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel != MARKER and path.is_file() and not path.is_symlink():
            files[rel] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    marker = {**_header("output"), "files": files}
    write_json_atomic(folder / MARKER, marker)
    return marker


def _safe_relative(rel) -> bool:
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        return False
    p = PurePosixPath(rel)
    return not p.is_absolute() and ".." not in p.parts and "." not in p.parts and p.as_posix() == rel


def read_marker(folder: Path) -> dict | None:
    """The folder's marker (None when it has none); a damaged or foreign marker is refused with one line."""
    path = Path(folder) / MARKER
    if not path.is_file() or path.is_symlink():
        return None
    damaged = (f"output: {path} is damaged or was not written by dfp-deploy, so dfp-deploy will not replace "
               f"{folder}; move the folder away or choose another --out")
    try:
        if path.stat().st_size > _MAX_MARKER_BYTES:
            raise ValueError("too large")
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise InputError(damaged) from None
    if not isinstance(marker, dict) or marker.get("tool") != TOOL or marker.get("state") not in ("staging", "output"):
        raise InputError(damaged)
    if marker.get("format") != FORMAT:
        raise InputError(f"output: {path} has format {marker.get('format')!r}, this dfp-deploy knows {FORMAT}; "
                         "use the dfp-deploy that wrote it or choose another --out")
    files = marker.get("files", {})
    if not isinstance(files, dict) or not all(_safe_relative(k) and isinstance(v, dict)
                                              and isinstance(v.get("sha256"), str) for k, v in files.items()):
        raise InputError(damaged)
    return marker


def _read_marker_quietly(folder: Path) -> dict | None:
    try:
        return read_marker(folder)
    except InputError:
        return None


@dataclass(frozen=True)
class Survey:
    """A marked output's contents: files it wrote and still holds unchanged, listed files whose content changed,
    and entries (files, folders, links) that it did not write: the user's."""

    marker: dict
    owned: tuple[str, ...]
    changed: tuple[str, ...]
    foreign: tuple[str, ...]


def survey(folder: Path, marker: dict, *, verify: bool = True) -> Survey:
    """verify=False trusts the listed files' content (they were verified under the same lock a moment ago)."""
    files = marker.get("files", {})
    dirs = {str(PurePosixPath(rel).parent) for rel in files} - {"."}
    dirs |= {str(p) for d in list(dirs) for p in PurePosixPath(d).parents if str(p) != "."}
    owned, changed, foreign = [], [], []

    def walk(path: Path, prefix: str) -> None:
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            rel = prefix + entry.name
            if rel == MARKER:
                continue
            if entry.is_dir(follow_symlinks=False) and rel in dirs:
                walk(Path(entry.path), rel + "/")
            elif entry.is_file(follow_symlinks=False) and rel in files:
                same = not verify or file_sha256(Path(entry.path)) == files[rel]["sha256"]
                (owned if same else changed).append(rel)
            else:
                foreign.append(rel)

    walk(Path(folder), "")
    return Survey(marker, tuple(owned), tuple(changed), tuple(foreign))


def check_replaceable(out: Path) -> Survey | None:
    """Refuse (one line, exit 2) an `out` that dfp-deploy must not replace; else its survey (None: nothing there)."""
    out = Path(out)
    if not os.path.lexists(out):
        return None
    if not out.is_dir():
        raise InputError(f"output: {out} exists and is not a folder; choose another --out")
    marker = read_marker(out)
    if marker is None:
        if not any(out.iterdir()):
            return None
        raise InputError(f"output: {out} exists and is not a dfp-deploy output folder (no {MARKER} marker), so "
                         "dfp-deploy will not replace it; choose another --out (outputs of older dfp-deploy versions "
                         "have no marker: delete such a folder yourself to rebuild into it)")
    if marker["state"] != "output":
        raise InputError(f"output: {out} is an unfinished dfp-deploy staging folder; choose another --out")
    found = survey(out, marker)
    if found.changed:
        more = f" (and {len(found.changed) - 1} more)" if len(found.changed) > 1 else ""
        raise InputError(f"output: {out / found.changed[0]}{more} was changed after dfp-deploy wrote it, so "
                         f"dfp-deploy will not delete it; move it out of {out} or choose another --out")
    return found


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the exclusive lock of `out`'s swap. The lock file is removed on release: a waiter that then locks the
    unlinked file sees that the path no longer names it and locks the new one."""
    if fcntl is None:
        yield
        return
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is not None and (current.st_dev, current.st_ino) == (st.st_dev, st.st_ino):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(path)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # asked about a folder named with our pid before we made one: a dead build's
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows: never call a folder stale there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_owned(folder: Path, marker: dict) -> bool:
    """Delete the marker's files and the folders it implies; True if `folder` is gone (nothing else was in it)."""
    files = marker.get("files", {})
    for rel in files:
        path = folder / rel
        if path.is_file() and not path.is_symlink():
            path.unlink()
    (folder / MARKER).unlink(missing_ok=True)
    dirs = sorted({p for rel in files for p in PurePosixPath(rel).parents if str(p) != "."},
                  key=lambda p: len(p.parts), reverse=True)
    for d in [*dirs, PurePosixPath(".")]:
        try:
            os.rmdir(folder / d)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                raise
    return not os.path.lexists(folder)


def _carry_over(old: Path, out: Path, foreign) -> list[str]:
    """Move the user's entries of the previous output into the new one; return those that could not move."""
    stuck = []
    for rel in foreign:
        src, dst = old / rel, out / rel
        if not os.path.lexists(src):
            continue
        if os.path.lexists(dst):
            stuck.append(rel)
            continue
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        except OSError:  # e.g. its folder is a file in the new output: it stays, and the caller says where
            stuck.append(rel)
    return stuck


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


_STALE = re.compile(r"\.(?P<name>.+)\.(?P<kind>building|old)-(?P<pid>[0-9]+)")


def _remove_stale(path: Path, out: Path, pid: int) -> None:
    marker = _read_marker_quietly(path)
    if marker is None:
        return  # not provably ours
    if ".building-" in path.name:
        if marker.get("pid") != pid or marker.get("host") != socket.gethostname():
            return  # another host's build (its pid means nothing here), or a marker copied from elsewhere
        if marker["state"] == "staging":
            shutil.rmtree(path, ignore_errors=True)  # everything in a staging folder was written by its build
        elif not _remove_owned(path, marker):  # finished, killed before its swap: only the listed files go
            _warn(f"kept {path}: it holds files dfp-deploy did not write")
        return
    if marker["state"] != "output":
        return
    if not os.path.lexists(out):
        os.replace(path, out)  # killed between the two renames of a swap: the previous output goes back
        return
    found = survey(path, marker)
    if found.changed:
        return
    stuck = _carry_over(path, out, found.foreign) if found.foreign and out.is_dir() else list(found.foreign)
    if not _remove_owned(path, marker) and stuck:
        _warn(f"kept {path}: it holds files dfp-deploy did not write ({stuck[0]}, ...)")


def remove_stale(out: Path) -> None:
    """Remove `.<out>.building-<pid>` and `.<out>.old-<pid>` folders of dead builds on this host, when they carry
    our marker; a parked previous output whose swap was killed goes back into place."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    candidates = []
    for entry in os.scandir(out.parent):
        m = _STALE.fullmatch(entry.name)
        if m and m["name"] == out.name and entry.is_dir(follow_symlinks=False):
            pid = int(m["pid"])
            if not _pid_alive(pid):
                candidates.append((Path(entry.path), pid))
    if not candidates:
        return
    with locked(out):
        for path, pid in sorted(candidates, key=lambda c: ".old-" not in c[0].name):  # parked outputs first
            _remove_stale(path, out, pid)


def commit(stage: Path, out: Path) -> None:
    """Mark `stage` as a finished output and put it in `out`'s place, carrying over the user's files of the
    previous output. A signal during the swap is raised after it, as `Interrupted` naming the new output."""
    write_marker(stage)
    with locked(out):
        previous = check_replaceable(out)  # again: the folder may have changed while the build ran
        if previous is not None:
            clash = [rel for rel in previous.foreign if os.path.lexists(stage / rel)]
            if clash:
                raise InputError(f"output: {out / clash[0]} was not written by dfp-deploy and the new build writes "
                                 f"a file of that name; move it out of {out} and build again")
        interrupts.raise_if_received()
        with interrupts.deferred() as got:
            if previous is None:
                os.replace(stage, out)  # onto nothing or an empty folder
            else:
                parked = parked_path(out)
                os.replace(out, parked)
                os.replace(stage, out)
                stuck = _carry_over(parked, out, previous.foreign)
                # entries added since the survey above are not ours either: they move too
                late = [rel for rel in survey(parked, previous.marker, verify=False).foreign if rel not in stuck]
                stuck += _carry_over(parked, out, late)
                if not _remove_owned(parked, previous.marker):
                    _warn(f"kept {parked}: it holds files dfp-deploy did not write ({', '.join(stuck[:3])})")
    if got:
        raise interrupts.Interrupted(got[0], output=str(out))

"""Facts about the machine and the software, printed above the table."""

from __future__ import annotations

import datetime as dt
import os
import platform
import sqlite3
import sys
from importlib import metadata


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def filesystem_of(path: str) -> str:
    """The type and device of the mount holding `path` (fsync cost depends on it)."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                device, mount_point, fs_type = line.split()[:3]
                if (real == mount_point or real.startswith(mount_point.rstrip("/") + "/")) \
                        and len(mount_point) >= len(best):
                    best, kind = mount_point, f"{fs_type} ({device} on {mount_point})"
    except OSError:
        pass
    return kind


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def facts(workdir: str) -> dict[str, str]:
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": f"{usable_cores()} usable ({os.cpu_count()} online)",
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "sqlite": sqlite3.sqlite_version,
        "packages": ", ".join(
            f"{name} {_version(name)}"
            for name in ("sessionledger", "eventsourcing", "sqlalchemy", "psycopg", "msgpack",
                         "lz4", "blake3")
        ),
        "database files": f"{workdir} on {filesystem_of(workdir)}",
    }

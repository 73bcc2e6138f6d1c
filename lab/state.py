"""The lab's state on disk: hosts, guests and where each runs, shared by every ``zhuge lab`` command.

One JSON file (``<state_dir>/lab/<name>/lab.json``), rewritten atomically under an
exclusive lock, so ``lab up``, the load driver, ``lab migrate`` and ``zhuge agent``
(separate processes) always agree on which QEMU process holds a guest now.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lab.image import GuestImage
from lab.net import Host
from lab.qemu import GuestProcess, GuestSpec

STATE_VERSION = 1


@dataclass
class LabClock:
    """The lab's time base: wall time, or a compressed one for demos and tests (``speed`` > 1).

    Compressed time runs ``speed`` times faster than the wall clock from ``origin``
    (epoch s, in the past) at ``wall0``: a day of a trace in minutes, while every
    timestamp stays in the past for as long as ``origin + (now - wall0) * speed``
    does (a worker refuses samples from the future).
    """

    speed: float = 1.0
    origin: float = 0.0
    wall0: float = 0.0

    def now(self) -> float:
        if self.speed == 1.0:
            return time.time()
        return self.origin + (time.time() - self.wall0) * self.speed

    def wall_of(self, t: float) -> float:
        """The wall time at which the lab clock reads ``t``."""
        return t if self.speed == 1.0 else self.wall0 + (t - self.origin) / self.speed


@dataclass
class GuestState:
    spec: GuestSpec
    process: GuestProcess
    load: dict[str, Any] = field(default_factory=dict)  # the load program (lab.load), {} = the spec's constant load


@dataclass
class LabState:
    name: str
    index: int  # subnet number of this lab's fabric
    accel: str
    image: GuestImage
    hosts: dict[str, Host]
    guests: dict[str, GuestState]
    clock: LabClock = field(default_factory=LabClock)
    created: float = field(default_factory=time.time)

    def to_json(self) -> str:
        doc = {
            "version": STATE_VERSION, "name": self.name, "index": self.index, "accel": self.accel,
            "created": self.created, "clock": asdict(self.clock),
            "image": {"kernel": str(self.image.kernel), "initrd": str(self.image.initrd)},
            "hosts": {k: asdict(h) for k, h in self.hosts.items()},
            "guests": {k: {"spec": asdict(g.spec), "process": g.process.as_dict(), "load": g.load}
                       for k, g in self.guests.items()},
        }  # fmt: skip
        return json.dumps(doc, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LabState:
        doc = json.loads(text)
        if doc.get("version") != STATE_VERSION:
            raise ValueError(f"lab state version {doc.get('version')} is not {STATE_VERSION}")
        return cls(
            doc["name"], doc["index"], doc["accel"],
            GuestImage(Path(doc["image"]["kernel"]), Path(doc["image"]["initrd"])),
            {k: Host(**h) for k, h in doc["hosts"].items()},
            {k: GuestState(GuestSpec(**g["spec"]), GuestProcess(**g["process"]), g.get("load", {}))
             for k, g in doc["guests"].items()},
            LabClock(**doc.get("clock", {})), doc.get("created", 0.0),
        )  # fmt: skip


def lab_dir(state_dir: str, name: str) -> Path:
    return Path(state_dir).expanduser().resolve() / "lab" / name


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def load(folder: Path) -> LabState | None:
    path = folder / "lab.json"
    return LabState.from_json(path.read_text()) if path.exists() else None


def save(folder: Path, state: LabState) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".lab.json.{os.getpid()}"
    tmp.write_text(state.to_json())
    tmp.replace(folder / "lab.json")


@contextlib.contextmanager
def updating(folder: Path) -> Iterator[LabState]:
    """Read, let the caller change, write back: all under the lab's lock."""
    with locked(folder):
        state = load(folder)
        if state is None:
            raise FileNotFoundError(f"no lab at {folder}: run `zhuge lab up` first")
        yield state
        save(folder, state)

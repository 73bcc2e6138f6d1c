"""The lab's guest image: a Debian kernel plus an initramfs of busybox and the workload, built here.

Nothing is downloaded: the kernel comes from Debian's ``linux-image-cloud-amd64``
(``/boot/vmlinuz-*``), busybox from ``busybox-static``, and the workload
(``lab/guest/workload.c``) is compiled static with the system C compiler. The
result is cached under ``~/.cache/zhuge/lab/<hash>/`` keyed by the hash of every
input, so a rebuild happens only when one of them changes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

GUEST_SRC = Path(__file__).resolve().parent / "guest"
BUSYBOX = ("/bin/busybox", "/usr/bin/busybox")
INSTALL_HINT = "apt-get install qemu-system-x86 linux-image-cloud-amd64 busybox-static cpio gcc libc6-dev"


class ImageError(RuntimeError):
    """The guest image cannot be built here; the message says what to install."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path


def find_kernel() -> Path:
    """The newest Debian kernel image in /boot (the cloud flavour first: it boots fastest)."""
    boot = Path("/boot")
    found = sorted(boot.glob("vmlinuz-*-cloud-amd64")) or sorted(boot.glob("vmlinuz-*"))
    readable = [k for k in found if os.access(k, os.R_OK)]
    if not readable:
        raise ImageError(f"no readable kernel in /boot: {INSTALL_HINT}")
    return readable[-1]


def find_busybox() -> Path:
    for candidate in BUSYBOX:
        path = Path(candidate)
        if path.exists() and _is_static(path):
            return path
    raise ImageError(f"no static busybox (/bin/busybox from busybox-static): {INSTALL_HINT}")


def _is_static(path: Path) -> bool:
    """True for an ELF binary without a program interpreter (PT_INTERP): it runs with no libraries around."""
    import struct

    data = path.read_bytes()[:65536]
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit ELF only (the lab's guests are x86-64)
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zhuge" / "lab"


def build_image(cache: Path | None = None) -> GuestImage:
    """The cached guest image, built first when any input changed."""
    kernel, busybox = find_kernel(), find_busybox()
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise ImageError(f"no C compiler: {INSTALL_HINT}")
    sources = [GUEST_SRC / "workload.c", GUEST_SRC / "init"]
    digest = hashlib.sha256()
    for path in (*sources, busybox, kernel):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.encode())
    folder = (cache or cache_root()) / digest.hexdigest()[:16]
    image = GuestImage(folder / "vmlinuz", folder / "initramfs.cpio.gz")
    if image.kernel.exists() and image.initrd.exists():
        return image
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        work = Path(tmp)
        workload = work / "workload"
        result = subprocess.run([cc, "-static", "-O2", "-o", str(workload), str(GUEST_SRC / "workload.c")],
                                capture_output=True, text=True)  # fmt: skip
        if result.returncode != 0:
            raise ImageError(f"compiling the guest workload failed (static libc needed: libc6-dev):\n{result.stderr[-2000:]}")
        files = {"init": (GUEST_SRC / "init").read_bytes(), "bin/busybox": busybox.read_bytes(), "workload": workload.read_bytes()}
        staging = work / "out"
        staging.mkdir()
        (staging / "initramfs.cpio.gz").write_bytes(gzip.compress(newc_archive(files), compresslevel=6))
        shutil.copyfile(kernel, staging / "vmlinuz")
        staging.rename(folder)  # complete or absent: two builders at once leave one of them
    return image


def newc_archive(files: dict[str, bytes]) -> bytes:
    """A cpio archive in the kernel's ``newc`` format: directories implied by the paths, every file executable.

    Written here rather than with ``cpio`` so the build needs no temporary tree with root-owned
    device nodes: the guest's /init mounts devtmpfs itself.
    """
    out = io.BytesIO()
    ino = 1

    def entry(name: str, mode: int, data: bytes = b"") -> None:
        nonlocal ino
        header = "070701" + "".join(
            f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
        )
        out.write(header.encode() + name.encode() + b"\0")
        out.write(b"\0" * (-(110 + len(name) + 1) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
        ino += 1

    dirs = sorted({str(Path(p).parent) for p in files if str(Path(p).parent) != "."})
    for d in dirs:
        entry(d, 0o040755)
    for name, data in files.items():
        entry(name, 0o100755, data)
    entry("TRAILER!!!", 0)
    return out.getvalue()

"""Convert an original checkpoint once into `<cache_dir>/converted/<key>` and reuse it afterwards.

The key covers the converter version and the names, sizes and modification times of the source's files
(and of the merged adapter's files), so replacing a shard or the adapter converts again, while a restart
of the service on the same files takes the cached copy at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import shutil
import time
from pathlib import Path

from . import CONVERSION_INFO, CONVERTER_VERSION, convert

log = logging.getLogger(__name__)


def _file_stamps(folder: Path) -> list[str]:
    stamps = []
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        stat = path.stat()
        stamps.append(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}")
    return stamps


def conversion_key(source: Path, adapter: Path | None) -> str:
    digest = hashlib.sha256()
    digest.update(f"converter {CONVERTER_VERSION}\n".encode())
    for stamp in _file_stamps(source):
        digest.update(b"source\0" + stamp.encode() + b"\n")
    if adapter is not None:
        for stamp in _file_stamps(adapter):
            digest.update(b"adapter\0" + stamp.encode() + b"\n")
    return f"{Path(source).resolve().name}-{digest.hexdigest()[:16]}"


def ensure_converted(source: Path, cache_dir: Path, adapter: Path | None = None) -> Path:
    """The converted copy of `source` (with `adapter` merged), converting it first when there is none."""
    root = Path(cache_dir) / "converted"
    root.mkdir(parents=True, exist_ok=True)
    target = root / conversion_key(source, adapter)
    # One converter at a time per key: a second process waits, then finds the finished copy.
    with (root / f"{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / CONVERSION_INFO).is_file():
            log.info("serving the converted copy of %s from %s", Path(source).name, target)
            return target
        shutil.rmtree(target, ignore_errors=True)
        started = time.perf_counter()
        log.info("converting the original checkpoint %s into %s (once)", Path(source).name, target)
        convert(source, target, adapter=adapter, progress=False)
        log.info("converted %s in %.1f s%s", Path(source).name, time.perf_counter() - started,
                 f" with the adapter {Path(adapter).name} merged" if adapter else "")
    return target

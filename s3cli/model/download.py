"""Downloading official checkpoints: streamed to a temporary file, verified, then renamed."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from s3cli.errors import CheckpointError, OutputError
from s3cli.model.loading import KNOWN_CHECKPOINTS, KnownCheckpoint, load_network_from_file

__all__ = ["known_checkpoint", "fetch_checkpoint"]


def known_checkpoint(name: str) -> KnownCheckpoint:
    """A known checkpoint by file name (with or without suffix) or model preset."""
    for k in KNOWN_CHECKPOINTS:
        if name in (k.filename, Path(k.filename).stem):
            return k
    for k in KNOWN_CHECKPOINTS:  # a preset name: its first listed file
        if k.model == name:
            return k
    names = ", ".join(k.filename for k in KNOWN_CHECKPOINTS)
    raise CheckpointError(f"{name}: not a known checkpoint (known: {names})")


def fetch_checkpoint(
    name: str,
    dest: Path,
    *,
    mirror: str | None = None,
    on_progress: Callable[[int, int | None], None] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download checkpoint ``name`` into folder ``dest``; verify size and md5 where published
    and that it loads strictly as its model. Returns the final path."""
    known = known_checkpoint(name)
    if mirror:
        url = mirror.rstrip("/") + "/" + known.filename
    elif known.url:
        url = known.url
    else:
        raise CheckpointError(
            f"{known.filename}: no download address has been published (place the file in "
            f"{dest}/ yourself, or pass --mirror URL)"
        )
    try:
        dest.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{known.filename}.", dir=dest)
    except OSError as exc:
        raise OutputError(f"{dest}: cannot write here ({exc.strerror or exc})") from exc
    tmp = Path(tmp_name)
    md5 = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310
                    total = resp.length
                    done = 0
                    while block := resp.read(1 << 20):
                        f.write(block)
                        md5.update(block)
                        done += len(block)
                        if on_progress is not None:
                            on_progress(done, total)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise CheckpointError(f"{url}: download failed ({reason})") from exc
        if total is not None and done != total:
            raise CheckpointError(f"{url}: download incomplete ({done} of {total} bytes)")
        if known.size is not None and done != known.size:
            raise CheckpointError(
                f"{url}: got {done} bytes, the official {known.filename} has {known.size}"
            )
        if known.md5 is not None and md5.hexdigest() != known.md5:
            raise CheckpointError(
                f"{url}: checksum {md5.hexdigest()} differs from the official {known.md5}"
            )
        try:
            load_network_from_file(tmp, expect=known.model)  # refuses anything else
        except CheckpointError as exc:
            detail = str(exc).split(": ", 1)[-1]
            raise CheckpointError(f"{url}: {detail}") from exc
        final = dest / known.filename
        os.replace(tmp, final)
        return final
    finally:
        tmp.unlink(missing_ok=True)

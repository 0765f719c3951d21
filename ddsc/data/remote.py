"""Remote locations: local paths, directories, globs, and URLs (``hf://``, ``s3://``, ``gs://``, ...).

A thin layer so converters read object storage the same way they read local disk: everything downstream
takes a file object. Remote protocols need their fsspec backend installed (``huggingface_hub``, ``s3fs``, ...).
Offline, the tests run ``file://`` and fsspec's in-memory filesystem (``memory://``, a non-local backend,
with forked workers) through this same code path.

Training also needs local copies of the small files beside its MDS data (``labels.json``, ``vocab.json``):
Streaming downloads shards, nothing downloads those. ``fetch`` sends the schemes Streaming knows (``s3://``,
``gs://``, ``oci://``, ``hf://``, ``azure://``, ``dbfs:`` ...) through Streaming's own downloaders, with the
credentials and settings the shards use, and any other URL through fsspec. A download lands under a temporary
name and is renamed into place, so no reader sees a partial file and two nodes on one host may fetch at once.
"""

from __future__ import annotations

import glob
import os
import shutil
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

_GLOB_CHARS = set("*?[")


def is_url(path: str) -> bool:
    return "://" in path


def join(root: str, name: str) -> str:
    """``root/name`` for a filesystem path or a URL."""
    return f"{root.rstrip('/')}/{name}" if is_url(root) else os.path.join(root, name)


def expand_inputs(spec: str, suffix: str) -> list[str]:
    """A file, a directory (searched recursively for ``*suffix``), or a glob -> sorted list of files."""
    if is_url(spec):
        import fsspec

        fs, _, _ = fsspec.core.get_fs_token_paths(spec)
        protocol = spec.split("://", 1)[0]
        if _GLOB_CHARS & set(spec):
            paths = fs.glob(spec)
        elif fs.isdir(spec):
            paths = [p for p in fs.find(spec) if p.endswith(suffix)]
        else:
            paths = [spec]
        return sorted(p if is_url(p) else f"{protocol}://{p}" for p in paths)
    if _GLOB_CHARS & set(spec):
        paths = glob.glob(spec, recursive=True)
    elif os.path.isdir(spec):
        paths = glob.glob(os.path.join(spec, "**", f"*{suffix}"), recursive=True)
    elif os.path.exists(spec):
        paths = [spec]
    else:
        raise FileNotFoundError(f"input not found: {spec}")
    return sorted(os.path.abspath(p) for p in paths)


@contextmanager
def open_input(path: str) -> Iterator[IO[bytes] | str]:
    """Yield something pyarrow can read: the path itself when local, an fsspec file object when remote."""
    if not is_url(path):
        yield path
        return
    import fsspec

    with fsspec.open(path, "rb") as f:
        yield f


def fetch(url: str, dest: Path) -> Path:
    """Download ``url`` to ``dest``, replacing an older copy. FileNotFoundError when there is no such file."""
    from streaming.base.storage.download import DOWNLOADER_MAPPINGS, CloudDownloader

    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    try:
        if urllib.parse.urlparse(url).scheme in DOWNLOADER_MAPPINGS:
            CloudDownloader.direct_download(url, str(partial))
        else:
            import fsspec

            with fsspec.open(url, "rb") as src, open(partial, "wb") as out:
                shutil.copyfileobj(src, out)
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest

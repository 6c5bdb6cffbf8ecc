"""Fetching and unpacking public data sets, safely and without hanging.

Why this is more than `urllib.request.urlretrieve`:

* an offline machine (CI, a board, this sandbox) must fail in seconds with a message that says
  what to do instead, so every request has a short timeout and every failure becomes a
  `DatasetNotFoundError` naming the URL, the error and the `--data` / `FACELINK_DATA` way out;
* a half-written file must never look like a finished one, so bytes go to `<dest>.part` and are
  renamed into place only after the checksum matched;
* an archive must not write outside its destination, so members with absolute paths or `..`
  are refused before anything is extracted, and extraction is staged and then moved into place.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from tqdm import tqdm

#: Seconds to wait for a connection or for the next chunk: short, so offline fails fast.
TIMEOUT_S = 10.0
_CHUNK = 1 << 20
_DEFAULT_HINT = "pass --data PATH (or set FACELINK_DATA=PATH) to a local copy instead"


class DatasetNotFoundError(FileNotFoundError):
    """A data set is neither where we looked nor obtainable; the message says where we looked
    and what to pass instead (``--data PATH`` or ``FACELINK_DATA=PATH``)."""


class ChecksumError(DatasetNotFoundError):
    """A download completed but its bytes are not the published ones (corrupt, truncated, or a
    different file behind the same URL). A `DatasetNotFoundError`, so callers handle it alike."""


def _digests(md5: str | None, sha256: str | None) -> dict[str, str]:
    expected = {}
    if md5:
        expected["md5"] = md5.lower()
    if sha256:
        expected["sha256"] = sha256.lower()
    return expected


def file_matches(path: Path, *, md5: str | None = None, sha256: str | None = None) -> bool:
    """True if `path` exists and has every given checksum (True for any file when none given)."""
    if not path.is_file():
        return False
    expected = _digests(md5, sha256)
    hashers = {name: hashlib.new(name) for name in expected}
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            for h in hashers.values():
                h.update(chunk)
    return all(hashers[name].hexdigest() == want for name, want in expected.items())


def download(
    url: str,
    dest: Path,
    *,
    md5: str | None,
    sha256: str | None = None,
    desc: str,
    hint: str = _DEFAULT_HINT,
) -> Path:
    """Download `url` to `dest`, verified, and return `dest`.

    An existing `dest` with the right checksum is reused (no network). Otherwise the body is
    streamed to `dest.part` with a progress bar, hashed on the way, and renamed onto `dest` only
    if every given checksum matches; on any failure the `.part` file is deleted.

    Raises `DatasetNotFoundError` (naming `url`, the error and `hint`) when the download fails,
    and `ChecksumError` when the bytes do not match.
    """
    dest = Path(dest)
    expected = _digests(md5, sha256)
    if file_matches(dest, md5=md5, sha256=sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    hashers = {name: hashlib.new(name) for name in expected}
    try:  # whatever happens (errors, Ctrl-C), no .part file is left behind
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp, part.open("wb") as out:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc) as bar:
                    while chunk := resp.read(_CHUNK):
                        out.write(chunk)
                        for h in hashers.values():
                            h.update(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
            if isinstance(err, urllib.error.HTTPError):  # the server answered: not a connectivity problem
                why = f"HTTP {err.code} {err.reason}"
            else:
                reason = getattr(err, "reason", None) or err
                why = f"{type(err).__name__}: {reason} (no network? requests time out after {TIMEOUT_S:g} s)"
            raise DatasetNotFoundError(f"could not download {desc} from {url}: {why}; {hint}") from err
        for name, want in expected.items():
            got = hashers[name].hexdigest()
            if got != want:
                raise ChecksumError(
                    f"checksum mismatch for {desc} downloaded from {url}: expected {name} {want}, "
                    f"got {got}; the partial file {part} is deleted. Retry later, or {hint}"
                )
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def _unsafe_reason(member: tarfile.TarInfo) -> str | None:
    """Why extracting `member` could write outside the destination, or None if it cannot."""
    name = PurePosixPath(member.name.replace("\\", "/"))  # a backslash is a separator on Windows
    if name.is_absolute() or (name.parts and name.parts[0].endswith(":")):
        return "absolute path"
    if ".." in name.parts:
        return "'..' in path"
    if member.issym() or member.islnk():
        target = PurePosixPath(member.linkname.replace("\\", "/"))
        if target.is_absolute() or ".." in target.parts:
            return f"link to {member.linkname!r} leaves the archive"
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        return "device, fifo or other special file"
    return None


def extract_tgz(archive: Path, dest: Path) -> Path:
    """Extract the gzipped tar `archive` into `dest` and return `dest`.

    Every member is checked first; one with an absolute path, a `..` component, a link leaving
    the archive or a special file makes the whole archive refused (ValueError) before anything is
    written. Extraction goes to a staging folder inside `dest` whose top-level entries are then
    renamed into place, so an interrupted run never leaves a half-filled folder under its final
    name. An existing top-level entry of the same name is an error (FileExistsError), not merged.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for member in members:
            reason = _unsafe_reason(member)
            if reason is not None:
                raise ValueError(
                    f"refusing to extract {archive}: member {member.name!r} is unsafe ({reason})"
                )
        tops = sorted({PurePosixPath(m.name).parts[0] for m in members if PurePosixPath(m.name).parts})
        clashes = [t for t in tops if (dest / t).exists()]
        if clashes:
            raise FileExistsError(f"refusing to extract {archive} into {dest}: {clashes} already exist there")
        staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
        try:
            if hasattr(tarfile, "data_filter"):  # 3.11.4+: a second, independent line of defence
                tar.extractall(staging, members=members, filter="data")
            else:  # pragma: no cover - older interpreters; members were vetted above
                tar.extractall(staging, members=members)
            for top in tops:
                os.replace(staging / top, dest / top)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dest

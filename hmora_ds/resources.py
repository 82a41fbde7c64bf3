"""Files that ship inside the package: run configs and DeepSpeed configs.

The run configs (``hmora_ds/configs/*.yaml``) and DeepSpeed JSONs (``hmora_ds/ds_configs/*.json``)
are package data, so an installed ``hmora-ds`` finds them from any directory; a checkout also
has them at the top level (``configs/``, ``ds_configs/``, links to the same files).

Every command that takes ``--config`` or ``--deepspeed`` accepts a path (as before) or the
shipped file's name: ``--config default``, ``--config paper_qwen2_1.5b.yaml``,
``--deepspeed zero3``, or the checkout-relative ``configs/default.yaml`` from any directory.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIGS_DIR = PACKAGE_DIR / "configs"
DS_CONFIGS_DIR = PACKAGE_DIR / "ds_configs"


def shipped_names(directory: Path, suffix: str) -> list[str]:
    """The names (without suffix) of the shipped files in ``directory``."""
    return sorted(p.name[: -len(suffix)] for p in directory.glob(f"*{suffix}"))


def _resolve(value: str | Path, directory: Path, suffix: str, flag: str) -> Path:
    path = Path(value).expanduser()
    if path.is_file():
        return path
    # A shipped file by name: "default", "default.yaml" or "configs/default.yaml".
    name = path.name if path.parent.name in ("", directory.name) else None
    if name is not None:
        shipped = directory / (name if name.endswith(suffix) else name + suffix)
        if shipped.is_file():
            return shipped
    names = ", ".join(shipped_names(directory, suffix))
    raise ValueError(f"{flag}: {value} is neither a file nor a shipped {suffix} ({names})")


def resolve_run_config(value: str | Path) -> Path:
    """``--config``: a run-config YAML path, or a shipped run config's name.

    Raises:
        ValueError: One line naming the flag and the shipped configs.
    """
    return _resolve(value, CONFIGS_DIR, ".yaml", "--config")


def resolve_ds_config(value: str | Path) -> Path:
    """``--deepspeed``: a DeepSpeed JSON path, or a shipped one's name (``zero2``, ``zero3``…).

    Raises:
        ValueError: One line naming the flag and the shipped configs.
    """
    return _resolve(value, DS_CONFIGS_DIR, ".json", "--deepspeed")


DEFAULT_DS_CONFIG = DS_CONFIGS_DIR / "zero2.json"

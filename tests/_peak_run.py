"""Run the real training entry point in this process and report the memory it added.

``python tests/_peak_run.py OUT.json <launchers/train.py arguments…>``: imports the libraries
training uses (their memory is the interpreter baseline, which the planner does not model),
resets the peak-RSS mark (Linux ``/proc/self/clear_refs``), runs
:func:`hmora_ds.train.cli.main`, and writes JSON with the peak RSS of the run (VmHWM, the
quantity the trainer logs as ``peak_memory_mb`` on CPU), the baseline RSS, and the growth of
file-backed RSS (``RssFile``: the memory-mapped safetensors checkpoint and library code paged
in during the run — host-side loading artefacts, not tensors the planner counts).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def status_mb(key: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1)) / 1024


def main() -> int:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    import deepspeed  # noqa: F401
    import transformers  # noqa: F401

    import hmora_ds.train.trainer  # noqa: F401
    from hmora_ds.train.cli import main as train_main

    baseline, file_before = status_mb("VmRSS"), status_mb("RssFile")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        reset = True
    except OSError:  # not Linux, or a sandbox that forbids it
        reset = False
    rc = train_main(argv)
    result = {
        "hwm_reset": reset,
        "baseline_mb": baseline,
        "peak_mb": status_mb("VmHWM"),
        "file_growth_mb": status_mb("RssFile") - file_before,
        "rc": rc,
    }
    result["tensors_mb"] = result["peak_mb"] - baseline - result["file_growth_mb"]
    out.write_text(json.dumps(result))
    return rc


if __name__ == "__main__":
    sys.exit(main())

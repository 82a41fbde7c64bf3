"""The mutation report: ``python -m tests._mutation`` after ``mutmut run`` (``make mutate``).

mutmut (pinned in ``constraints.txt``) leaves one ``mutants/<file>.meta`` JSON per mutated
source file with each mutant's exit code; its own ``mutmut results`` prints names only. This
turns them into ``bench/results/mutation.md``: the score per file, every surviving mutant
with its diff, and the survivors explained in ``tests/mutation_explained.yaml`` (equivalent
mutants: no test can tell them from the original, each with the reason).

An explanation names a mutant (exact name or an ``fnmatch`` pattern) and, for an exact name,
the mutated line as mutmut shows it (``changes``): when the code moves, mutmut's numbering
moves with it, the line no longer matches, and the explanation is reported as stale instead
of silently explaining a different mutant.

Score = (killed + timeout + explained) / mutants. ``no tests`` (no fast unit test reaches the
function) counts as not killed.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXPLAINED = ROOT / "tests" / "mutation_explained.yaml"
# mutmut's exit codes → status (its ``mutmut.stats.status_by_exit_code``, condensed).
KILLED, SURVIVED, NO_TESTS, TIMEOUT, OTHER = "killed", "survived", "no tests", "timeout", "other"
_STATUS = {1: KILLED, 3: KILLED, 0: SURVIVED, 5: NO_TESTS, 33: NO_TESTS, 36: TIMEOUT,
           24: TIMEOUT, -24: TIMEOUT, 152: TIMEOUT, 255: TIMEOUT}  # fmt: skip


@dataclass
class Mutant:
    name: str
    file: str
    status: str
    diff: str = ""
    reason: str | None = None

    @property
    def changed(self) -> str:
        """The mutated line(s) as mutmut shows them (the diff's ``+`` lines)."""
        return "\n".join(
            line[1:].strip()
            for line in self.diff.splitlines()
            if line.startswith("+") and not line.startswith("+++")
        )


def load_mutants(mutants_dir: Path) -> list[Mutant]:
    out = []
    for meta in sorted(mutants_dir.rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        file = str(meta.relative_to(mutants_dir))[: -len(".meta")]
        for name, code in data["exit_code_by_key"].items():
            status = "not checked" if code is None else _STATUS.get(code, OTHER)
            out.append(Mutant(name, file, status))
    return out


def add_diffs(mutants: list[Mutant]) -> None:
    """mutmut's own diff of each surviving mutant (read from ``mutants/``; run from the root)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    for m in mutants:
        if m.status in (SURVIVED, NO_TESTS, OTHER):
            try:
                m.diff = get_diff_for_mutant(m.name, path=m.file)
            except Exception as err:  # a diff we cannot show is reported, never fatal
                m.diff = f"(mutmut could not show the diff: {type(err).__name__}: {err})"


def explain(mutants: list[Mutant], entries: list[dict]) -> list[str]:
    """Attach reasons to survivors; returns the stale entries (matching no survivor)."""
    stale = []
    for entry in entries:
        pattern, changes, reason = entry["mutant"], entry.get("changes"), entry["reason"]
        hits = [
            m
            for m in mutants
            if m.status in (SURVIVED, NO_TESTS)
            and fnmatch.fnmatchcase(m.name, pattern)
            and (changes is None or changes.strip() in m.changed)
        ]
        for m in hits:
            m.reason = reason
        if not hits:
            stale.append(f"{pattern}" + (f" ({changes.strip()!r})" if changes else ""))
    return stale


def _row(label: str, ms: list[Mutant]) -> tuple[str, float]:
    c = Counter(m.status for m in ms)
    explained = sum(1 for m in ms if m.reason)
    open_survived = sum(1 for m in ms if m.status == SURVIVED and not m.reason)
    open_no_tests = sum(1 for m in ms if m.status == NO_TESTS and not m.reason)
    score = (c[KILLED] + c[TIMEOUT] + explained) / max(len(ms), 1)
    cells = [label, len(ms), c[KILLED], c[TIMEOUT], explained, open_survived, open_no_tests,
             c["not checked"]]  # fmt: skip
    return "| " + " | ".join(map(str, cells)) + f" | {100 * score:.1f} % |", score


def report(mutants: list[Mutant], stale: list[str]) -> tuple[str, float]:
    import mutmut

    by_file: dict[str, list[Mutant]] = {}
    for m in mutants:
        by_file.setdefault(m.file, []).append(m)
    rows = [_row(f"`{file}`", ms)[0] for file, ms in sorted(by_file.items())]
    total_row, score = _row("**all**", mutants)
    done = round(score * len(mutants))
    lines = [
        "# Mutation testing",
        "",
        f"`make mutate` (mutmut {getattr(mutmut, '__version__', '?')}), {date.today()}: every "
        "mutant of the method math run against the fast unit tests that reach it "
        "(`[tool.mutmut]` in `pyproject.toml`). Score = (killed + timeout + explained) / "
        "mutants; *explained* = equivalent mutants, each with its reason "
        "(`tests/mutation_explained.yaml`); *no tests* = no fast unit test reaches the function.",
        "",
        f"**Score: {100 * score:.1f} %** ({done} of {len(mutants)} mutants); "
        f"{sum(m.status == 'not checked' for m in mutants)} not checked yet (a stopped run: "
        "`make mutate` continues it).",
        "",
        "| file | mutants | killed | timeout | explained | survived | no tests | not checked "
        "| score |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        total_row,
    ]
    if stale:
        lines += [
            "",
            "## Stale explanations (match no surviving mutant: update or delete them)",
            "",
        ]
        lines += [f"- `{s}`" for s in stale]
    unexplained = [m for m in mutants if m.status in (SURVIVED, NO_TESTS, OTHER) and not m.reason]
    lines += ["", f"## Surviving, not explained ({len(unexplained)})", ""]
    for m in unexplained:
        lines += [f"### `{m.name}` ({m.status})", "", "```diff", m.diff.strip(), "```", ""]
    by_reason: dict[str, list[Mutant]] = {}
    for m in mutants:
        if m.reason:
            by_reason.setdefault(m.reason.strip(), []).append(m)
    lines += ["", f"## Explained ({sum(map(len, by_reason.values()))})", ""]
    for reason, ms in by_reason.items():
        lines.append(f"- {reason} " + ", ".join(f"`{m.name}`" for m in ms))
    return "\n".join(lines).rstrip() + "\n", score


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tests._mutation", description=__doc__.split("\n")[0]
    )
    ap.add_argument(
        "--mutants", default="mutants", help="mutmut's directory (default: %(default)s)"
    )
    ap.add_argument("--out", default="bench/results/mutation.md", help="default: %(default)s")
    ap.add_argument(
        "--target", type=float, default=0.90, help="score to reach (default: %(default)s)"
    )
    ap.add_argument("--only", default=None, help="report only mutants matching this pattern")
    args = ap.parse_args(argv)
    mutants_dir = Path(args.mutants)
    if not mutants_dir.is_dir():
        print(f"--mutants: {mutants_dir} does not exist; run `make mutate` first", file=sys.stderr)
        return 2
    mutants = load_mutants(mutants_dir)
    if args.only:
        mutants = [m for m in mutants if fnmatch.fnmatchcase(m.name, args.only)]
    add_diffs(mutants)
    entries = (yaml.safe_load(EXPLAINED.read_text()) or []) if EXPLAINED.exists() else []
    stale = explain(mutants, entries)
    text, score = report(mutants, stale)
    Path(args.out).write_text(text)
    print(f"mutation score {100 * score:.1f} % ({len(mutants)} mutants) -> {args.out}")
    if stale:
        print(f"{len(stale)} stale explanation(s): see {args.out}")
    return 0 if score >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())

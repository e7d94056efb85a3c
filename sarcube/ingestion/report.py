"""What an ingest tells its caller: the report of a run that ingested something, the error of
one that could not, and the one-line-per-problem wording both use."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import SarcubeError


class IngestError(SarcubeError):
    """The ingest could not run (no usable input, unusable cube)."""


@dataclass
class IngestReport:
    """The outcome of an ingest: scenes ingested and skipped, problems, slice and label status."""

    cube: str
    ingested: list[str] = field(default_factory=list)  # product ids written in this run
    skipped: list[str] = field(default_factory=list)  # already in the cube, unchanged
    problems: list[str] = field(default_factory=list)  # one line per bad input
    slices: dict[str, str] = field(default_factory=dict)  # date -> status after this run
    labels: str = "none"
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = [
            f"ingest summary for {self.cube}:",
            f"  scenes ingested: {len(self.ingested)}, "
            f"skipped (already in the cube): {len(self.skipped)}, "
            f"problems: {len(self.problems)}",
            f"  labels: {self.labels}",
            "  slices: "
            + (", ".join(f"{d} {s}" for d, s in sorted(self.slices.items())) or "none"),
        ]
        lines += [f"  problem: {p}" for p in self.problems]
        lines.append(f"  time: {self.seconds:.1f} s")
        return "\n".join(lines)


def problem_lines(what: str, problems: Sequence[str]) -> str:
    """One line for one problem (``what: problem``); a header and one line each for several."""
    if len(problems) == 1:
        return f"{what}: {problems[0]}"
    return f"{what}:\n" + "\n".join(f"  {p}" for p in problems)

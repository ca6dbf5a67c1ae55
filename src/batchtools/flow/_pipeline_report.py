"""Pipeline reports: outcomes that name their stage, and per-stage figures."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from batchtools.engine._outcome import (
    Attempt,
    Outcome,
    Report,
    State,
    _number_duplicates,
)


class PipelineOutcome(Outcome):
    """The final outcome of one item of a pipeline.

    ``seq``, ``key`` and ``item`` are those of the original input item.
    ``value``, ``error``, ``attempts``, ``reason`` and ``source`` come from
    the stage named by ``stage``.

    Attributes:
        stage: The stage that decided the outcome: the last stage for a
            succeeded item, otherwise the stage where the item failed,
            was skipped or was cancelled.
    """

    __slots__ = ("stage",)

    def __init__(
        self,
        seq: int,
        key: str | None,
        item: Any,
        state: State,
        *,
        stage: str,
        value: Any = None,
        error: BaseException | None = None,
        attempts: list[Attempt] | None = None,
        reason: str | None = None,
        source: str = "run",
        strategy: str | None = None,
    ) -> None:
        super().__init__(
            seq, key, item, state, value, error, attempts, reason, source, strategy
        )
        self.stage = stage

    def __repr__(self) -> str:
        detail = self.error if self.state is State.FAILED else self.value
        return (
            f"<PipelineOutcome #{self.seq} {self.state.value} in {self.stage!r} "
            f"item={self.item!r:.60} {detail!r:.60}>"
        )


@dataclass(slots=True)
class StageReport:
    """The report of one stage of a pipeline run.

    Attributes:
        name: The stage's name.
        counts: Items per final state in this stage. ``succeeded`` items
            went on to the next stage, or ended the pipeline. Items that a
            stop left between this stage and the one before count as
            ``cancelled`` here.
        attempts: Attempts that ended in this stage.
        median_seconds: The median attempt duration; ``None`` without
            attempts.
        p95_seconds: The 95th percentile of attempt durations (nearest
            rank); ``None`` without attempts.
        max_seconds: The maximum attempt duration; ``None`` without
            attempts.
        report: The report of the stage's own engine run.
    """

    name: str
    counts: dict[str, int]
    attempts: int
    median_seconds: float | None
    p95_seconds: float | None
    max_seconds: float | None
    report: Report


@dataclass(slots=True, repr=False)
class PipelineReport(Report):
    """The report of a pipeline run: end-to-end counts and a report per stage.

    The fields of `Report` describe the items end to end; the counters of
    workers and rate limits are summed over the stages.

    Attributes:
        stages: One report per stage, in pipeline order.
    """

    stages: list[StageReport] = field(default_factory=list)

    # The overrides narrow the type of the outcomes: `run` collects only
    # `PipelineOutcome` objects. A list is invariant, hence the ignore.
    @property
    def outcomes(self) -> list[PipelineOutcome]:  # type: ignore[override]
        """Every final outcome in input order, when the caller collected them."""
        if self.unnumbered:
            self.unnumbered = False
            _number_duplicates(self.collected)
        return cast(list[PipelineOutcome], self.collected)

    def failed(self) -> Iterator[PipelineOutcome]:
        """Yield the collected outcomes that failed."""
        return (o for o in self.outcomes if o.state is State.FAILED)

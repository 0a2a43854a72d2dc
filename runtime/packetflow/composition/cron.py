"""Cron schedules (5 fields, or 6 with seconds first), evaluated in UTC. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31),
           ("month", 1, 12), ("weekday", 0, 6))


@dataclass(frozen=True)
class Cron:
    """A cron schedule: 5 fields (minute ...) or 6 with seconds first; times are UTC.

    Fields take ``*``, ``N``, ``A-B``, ``*/S``, ``A-B/S`` and comma lists; weekday 0 (or 7) is
    Sunday. When both day and weekday are restricted, either may match (as in Vixie cron).
    """

    second: frozenset[int]
    minute: frozenset[int]
    hour: frozenset[int]
    day: frozenset[int]
    month: frozenset[int]
    weekday: frozenset[int]
    any_day: bool
    any_weekday: bool

    @classmethod
    def parse(cls, expression: str) -> Cron:
        """Parse, or ValueError naming the field that is wrong."""
        parts = expression.split()
        if len(parts) == 5:
            parts = ["0", *parts]
        if len(parts) != 6:
            raise ValueError(f"cron {expression!r} needs 5 fields (or 6 with seconds first)")
        sets = {}
        for text, (name, low, high) in zip(parts, _FIELDS, strict=True):
            top = 7 if name == "weekday" else high
            values = _parse_field(text, name, low, top)
            sets[name] = frozenset(0 if name == "weekday" and v == 7 else v for v in values)
        return cls(**sets, any_day=parts[3] == "*", any_weekday=parts[5] == "*")

    def _day_matches(self, moment: datetime) -> bool:
        in_day = moment.day in self.day
        in_weekday = (moment.weekday() + 1) % 7 in self.weekday  # cron: Sunday is 0
        if self.any_day or self.any_weekday:
            return in_day and in_weekday
        return in_day or in_weekday

    def next_after(self, moment: datetime) -> datetime:
        """The first fire time strictly after ``moment`` (an aware datetime)."""
        t = moment.astimezone(UTC).replace(microsecond=0) + timedelta(seconds=1)
        for _ in range(100_000):  # skipping by whole units: a few hundred steps at most
            if t.month not in self.month:
                t = _next_month(t)
            elif not self._day_matches(t):
                t = (t + timedelta(days=1)).replace(hour=0, minute=0, second=0)
            elif t.hour not in self.hour:
                t = (t + timedelta(hours=1)).replace(minute=0, second=0)
            elif t.minute not in self.minute:
                t = (t + timedelta(minutes=1)).replace(second=0)
            elif t.second not in self.second:
                t += timedelta(seconds=1)
            else:
                return t
        raise ValueError("cron schedule never fires")  # e.g. February 30th

    def latest_between(self, after: datetime, moment: datetime) -> datetime | None:
        """The last fire time in (``after``, ``moment``], or None (what a process that was
        down from ``after`` to ``moment`` missed most recently)."""
        for span in _LOOKBACK:
            start = max(after, moment - span)
            found, t = None, self.next_after(start)
            while t <= moment:
                found, t = t, self.next_after(t)
            if found is not None or start == after:
                return found
        return None


# Windows searched back for a missed fire time: short first, so a frequent schedule after a
# long downtime does not step through every missed second.
_LOOKBACK = (timedelta(minutes=1), timedelta(hours=1), timedelta(days=1), timedelta(days=32),
             timedelta(days=366), timedelta(days=4 * 366 + 1))


def _next_month(t: datetime) -> datetime:
    year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
    return t.replace(year=year, month=month, day=1, hour=0, minute=0, second=0)


def _parse_field(text: str, name: str, low: int, high: int) -> set[int]:
    values: set[int] = set()
    for item in text.split(","):
        span, _, step_text = item.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if span == "*":
                start, stop = low, high
            elif "-" in span:
                start, stop = (int(x) for x in span.split("-", 1))
            else:
                start = stop = int(span)
                if step_text:
                    stop = high
        except ValueError:
            raise ValueError(f"cron {name} field {text!r} is not a number, range or step"
                             ) from None
        if step < 1 or not low <= start <= stop <= high:
            raise ValueError(f"cron {name} field {text!r} is out of range {low}-{high}")
        values.update(range(start, stop + 1, step))
    return values

"""Parse the firmware's serial records (docs/records.md) into observations.

The firmware observes, the lab judges: this module only decodes and checks integrity
(prefix, checksum, consecutive sequence numbers, the closing `end` record). It never
decides whether an observation is right.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PREFIX = b"@@LAB "
# A record line: prefix, seq, type, key=value pairs, then the checksum field.
_LINE = re.compile(rb"^@@LAB (\d+) ([a-z]+)((?: [^ =]+=[^ ]*)*) ck=([0-9a-f]{2})\r?$")


class RecordError(ValueError):
    """A line that starts like a record but is not a valid one."""


@dataclass(frozen=True)
class Record:
    seq: int
    type: str
    fields: tuple[tuple[str, str], ...]  # decoded values, in line order

    def get(self, key: str, default: str | None = None) -> str | None:
        for k, v in self.fields:
            if k == key:
                return v
        return default


@dataclass(frozen=True)
class Observation:
    """One `obs` record: scope, probe, params (keys before obs=), value, details (after)."""

    seq: int
    scope: str
    probe: str
    params: dict[str, str]
    value: str
    details: dict[str, str]


@dataclass
class Transcript:
    """Everything the firmware reported in one boot, with the integrity verdict."""

    records: list[Record] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # corrupt lines, seq gaps, ...
    complete: bool = False  # the `end` record arrived and its count matched

    @property
    def observations(self) -> list[Observation]:
        return [to_observation(r) for r in self.records if r.type == "obs"]

    @property
    def info(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for r in self.records:
            if r.type in ("info", "hello"):
                out.update(r.fields)
        return out


def unescape(value: bytes) -> str:
    """Undo the firmware's escaping: `\\xHH` -> that byte. Bytes map 1:1 to code points
    (latin-1) so a 12-byte signature stays 12 characters, NULs included."""
    out = bytearray()
    i = 0
    while i < len(value):
        c = value[i]
        if c == 0x5C:  # backslash
            hexpart = value[i + 2 : i + 4]
            if value[i + 1 : i + 2] != b"x" or len(hexpart) != 2:
                raise RecordError(f"bad escape at byte {i}: {value!r}")
            try:
                out.append(int(hexpart, 16))
            except ValueError as exc:
                raise RecordError(f"bad escape at byte {i}: {value!r}") from exc
            i += 4
        else:
            out.append(c)
            i += 1
    return out.decode("latin-1")


def checksum(body: bytes) -> int:
    return sum(body) & 0xFF


def parse_line(line: bytes) -> Record:
    """Parse one record line (without or with its line end). Raises RecordError."""
    line = line.rstrip(b"\n")
    m = _LINE.match(line)
    if not m:
        raise RecordError(f"malformed record: {line[:120]!r}")
    body = line[: line.rindex(b" ck=")]
    if checksum(body) != int(m.group(4), 16):
        raise RecordError(f"checksum mismatch (want {checksum(body):02x}): {line[:120]!r}")
    fields = []
    for pair in m.group(3).split():
        key, _, value = pair.partition(b"=")
        fields.append((key.decode("ascii"), unescape(value)))
    return Record(int(m.group(1)), m.group(2).decode("ascii"), tuple(fields))


def to_observation(rec: Record) -> Observation:
    keys = [k for k, _ in rec.fields]
    if rec.type != "obs" or "obs" not in keys or keys[:2] != ["scope", "probe"]:
        raise RecordError(f"record {rec.seq} is not a well-formed observation")
    split = keys.index("obs")
    fields = list(rec.fields)
    return Observation(
        seq=rec.seq,
        scope=fields[0][1],
        probe=fields[1][1],
        params=dict(fields[2:split]),
        value=fields[split][1],
        details=dict(fields[split + 1 :]),
    )


def parse_stream(data: bytes) -> Transcript:
    """Decode a whole console capture. Non-record lines are noise; a record-looking line
    that fails its checksum, a sequence gap or a missing `end` is a problem."""
    t = Transcript()
    expect_seq = 0
    for raw in data.split(b"\n"):
        start = raw.find(PREFIX)
        if start < 0:
            continue
        if start > 0:
            # Noise in front of a record (e.g. a partial line cut by a reset): the record
            # itself is still checked by its checksum.
            raw = raw[start:]
        try:
            rec = parse_line(raw)
        except RecordError as exc:
            t.problems.append(str(exc))
            continue
        if rec.seq != expect_seq:
            t.problems.append(f"sequence gap: expected record {expect_seq}, got {rec.seq}")
        expect_seq = rec.seq + 1
        if rec.type == "obs":
            try:
                to_observation(rec)
            except RecordError as exc:
                t.problems.append(str(exc))
                continue
        t.records.append(rec)
        if rec.type == "end":
            count = rec.get("count")
            if count is None or int(count) != rec.seq:
                t.problems.append(f"end record says count={count}, but it is record {rec.seq}")
            else:
                t.complete = True
            break
    if not t.records:
        t.problems.append("no record received")
    elif not t.complete:
        t.problems.append("output cut short: no valid `end` record")
    return t

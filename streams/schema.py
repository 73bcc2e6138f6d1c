"""The input contract of ``vm.metrics``: decode and validate a batch of messages.

A message value is one JSON object or a JSON array of objects (an agent batching
its VMs). Good samples come back columnar (``DecodedBatch``) so the window store
ingests them with array operations; every invalid message comes back as a
``Rejected`` with its original bytes and a reason, for the DLQ. The decoder never
raises for any input bytes: a worker must not crash on what an agent sends.

Rules beyond the field types (see README "Contract"):
- ``vm`` and ``host`` must not contain control characters (U+0000-U+001F, U+007F):
  NumPy ``str_`` arrays drop trailing NULs, so ``"vm-1\\u0000"`` would merge into ``vm-1``;
- ``ts`` must lie in ``[Limits.min_ts, now + Limits.max_future_s]`` (600 s by
  default, the worker's ``ZHUGE_MAX_FUTURE_S``: ``limits_from_settings``);
- numbers must be finite and at most a physical upper bound per field
  (``Limits.max_mem_mb`` ...), far below float32's 3.4e38, so that downstream
  float32 arithmetic cannot overflow to inf;
- ``mem_used_mb`` may exceed ``mem_total_mb`` by at most ``Limits.mem_over_tolerance``
  (a relative 2% by default: hypervisors count some overhead against the guest);
- messages above ``Limits.max_bytes`` are rejected without being parsed;
- in an array, bad objects are rejected and the good ones kept; a message with
  bad objects yields ONE ``Rejected`` (whole original bytes) whose reason names
  each bad index, e.g. ``[3].cpu_pct: must be <= 100``.
"""

from __future__ import annotations

import operator
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import numpy as np
from msgspec import Meta

if TYPE_CHECKING:
    from app.settings import Settings

METRICS: tuple[str, ...] = (
    "cpu_pct", "mem_total_mb", "mem_used_mb", "dirty_mbps", "net_rx_kbps", "net_tx_kbps",
    "disk_read_kbps", "disk_write_kbps", "vcpus", "wss_mb",
)
_I_MEM_TOTAL = METRICS.index("mem_total_mb")
_I_MEM_USED = METRICS.index("mem_used_mb")
_MAX_REASONS = 5  # bad indices named per message; the rest are counted
_F32_MAX = float(np.finfo(np.float32).max)

Pct = Annotated[float, Meta(ge=0, le=100)]
NonNeg = Annotated[float, Meta(ge=0)]


class Sample(msgspec.Struct):
    """One VM sample; unknown fields are ignored, ``null`` counts as missing."""

    vm: Annotated[str, Meta(min_length=1, max_length=256)]
    ts: float
    host: Annotated[str, Meta(max_length=256)] | None = None
    cpu_pct: Pct | None = None
    mem_total_mb: NonNeg | None = None
    mem_used_mb: NonNeg | None = None
    dirty_mbps: NonNeg | None = None
    net_rx_kbps: NonNeg | None = None
    net_tx_kbps: NonNeg | None = None
    disk_read_kbps: NonNeg | None = None
    disk_write_kbps: NonNeg | None = None
    vcpus: NonNeg | None = None
    wss_mb: NonNeg | None = None  # writable working set (distinct pages dirtied over a long window), MB


@dataclass(frozen=True)
class Limits:
    """Validation limits beyond the field types; all overridable per call.

    The ``max_*`` value bounds are physical: far above any real VM, far below
    float32's 3.4e38, so an accepted value cannot overflow downstream arithmetic.
    """

    max_bytes: int = 1 << 20  # message size
    min_ts: float = 946684800.0  # 2000-01-01T00:00:00Z
    max_future_s: float = 600.0  # the worker passes ZHUGE_MAX_FUTURE_S (limits_from_settings)
    mem_over_tolerance: float = 0.02
    # vm.metrics values (cpu_pct is 0-100 by its type)
    max_mem_mb: float = float(1 << 24)  # 16 TiB: mem_total_mb, mem_used_mb
    max_dirty_mbps: float = 1e6  # 1 TB/s
    max_net_kbps: float = 1e9  # ~1 TB/s: net_rx_kbps, net_tx_kbps
    max_disk_kbps: float = 1e9  # ~1 TB/s: disk_read_kbps, disk_write_kbps
    max_vcpus: float = 4096.0
    # vm.migrations values (streams.migrations)
    max_downtime_ms: float = 86_400_000.0  # one day
    max_transferred_bytes: float = float(1 << 60)  # 1 EiB: the "bytes" field
    max_link_mbps: float = 1e6  # 1 TB/s
    max_rounds: int = 1_000_000


def limits_from_settings(settings: Settings) -> Limits:
    """The worker's limits: the defaults, with the future limit its settings carry (``ZHUGE_MAX_FUTURE_S``)."""
    return Limits(max_future_s=float(settings.max_future_s))


def upper_bounds(limits: Limits) -> np.ndarray:
    """float64 ``(len(METRICS),)``: the largest accepted value of each metric, capped at float32's max."""
    bound = {"cpu_pct": 100.0, "mem_total_mb": limits.max_mem_mb, "mem_used_mb": limits.max_mem_mb,
             "dirty_mbps": limits.max_dirty_mbps, "net_rx_kbps": limits.max_net_kbps,
             "net_tx_kbps": limits.max_net_kbps, "disk_read_kbps": limits.max_disk_kbps,
             "disk_write_kbps": limits.max_disk_kbps, "vcpus": limits.max_vcpus, "wss_mb": limits.max_mem_mb}
    return np.minimum(np.array([bound[m] for m in METRICS], dtype=np.float64), _F32_MAX)


@dataclass(frozen=True)
class Rejected:
    raw: bytes  # the ORIGINAL message bytes, whole
    key: bytes | None
    reason: str
    index: int = -1  # position of the message in the decoded batch (to find its offset); -1: unknown


@dataclass
class DecodedBatch:
    vm: list[str]
    host: list[str]  # "" when absent
    ts: np.ndarray  # float64 (n,)
    values: np.ndarray  # float32 (n, len(METRICS)), NaN = missing
    source: np.ndarray  # int32 (n,): index of the input message of each sample
    rejected: list[Rejected] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.vm)

    def subset(self, keep: np.ndarray) -> DecodedBatch:
        """The samples where the boolean ``keep (n,)`` is set (rejected messages are left out)."""
        idx = np.flatnonzero(keep)
        return DecodedBatch([self.vm[i] for i in idx.tolist()], [self.host[i] for i in idx.tolist()],
                            self.ts[idx], self.values[idx], self.source[idx])  # fmt: skip


_row = operator.attrgetter("ts", *METRICS)
CONTROL_REASON = "must not contain control characters"
_CONTROL = re.compile("[\x00-\x1f\x7f]")


def has_control(strings: Sequence[str]) -> np.ndarray:
    """bool ``(len(strings),)``: which strings hold a control character (U+0000-U+001F, U+007F).

    Checked after decoding rather than with a msgspec ``pattern`` (a regex call
    per string cost ~28% of decode throughput): one scan of the strings' joined
    UTF-8, where these characters are exactly the bytes 0x00-0x1F and 0x7F (every
    byte of a multi-byte sequence is >= 0x80). Only when one is found are the
    hits mapped back to their strings.
    """
    out = np.zeros(len(strings), dtype=bool)
    joined = " ".join(strings)
    code = np.frombuffer(joined.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    if not ((code < 0x20) | (code == 0x7F)).any():
        return out
    hits = np.fromiter((m.start() for m in _CONTROL.finditer(joined)), dtype=np.int64)
    sizes = np.fromiter(map(len, strings), dtype=np.int64, count=len(strings)) + 1  # + the separator
    starts = np.cumsum(sizes) - sizes  # character offset of each string in ``joined``
    out[np.searchsorted(starts, hits, side="right") - 1] = True
    return out


@dataclass
class ObjectBatch:
    """Structs decoded from a batch of messages, and why the other messages failed."""

    items: list[Any]
    src: list[int]  # input message of each item
    pos: list[int]  # index inside the message's array, -1 for a single object
    reasons: dict[int, list[str]]  # message index -> what was wrong with it

    def rejected(self, raws: Sequence[Any], keys: Sequence[bytes | None] | None) -> list[Rejected]:
        """One ``Rejected`` per failed message: its whole original bytes, key and reasons."""
        if keys is not None and len(keys) != len(raws):
            keys = list(keys)[: len(raws)] + [None] * max(0, len(raws) - len(keys))
        return [
            Rejected(raw=_as_bytes(raws[i]), key=None if keys is None else keys[i], reason=_join(r), index=i)
            for i, r in sorted(self.reasons.items())
        ]


class ObjectDecoder:
    """Messages holding one JSON object or an array of them -> msgspec structs; never raises.

    The fast path decodes each message once as ``T | list[T]``; when that fails, the
    message is split into raw elements and each is decoded alone, so one bad object
    of a batched message does not drop the good ones (shared by ``vm.metrics`` and
    ``vm.migrations``).
    """

    def __init__(self, struct: type) -> None:
        self._batch = msgspec.json.Decoder(struct | list[struct])
        self._one = msgspec.json.Decoder(struct)
        self._raw_list = msgspec.json.Decoder(list[msgspec.Raw])

    def decode(self, raws: Sequence[Any], limits: Limits) -> ObjectBatch:
        out = ObjectBatch([], [], [], {})
        for i, raw in enumerate(raws):
            if not isinstance(raw, (bytes, bytearray, memoryview)):
                out.reasons[i] = ["empty message (no value)" if raw is None else f"value is {type(raw).__name__}, not bytes"]
            elif len(raw) > limits.max_bytes:
                out.reasons[i] = [f"message too large: {len(raw)} bytes > {limits.max_bytes}"]
            else:
                self._decode_one(raw, i, out)
        return out

    def _decode_one(self, raw: Any, i: int, out: ObjectBatch) -> None:
        try:
            got = self._batch.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            self._split(raw, i, exc, out)
            return
        except Exception as exc:  # noqa: BLE001 - the decoder must never raise
            out.reasons[i] = [f"undecodable: {exc}"]
            return
        if isinstance(got, list):
            if not got:
                out.reasons[i] = ["empty array"]
                return
            out.items.extend(got)
            out.src.extend([i] * len(got))
            out.pos.extend(range(len(got)))
        else:
            out.items.append(got)
            out.src.append(i)
            out.pos.append(-1)

    def _split(self, raw: Any, i: int, exc: Exception, out: ObjectBatch) -> None:
        """The whole message failed: find which objects of an array are bad, keep the rest."""
        try:
            parts = self._raw_list.decode(raw)
        except Exception:  # noqa: BLE001 - not an array: the first error says why
            out.reasons[i] = [_reason(exc, None)]
            return
        bad: list[str] = []
        for j, part in enumerate(parts):
            try:
                item = self._one.decode(part)
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                bad.append(_reason(e, j))
                continue
            except Exception as e:  # noqa: BLE001
                bad.append(f"[{j}]: undecodable: {e}")
                continue
            out.items.append(item)
            out.src.append(i)
            out.pos.append(j)
        if bad or not parts:
            out.reasons[i] = bad or ["empty array"]


_samples = ObjectDecoder(Sample)


def decode_messages(
    raws: Sequence[bytes],
    keys: Sequence[bytes | None] | None = None,
    *,
    now: float | None = None,
    limits: Limits = Limits(),
) -> DecodedBatch:
    """Decode a batch of message values into columns plus rejections; never raises."""
    now = time.time() if now is None else now
    got = _samples.decode(raws, limits)
    batch = _columns(got.items, got.src)
    _check_ranges(batch, np.asarray(got.pos, dtype=np.int32), got.reasons, now, limits)
    batch.rejected = got.rejected(raws, keys)
    return batch


_EXPECT_CMP = re.compile(r"^Expected `(\w+)` (of length )?([<>]=?) (\S+)$")
_EXPECT_TYPE = re.compile(r"^Expected `([^`]+)`, got `([^`]+)`$")
_MISSING = re.compile(r"^Object missing required field `([^`]+)`$")


def _reason(exc: Exception, index: int | None) -> str:
    """msgspec's error, rewritten as ``[3].cpu_pct: must be <= 100``."""
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):  # malformed JSON (ValidationError subclasses DecodeError)
        return ("" if index is None else f"[{index}]: ") + f"not JSON: {text}"
    msg, _, where = text.partition(" - at `")
    path = where.rstrip("`")
    path = path[1:] if path.startswith("$") else path
    path = path[1:] if path.startswith(".") else path
    if (m := _MISSING.match(msg)) is not None:
        path, msg = (path + "." if path else "") + m.group(1), "required field missing"
    elif (m := _EXPECT_CMP.match(msg)) is not None:
        bound = _number(m.group(4))
        msg = f"{'length ' if m.group(2) else ''}must be {m.group(3)} {bound}"
    elif (m := _EXPECT_TYPE.match(msg)) is not None:
        msg = f"expected {m.group(1).replace('float', 'number')}, got {m.group(2)}"
        if path == "" and index is None:
            msg = f"expected a JSON object or array of objects, got {m.group(2)}"
    elif msg == "Number out of range":
        msg = "must be a finite number"
    prefix = "" if index is None else f"[{index}]"
    if path:
        prefix = f"{prefix}.{path}" if prefix else path
    return f"{prefix}: {msg}" if prefix else msg


def _number(text: str) -> str:
    """A bound as msgspec prints it, shortened (``100.0`` -> ``100``); integers stay exact."""
    if text.isdigit():
        return text
    try:
        return f"{float(text):g}"
    except ValueError:
        return text


def _columns(samples: list[Sample], src: list[int]) -> DecodedBatch:
    """Columns built once per batch: one list comprehension per column, one array each."""
    n = len(samples)
    if n:
        rows = np.array([_row(s) for s in samples], dtype=np.float64)  # None -> NaN
    else:
        rows = np.empty((0, len(METRICS) + 1))
    return DecodedBatch(
        vm=[s.vm for s in samples],
        host=[s.host or "" for s in samples],
        ts=np.ascontiguousarray(rows[:, 0]),
        values=rows[:, 1:],  # float64 until the range checks are done
        source=np.asarray(src, dtype=np.int32).reshape(n),
    )


def bound_text(x: float) -> str:
    """A limit as a reason states it: integers exactly (``16777216``, not ``1.67772e+07``)."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 2.0**63 else f"{x:g}"


def _too_large(name: str, bound: float) -> str:
    """Why a value above its (float32-capped) upper bound was rejected."""
    return f"{name}: too large for float32" if bound >= _F32_MAX else f"{name}: must be <= {bound_text(bound)}"


def _check_ranges(batch: DecodedBatch, pos: np.ndarray, reasons: dict[int, list[str]], now: float,
                  limits: Limits) -> None:
    """Vectorised checks of what the field types cannot express; drops failing samples."""
    ts, v = batch.ts, batch.values
    bad_vm, bad_host = has_control(batch.vm), has_control(batch.host)
    upper = upper_bounds(limits)
    with np.errstate(invalid="ignore"):
        bad_old = ts < limits.min_ts
        bad_future = ts > now + limits.max_future_s
        too_high = v > upper  # NaN (missing) compares False
        tot, used = v[:, _I_MEM_TOTAL], v[:, _I_MEM_USED]
        bad_mem = used > tot * (1.0 + limits.mem_over_tolerance)  # only when both present
    bad = bad_vm | bad_host | bad_old | bad_future | too_high.any(axis=1) | bad_mem
    if bad.any():
        for k in np.flatnonzero(bad):  # failing samples only
            where = "" if pos[k] < 0 else f"[{pos[k]}]."
            if bad_vm[k] or bad_host[k]:
                why = f"{where}{'vm' if bad_vm[k] else 'host'}: {CONTROL_REASON}"
            elif bad_old[k]:
                why = f"{where}ts: {ts[k]:.0f} is before {limits.min_ts:.0f}"
            elif bad_future[k]:
                why = f"{where}ts: {ts[k]:.0f} is more than {limits.max_future_s:.0f} s in the future"
            elif too_high[k].any():
                j = int(np.flatnonzero(too_high[k])[0])
                why = where + _too_large(METRICS[j], upper[j])
            else:
                why = f"{where}mem_used_mb: {used[k]:g} > mem_total_mb {tot[k]:g}"
            reasons.setdefault(int(batch.source[k]), []).append(why)
        keep = ~bad
        idx = np.flatnonzero(keep)
        batch.vm = [batch.vm[k] for k in idx]
        batch.host = [batch.host[k] for k in idx]
        batch.ts, batch.source, v = ts[keep], batch.source[keep], v[keep]
    batch.values = v.astype(np.float32)


def _join(reasons: list[str]) -> str:
    head = "; ".join(reasons[:_MAX_REASONS])
    more = len(reasons) - _MAX_REASONS
    return head + (f"; and {more} more" if more > 0 else "")


def _as_bytes(raw: object) -> bytes:
    if isinstance(raw, bytes):
        return raw
    if isinstance(raw, (bytearray, memoryview)):
        return bytes(raw)
    if isinstance(raw, str):
        return raw.encode("utf-8", "replace")
    return b""

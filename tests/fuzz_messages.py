"""Seeded fuzz messages for ``vm.metrics``: bad kinds mixed with good ones, each labelled.

Shared by ``tests/unit/test_fuzz_messages.py`` (the decoder alone) and the
integration fault suite (the whole worker). The contract they check: every bad
message yields exactly one DLQ record with its original bytes, and every good
sample comes out, the good objects of a mixed array included (``samples``).
``newest_per_vm`` gives the sample each good VM's score must end up reflecting.

Good messages look like an agent's: realistic values, ``ts`` in the hour before
``now`` (or a little ahead of it, within the future limit), VM ids from
``good_vms`` and a stable host per VM (``fuzz-host-<k>``, ``VMS_PER_HOST`` VMs each).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_BYTES = 1 << 20  # streams.schema.Limits().max_bytes
NEAR_FUTURE_S = 300.0  # good "near_future" samples: at most this far ahead (half the 600 s limit)
VMS_PER_HOST = 8

GOOD_KINDS: tuple[str, ...] = ("good_object", "good_array", "good_sparse", "good_near_future")
# bad kinds that are one object, so they can also sit inside a mixed array
OBJECT_KINDS: tuple[str, ...] = (
    "wrong_type", "out_of_range", "huge_value", "far_future", "far_past", "control_id", "long_id",
    "empty_id", "missing_field", "mem_over_total",
)
BAD_KINDS: tuple[str, ...] = (
    "garbage", "truncated_json", "bad_json", "nan_literal", "top_level_scalar", "empty_array",
    "mixed_array", "oversized", *OBJECT_KINDS,
)
_WEIGHT = {"oversized": 0.05}  # 1 MiB each: rare, so that 10,000 messages stay small in memory


@dataclass(frozen=True)
class FuzzMessage:
    """One message value with its key, what kind it is, and the good samples it carries."""

    key: bytes | None
    value: bytes
    kind: str
    bad: bool  # the decoder must yield exactly one Rejected for it
    samples: tuple[tuple[str, float], ...] = ()  # (vm, ts) of each good sample, in message order

    @property
    def vms(self) -> tuple[str, ...]:
        """The VM ids of its good samples, first occurrence order."""
        return tuple(dict.fromkeys(vm for vm, _ in self.samples))

    @property
    def newest(self) -> dict[str, float]:
        """Newest good ``ts`` per VM in this message."""
        out: dict[str, float] = {}
        for vm, ts in self.samples:
            out[vm] = max(ts, out.get(vm, ts))
        return out


def fuzz_messages(n: int, seed: int, now: float, good_vms: list[str], *,
                  good_share: float = 0.2) -> list[FuzzMessage]:
    """``n`` messages, ``round(n * good_share)`` of them good; deterministic for a seed.

    Every kind occurs at least once when there is room for it (at least
    ``len(GOOD_KINDS)`` good and ``len(BAD_KINDS)`` bad messages).
    """
    if not good_vms:
        raise ValueError("good_vms must not be empty")
    if not 0.0 <= good_share <= 1.0:
        raise ValueError(f"good_share must be in [0, 1], got {good_share}")
    gen = _Gen(random.Random(seed), now, list(good_vms))
    return [gen.message(kind) for kind in _kinds(gen.rng, n, good_share)]


def newest_per_vm(messages: list[FuzzMessage]) -> dict[str, float]:
    """Newest good ``ts`` per VM over all messages: what each VM's score must reflect."""
    out: dict[str, float] = {}
    for m in messages:
        for vm, ts in m.newest.items():
            out[vm] = max(ts, out.get(vm, ts))
    return out


def _kinds(rng: random.Random, n: int, good_share: float) -> list[str]:
    """Kinds of ``n`` messages: every kind first when there is room, then weighted draws, shuffled."""
    n_good = round(n * good_share)
    good = _cover(rng, GOOD_KINDS, n_good)
    bad = _cover(rng, BAD_KINDS, n - n_good)
    kinds = good + bad
    rng.shuffle(kinds)
    return kinds


def _cover(rng: random.Random, kinds: tuple[str, ...], k: int) -> list[str]:
    head = list(kinds[:k])
    weights = [_WEIGHT.get(x, 1.0) for x in kinds]
    return head + rng.choices(kinds, weights=weights, k=max(0, k - len(head)))


_LITERAL = re.compile(r'"@@([^@"]*)@@"')


def _lit(text: str) -> str:
    """A JSON number that ``json`` cannot write (``1e999``), spliced in by ``_dumps``."""
    return f"@@{text}@@"


def _dumps(obj: Any) -> bytes:
    return _LITERAL.sub(r"\1", json.dumps(obj)).encode()


class _Gen:
    """The generator's state: one seeded ``random.Random`` drives every choice."""

    def __init__(self, rng: random.Random, now: float, good_vms: list[str]) -> None:
        self.rng, self.now, self.vms = rng, now, good_vms
        self.builders: dict[str, Callable[[], FuzzMessage]] = {
            "good_object": self._good_object, "good_array": self._good_array,
            "good_sparse": self._good_sparse, "good_near_future": self._good_near_future,
            "garbage": self._garbage, "truncated_json": self._truncated, "bad_json": self._bad_json,
            "nan_literal": self._nan_literal, "top_level_scalar": self._scalar, "empty_array": self._empty_array,
            "mixed_array": self._mixed_array, "oversized": self._oversized,
        }

    def message(self, kind: str) -> FuzzMessage:
        if kind in OBJECT_KINDS:
            return self._bad_objects(kind)
        return self.builders[kind]()

    # ------------------------------------------------------------------ good samples
    def _good(self, i: int | None = None, *, ts: float | None = None) -> dict[str, Any]:
        """A realistic sample of VM ``good_vms[i]``; its size and vCPUs are stable per VM."""
        r = self.rng
        i = r.randrange(len(self.vms)) if i is None else i
        total = 4096.0 * 2 ** (i % 5)  # 4-64 GiB
        return {
            "vm": self.vms[i], "host": f"fuzz-host-{i // VMS_PER_HOST}",
            "ts": round(self.now - r.uniform(0.0, 3600.0), 3) if ts is None else ts,
            "cpu_pct": round(r.uniform(0.0, 100.0), 2), "mem_total_mb": total,
            "mem_used_mb": round(total * r.uniform(0.05, 1.0), 1), "dirty_mbps": round(r.uniform(0.0, 500.0), 2),
            "net_rx_kbps": round(r.uniform(0.0, 1e6), 1), "net_tx_kbps": round(r.uniform(0.0, 1e6), 1),
            "disk_read_kbps": round(r.uniform(0.0, 5e5), 1), "disk_write_kbps": round(r.uniform(0.0, 5e5), 1),
            "vcpus": 2 ** (i % 5),
        }

    def _host_key(self, vm: str) -> bytes:
        """The key of every good message carrying ``vm``: its host (even when the sample omits the field)."""
        return f"fuzz-host-{self.vms.index(vm) // VMS_PER_HOST}".encode()

    def _host_batch(self) -> list[dict[str, Any]]:
        """Samples of some of one host's VMs, as its agent would batch them."""
        first = self.rng.randrange(0, len(self.vms), VMS_PER_HOST)
        on_host = list(range(first, min(first + VMS_PER_HOST, len(self.vms))))
        return [self._good(i) for i in self.rng.sample(on_host, self.rng.randint(1, len(on_host)))]

    def _as_good(self, kind: str, objs: list[dict[str, Any]], *, array: bool) -> FuzzMessage:
        """Keyed by host, like an agent that sends both shapes: a VM always lands on one partition."""
        value = _dumps(objs if array else objs[0])
        return FuzzMessage(self._host_key(objs[0]["vm"]), value, kind, False, tuple((o["vm"], o["ts"]) for o in objs))

    def _good_object(self) -> FuzzMessage:
        return self._as_good("good_object", [self._good()], array=False)

    def _good_array(self) -> FuzzMessage:
        return self._as_good("good_array", self._host_batch(), array=True)

    def _good_sparse(self) -> FuzzMessage:
        """Only some fields, others null, unknown fields: all valid."""
        r = self.rng
        obj = self._good()
        for name in r.sample(sorted(set(obj) - {"vm", "ts"}), r.randint(1, 10)):
            if r.random() < 0.5:
                obj[name] = None  # null: not measured
            else:
                del obj[name]
        obj["agent"] = {"version": "1.2.3", "tags": ["a", 1, None], "note": "\x00 ignored"}
        return self._as_good("good_sparse", [obj], array=self.rng.random() < 0.3)

    def _good_near_future(self) -> FuzzMessage:
        obj = self._good(ts=round(self.now + self.rng.uniform(1.0, NEAR_FUTURE_S), 3))
        return self._as_good("good_near_future", [obj], array=False)

    # ------------------------------------------------------------------ bad objects
    def _bad_object(self, kind: str) -> dict[str, Any]:
        """One object that breaks exactly the rule ``kind`` names."""
        r = self.rng
        obj = self._good()
        metric = r.choice(["mem_total_mb", "mem_used_mb", "dirty_mbps", "net_rx_kbps", "net_tx_kbps",
                           "disk_read_kbps", "disk_write_kbps", "vcpus"])
        if kind == "wrong_type":
            name, value = r.choice([
                (metric, str(obj[metric])), (metric, True), ("cpu_pct", False), ("cpu_pct", [1.0]),
                (metric, {"v": 1}), ("ts", str(obj["ts"])), ("ts", True), ("vm", 42), ("vm", ["vm-1"]),
                ("host", 7), ("vm", None),
            ])
            obj[name] = value
        elif kind == "out_of_range":
            name, value = r.choice([("cpu_pct", 150.0), ("cpu_pct", 100.5), ("cpu_pct", -0.1), (metric, -1.0),
                                    (metric, -r.uniform(1, 1e6))])
            obj[name] = value
        elif kind == "huge_value":
            obj[r.choice([metric, "cpu_pct", "ts"])] = r.choice([1e38, 3e38, 1e300, _lit("1e999"), _lit("-1e999")])
        elif kind == "far_future":
            obj["ts"] = r.choice([self.now + 2 * 86400 + r.uniform(0, 1e8), obj["ts"] * 1000.0])  # ms, not s
        elif kind == "far_past":
            obj["ts"] = r.choice([0, round(r.uniform(1.0, 1e8), 3), 946684799.0, -1.0])
        elif kind == "control_id":
            c = r.choice(["\x00", "\x01", "\x1f", "\t", "\n", "\r", "\x1b", "\x7f"])
            name = r.choice(["vm", "vm", "host"])
            at = r.choice([len(obj[name]), 0, r.randrange(len(obj[name]) + 1)])
            obj[name] = obj[name][:at] + c + obj[name][at:]
        elif kind == "long_id":
            name = r.choice(["vm", "host"])
            obj[name] = obj[name] + "-" + "x" * r.randint(256, 2000)  # > 256 characters
        elif kind == "empty_id":
            obj["vm"] = ""
        elif kind == "missing_field":
            for name in r.choice([("vm",), ("ts",), ("vm", "ts")]):
                obj.pop(name)
            if r.random() < 0.2:
                obj = {"unknown": 1}
        elif kind == "mem_over_total":
            obj["mem_used_mb"] = round(obj["mem_total_mb"] * r.uniform(1.05, 100.0), 1)
        else:
            raise ValueError(f"not an object kind: {kind}")
        return obj

    def _bad_objects(self, kind: str) -> FuzzMessage:
        """One bad object alone, or an array of bad objects only."""
        if self.rng.random() < 0.7:
            value = _dumps(self._bad_object(kind))
        else:
            value = _dumps([self._bad_object(kind) for _ in range(self.rng.randint(1, 4))])
        return FuzzMessage(self._bad_key(), value, kind, True)

    def _mixed_array(self) -> FuzzMessage:
        """Good and bad objects (and non-objects) in one array: the good ones are good samples."""
        r = self.rng
        good = self._host_batch()  # one host's VMs: the array is keyed by that host
        bad: list[Any] = [self._bad_object(r.choice(OBJECT_KINDS)) for _ in range(r.randint(1, 3))]
        if r.random() < 0.3:
            bad.append(r.choice([5, "vm-1", None, True, [], [self._good()]]))
        items = [(True, o) for o in good] + [(False, o) for o in bad]
        r.shuffle(items)
        samples = tuple((o["vm"], o["ts"]) for ok, o in items if ok)
        return FuzzMessage(self._host_key(good[0]["vm"]), _dumps([o for _, o in items]), "mixed_array", True, samples)

    # ------------------------------------------------------------------ bad messages
    def _bad_key(self) -> bytes | None:
        r = self.rng
        return r.choice([None, b"", r.choice(self.vms).encode(), r.randbytes(r.randint(1, 16))])

    def _bad(self, kind: str, value: bytes) -> FuzzMessage:
        return FuzzMessage(self._bad_key(), value, kind, True)

    def _garbage(self) -> FuzzMessage:
        """Random bytes (a first byte no JSON text starts with), or invalid UTF-8 inside an id."""
        r = self.rng
        if r.random() < 0.7:
            first = r.choice([*range(0x80, 0x100), *b"\x00\x01#<)@}'xyz"])
            return self._bad("garbage", bytes([first]) + r.randbytes(r.randint(0, 300)))
        obj = self._good()
        name = r.choice(["vm", "host"])
        invalid = obj[name].encode() + r.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80abc"])
        raw = json.dumps({**obj, name: "%UTF8%"}).encode().replace(b'"%UTF8%"', b'"' + invalid + b'"')
        return self._bad("garbage", raw)

    def _truncated(self) -> FuzzMessage:
        """A good object or array cut short: no strict prefix of either is valid JSON."""
        whole = _dumps(self._host_batch() if self.rng.random() < 0.5 else self._good())
        return self._bad("truncated_json", whole[: self.rng.randrange(len(whole))])

    def _bad_json(self) -> FuzzMessage:
        obj = _dumps(self._good()).decode()
        value = self.rng.choice([
            obj.replace('"', "'"),  # single quotes
            obj[:-1] + ",}",  # trailing comma
            obj.replace('"vm"', "vm", 1),  # unquoted key
            obj.replace('": ', '" ', 1),  # missing colon
            obj + obj,  # two documents
            "// agent v1\n" + obj,  # a comment
            obj + " trailing",
            "[" + obj + ",]",
            obj.replace(", ", " ", 1),  # missing comma
        ])
        return self._bad("bad_json", value.encode())

    def _nan_literal(self) -> FuzzMessage:
        obj = self._good()
        obj[self.rng.choice(["cpu_pct", "mem_used_mb", "dirty_mbps", "ts", "net_rx_kbps"])] = self.rng.choice(
            [float("nan"), float("inf"), float("-inf")])  # json writes NaN, Infinity, -Infinity
        value = _dumps(obj) if self.rng.random() < 0.6 else _dumps([self._good(), obj])
        return self._bad("nan_literal", value)

    def _scalar(self) -> FuzzMessage:
        in_a_string = json.dumps(self._good())  # a double-encoded sample
        doc = self.rng.choice([42, -1.5, 0, "vm-1", "", True, False, None, in_a_string])
        return self._bad("top_level_scalar", _dumps(doc))

    def _empty_array(self) -> FuzzMessage:
        return self._bad("empty_array", self.rng.choice([b"[]", b" [ ] ", b"[\n]", b"\t[]\r\n"]))

    def _oversized(self) -> FuzzMessage:
        """Above the 1 MiB limit: a padded object, or an agent batching far too much."""
        r = self.rng
        obj = self._good()
        if r.random() < 0.5:
            obj["pad"] = "x" * (MAX_BYTES + r.randint(1, 4096))
            return self._bad("oversized", _dumps(obj))
        one = _dumps(obj)
        return self._bad("oversized", b"[" + b",".join([one] * (MAX_BYTES // len(one) + 1)) + b"]")

"""Observed migrations (``vm.migrations``) -> a learned correction of predicted downtime.

The pre-copy model is physics with guessed inputs (a dirty-rate proxy, a link
share): it is biased per fleet and per host. Whoever drives migrations reports
each outcome on ``vm.migrations``; comparing the observed pause with the
downtime zhuge predicted for that VM gives a multiplicative error, and its
exponentially weighted mean in log space (globally and per source host) is the
factor the scorer multiplies predicted downtime by.

Message contract (value: one JSON object or a JSON array of objects; key = VM id):
``vm`` (str, required), ``start`` and ``end`` (epoch s, required, end >= start),
``downtime_ms`` (observed pause, required, >= 0), ``bytes`` (transferred, >= 0),
``rounds`` (pre-copy rounds, int >= 0), ``host_from`` / ``host_to`` (str),
``link_mbps`` (> 0); optionally, from an executor that knows what zhuge predicted:
``total_ms`` (whole migration, >= 0), ``converged`` (bool; false = aborted or forced by
the management layer's policy), ``predicted_downtime_ms`` / ``predicted_total_ms`` (>= 0,
the score in force at ``start``), ``predicted_factor`` (> 0, <= 1000, that score's
``downtime_factor``), ``predicted_at`` (epoch s, that score's ``updated``),
``model`` (str, that score's model), ``downtime_limit_ms`` (> 0), ``policy`` (str <= 64).
Strings without control characters, numbers at most the physical bounds of
``streams.schema.Limits`` (``max_downtime_ms`` bounds every ms field ...), ``end`` and
``predicted_at`` at most ``Limits.max_future_s`` ahead. Unknown fields are ignored, ``null`` counts as missing;
anything invalid becomes a ``streams.schema.Rejected`` for the DLQ, with the
same reason format as ``vm.metrics`` (``[2].downtime_ms: must be >= 0``).

The shared state is one small JSON document in Redis (``<prefix>correction``),
updated with an optimistic transaction (WATCH/MULTI) so every worker's batches
add up, and reloaded periodically by every worker; no pickle.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Any

import msgspec
import numpy as np
from msgspec import Meta

from streams.redis_keys import CORRECTION, RedisKeys
from streams.schema import CONTROL_REASON, Limits, ObjectDecoder, Rejected, bound_text, has_control

log = logging.getLogger(__name__)

CORRECTION_KEY = CORRECTION  # Redis key: <prefix>correction (``RedisKeys.correction``, the same in both layouts)
STATE_VERSION = 1
_Str = Annotated[str, Meta(max_length=256)]
_NonNeg = Annotated[float, Meta(ge=0)]
_LOG_NAMED = 5  # not-converged VMs named per log line


class Migration(msgspec.Struct):
    """One observed live migration."""

    vm: Annotated[str, Meta(min_length=1, max_length=256)]
    start: float
    end: float
    downtime_ms: _NonNeg
    transferred_bytes: _NonNeg | None = msgspec.field(default=None, name="bytes")
    # <= 2**53: converts exactly to the float64 column (a 400-digit int raised OverflowError there)
    rounds: Annotated[int, Meta(ge=0, le=1 << 53)] | None = None
    host_from: _Str | None = None
    host_to: _Str | None = None
    link_mbps: Annotated[float, Meta(gt=0)] | None = None
    # reported by an executor that knows the score in force when the migration started
    total_ms: _NonNeg | None = None
    converged: bool | None = None  # False: aborted / forced by policy, the pause is not the model's
    predicted_downtime_ms: _NonNeg | None = None  # that score's now_downtime_ms
    predicted_total_ms: _NonNeg | None = None
    predicted_factor: Annotated[float, Meta(gt=0, le=1000)] | None = None  # that score's downtime_factor
    predicted_at: float | None = None  # that score's ``updated``
    model: _Str | None = None  # that score's model version
    downtime_limit_ms: Annotated[float, Meta(gt=0)] | None = None
    policy: Annotated[str, Meta(max_length=64)] | None = None  # e.g. "abort", "ramp", "force"


@dataclass
class MigrationBatch:
    """Good migrations of a batch, columnar; absent numbers are NaN, absent strings ""."""

    vm: list[str]
    host_from: list[str]
    host_to: list[str]
    model: list[str]
    policy: list[str]
    start: np.ndarray  # float64 (n,)
    end: np.ndarray
    downtime_ms: np.ndarray
    transferred_bytes: np.ndarray
    rounds: np.ndarray  # float64 so that "absent" can be NaN
    link_mbps: np.ndarray
    total_ms: np.ndarray
    converged: np.ndarray  # float64: 1 converged, 0 did not, NaN not reported (treated as converged)
    predicted_downtime_ms: np.ndarray
    predicted_total_ms: np.ndarray
    predicted_factor: np.ndarray
    predicted_at: np.ndarray
    downtime_limit_ms: np.ndarray
    rejected: list[Rejected] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.vm)


_migrations = ObjectDecoder(Migration)
_NUM = ("start", "end", "downtime_ms", "transferred_bytes", "rounds", "link_mbps", "total_ms", "converged",
        "predicted_downtime_ms", "predicted_total_ms", "predicted_factor", "predicted_at", "downtime_limit_ms")
_STR = ("vm", "host_from", "host_to", "model", "policy")
# column, its name in the message, the Limits field bounding it (every duration in ms: max_downtime_ms, one day)
_UPPER = (("downtime_ms", "downtime_ms", "max_downtime_ms"), ("transferred_bytes", "bytes", "max_transferred_bytes"),
          ("rounds", "rounds", "max_rounds"), ("link_mbps", "link_mbps", "max_link_mbps"),
          *((ms, ms, "max_downtime_ms") for ms in ("total_ms", "predicted_downtime_ms", "predicted_total_ms",
                                                   "downtime_limit_ms")))


def decode_migrations(
    raws: Sequence[Any],
    keys: Sequence[bytes | None] | None = None,
    *,
    now: float | None = None,
    limits: Limits = Limits(),
) -> MigrationBatch:
    """Decode ``vm.migrations`` values into columns plus rejections; never raises.

    Same rules as ``streams.schema.decode_messages``: an array keeps its good
    objects and yields one ``Rejected`` (whole original bytes) naming the bad
    indices; ``start``/``end`` and ``predicted_at`` (when given) must lie in
    ``[limits.min_ts, now + limits.max_future_s]``,
    strings must not contain control characters, numbers must not exceed the
    ``limits.max_*`` bounds.
    """
    now = time.time() if now is None else now
    got = _migrations.decode(raws, limits)
    batch = _columns(got.items)
    _check_ranges(batch, np.asarray(got.src, np.int64), np.asarray(got.pos, np.int64), got.reasons, now, limits)
    batch.rejected = got.rejected(raws, keys)
    return batch


def _columns(got: list[Migration]) -> MigrationBatch:
    rows = np.array([[getattr(m, f) for f in _NUM] for m in got], dtype=np.float64).reshape(len(got), len(_NUM))
    c = {f: np.ascontiguousarray(rows[:, j]) for j, f in enumerate(_NUM)}
    return MigrationBatch(
        vm=[m.vm for m in got],
        host_from=[m.host_from or "" for m in got],
        host_to=[m.host_to or "" for m in got],
        model=[m.model or "" for m in got],
        policy=[m.policy or "" for m in got],
        **c,
    )


def _check_ranges(b: MigrationBatch, src: np.ndarray, pos: np.ndarray, reasons: dict[int, list[str]],
                  now: float, limits: Limits) -> None:
    """Vectorised checks the field types cannot express; drops failing migrations."""
    control = np.column_stack([has_control(getattr(b, name)) for name in _STR]).reshape(len(b), len(_STR))
    bad_old = b.start < limits.min_ts
    bad_future = b.end > now + limits.max_future_s
    bad_order = b.end < b.start
    with np.errstate(invalid="ignore"):  # NaN (absent) compares False
        bad_at_old = b.predicted_at < limits.min_ts
        bad_at_future = b.predicted_at > now + limits.max_future_s
    upper = np.array([getattr(limits, lim) for _, _, lim in _UPPER], dtype=np.float64)
    values = np.column_stack([getattr(b, col) for col, _, _ in _UPPER]).reshape(len(b), len(_UPPER))
    with np.errstate(invalid="ignore"):
        too_high = values > upper  # NaN (absent) compares False
    bad = control.any(axis=1) | bad_old | bad_future | bad_order | bad_at_old | bad_at_future | too_high.any(axis=1)
    if not bad.any():
        return
    for k in np.flatnonzero(bad):  # failing migrations only
        where = "" if pos[k] < 0 else f"[{pos[k]}]."
        if control[k].any():
            why = f"{where}{_STR[int(np.flatnonzero(control[k])[0])]}: {CONTROL_REASON}"
        elif bad_old[k]:
            why = f"{where}start: {b.start[k]:.0f} is before {limits.min_ts:.0f}"
        elif bad_future[k]:
            why = f"{where}end: {b.end[k]:.0f} is more than {limits.max_future_s:.0f} s in the future"
        elif bad_order[k]:
            why = f"{where}end: {b.end[k]:.3f} is before start {b.start[k]:.3f}"
        elif bad_at_old[k]:
            why = f"{where}predicted_at: {b.predicted_at[k]:.0f} is before {limits.min_ts:.0f}"
        elif bad_at_future[k]:
            why = f"{where}predicted_at: {b.predicted_at[k]:.0f} is more than {limits.max_future_s:.0f} s in the future"
        else:
            j = int(np.flatnonzero(too_high[k])[0])
            why = f"{where}{_UPPER[j][1]}: must be <= {bound_text(upper[j])}"
        reasons.setdefault(int(src[k]), []).append(why)
    keep = np.flatnonzero(~bad)
    for name in _STR:
        col = getattr(b, name)
        setattr(b, name, [col[k] for k in keep])
    for name in _NUM:
        setattr(b, name, getattr(b, name)[keep])


# ---------------------------------------------------------------------------- correction
@dataclass(frozen=True)
class _State:
    """Immutable snapshot: (mean log-ratio, decayed weight, count) globally and per host.

    Replaced wholesale on every update/load, so the scorer thread always reads a
    consistent snapshot without a lock.
    """

    glob: tuple[float, float, int] = (0.0, 0.0, 0)
    hosts: Mapping[str, tuple[float, float, int]] = field(default_factory=lambda: MappingProxyType({}))


class DowntimeCorrection:
    """Online multiplicative correction of predicted downtime, learned from observed migrations.

    Each observation contributes ``x = log(observed / predicted)`` (predicted =
    the uncorrected model output), clipped to ``[log lo, log hi]`` so that one
    failed migration cannot swing the factor further than the clip. The state is
    an exponentially weighted mean of ``x`` with bias correction (weights decay by
    ``1 - alpha`` per later observation, mean = weighted sum / weight sum): the
    first observations average exactly, later ones forget with an effective
    memory of ``1 / alpha`` observations. Kept globally and per source host; a
    host with fewer than ``min_obs`` observations uses the global factor, and
    the global one is 1 until it has ``min_obs`` itself.

    ``redis_lost``: asks whether Redis lost its data since this worker last checked
    (``RedisSink.lost_since_last_check``). With it, a shared state found absent
    while Redis lost everything (a restart without persistence, a failover to an
    empty replica, FLUSHDB) is written back from this worker's copy instead of
    being taken as an operator's reset (``DEL <prefix>correction``).
    """

    def __init__(self, *, alpha: float = 0.05, min_obs: int = 10, lo: float = 0.2, hi: float = 5.0,
                 redis_lost: Callable[[], Awaitable[bool]] | None = None) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"need 0 < lo <= 1 <= hi, got lo={lo}, hi={hi}")
        self.alpha, self.min_obs = float(alpha), int(min_obs)
        self.lo, self.hi = float(lo), float(hi)
        self._log_lo, self._log_hi = math.log(lo), math.log(hi)
        self._state = _State()
        self._redis_lost = redis_lost
        # used (of which message_prediction) / no_score / stale / not_converged / rejected, for logs and tests
        self.counts: Counter[str] = Counter()

    # ------------------------------------------------------------------ reading
    @property
    def observations(self) -> int:
        return self._state.glob[2]

    def global_factor(self) -> float:
        mean, _, n = self._state.glob
        return math.exp(min(max(mean, self._log_lo), self._log_hi)) if n >= self.min_obs else 1.0

    def factor(self, hosts: Sequence[str]) -> np.ndarray:
        """Correction factor per VM (float64 ``(len(hosts),)``) from each VM's host; 1 with no data."""
        st = self._state  # one snapshot for the whole call
        if len(hosts) == 0:
            return np.ones(0)
        g = math.log(self.global_factor())
        uniq, inv = np.unique(np.asarray(hosts, dtype=str), return_inverse=True)
        table = np.array([_host_log(st.hosts.get(h), g, self.min_obs) for h in uniq.tolist()])
        return np.exp(np.clip(table, self._log_lo, self._log_hi))[inv.reshape(-1)]

    # ------------------------------------------------------------------ learning
    def update(self, hosts: Sequence[str], observed_ms: Any, predicted_ms: Any, *, applied: Any = None) -> int:
        """Learn from a batch of observations (in order); returns how many were usable.

        ``predicted_ms``: the downtime zhuge predicted for each migration. When
        it already includes a correction (the Redis score of a corrected
        scorer), pass that factor as ``applied`` so the model learns the error
        of the uncorrected model. Rows with a non-finite or non-positive
        prediction, or a non-finite observation, are skipped.
        """
        self._state, used = self._updated(self._state, hosts, observed_ms, predicted_ms, applied)
        return used

    def _updated(self, st: _State, hosts: Sequence[str], observed_ms: Any, predicted_ms: Any,
                 applied: Any) -> tuple[_State, int]:
        obs = np.asarray(observed_ms, dtype=np.float64).reshape(-1)
        pred = np.asarray(predicted_ms, dtype=np.float64).reshape(-1)
        app = np.ones_like(pred) if applied is None else np.asarray(applied, dtype=np.float64).reshape(-1)
        if not (len(hosts) == obs.size == pred.size == app.size):
            raise ValueError(f"update: lengths differ: hosts {len(hosts)}, observed {obs.size}, "
                             f"predicted {pred.size}, applied {app.size}")
        ok = np.isfinite(obs) & (obs >= 0) & np.isfinite(pred) & (pred > 0) & np.isfinite(app) & (app > 0)
        if not ok.any():
            return st, 0
        with np.errstate(divide="ignore"):
            x = np.log(obs[ok]) - np.log(pred[ok]) + np.log(app[ok])
        x = np.clip(x, self._log_lo, self._log_hi)  # -inf (observed 0) -> log lo
        decay = 1.0 - self.alpha
        (glob,) = _fold([st.glob], np.zeros(x.size, np.int64), x, decay)
        h = np.asarray(hosts, dtype=str).reshape(-1)[ok]
        known = h != ""
        new_hosts = dict(st.hosts)
        if known.any():
            uniq, inv = np.unique(h[known], return_inverse=True)
            names = uniq.tolist()
            folded = _fold([st.hosts.get(n, (0.0, 0.0, 0)) for n in names], inv.reshape(-1), x[known], decay)
            new_hosts.update(zip(names, folded, strict=True))
        return _State(glob, MappingProxyType(new_hosts)), int(x.size)

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> str:
        """The state as a small JSON document: ``{"version", "global": [mean, weight, n], "hosts": {...}}``."""
        return _dump(self._state)

    def load_json(self, text: str | bytes) -> None:
        """Replace the state with a ``to_json`` document; ValueError (state kept) when invalid."""
        self._state = _parse_state(text)

    @classmethod
    def from_json(cls, text: str | bytes, **config: Any) -> DowntimeCorrection:
        c = cls(**config)
        c.load_json(text)
        return c

    async def load(self, client: Any, prefix: str) -> bool:
        """Replace the state with the shared one in Redis (the source of truth).

        An absent key means nothing learned yet, or an operator deleted it to
        start over: the state is reset and False returned, unless Redis lost
        everything (``redis_lost``), when this state is written back and kept
        (True). An invalid document is logged and ignored (state kept, False).
        """
        raw = await client.get(prefix + CORRECTION_KEY)
        if raw is None and await self._lost_with_redis():
            if await self.restore(client, prefix):
                return True
            raw = await client.get(prefix + CORRECTION_KEY)  # another worker wrote its copy back first
        if raw is None:
            self._state = _State()
            return False
        try:
            self.load_json(raw)
        except ValueError as exc:
            log.warning("ignoring invalid %s%s in Redis: %s", prefix, CORRECTION_KEY, exc)
            return False
        return True

    async def restore(self, client: Any, prefix: str) -> bool:
        """Write this state to Redis where the key is absent (SET NX); True when written.

        After Redis came back empty: every worker holds the same shared state (they
        reload it), the first to write wins, the others then load it.
        """
        if self.observations == 0:
            return False
        written = bool(await client.set(prefix + CORRECTION_KEY, self.to_json(), nx=True))
        if written:
            log.warning("%s%s was lost with the rest of Redis: wrote this worker's copy back (%d observations)",
                        prefix, CORRECTION_KEY, self.observations)
        return written

    async def _lost_with_redis(self) -> bool:
        """An absent shared state went with everything else in Redis (and this worker holds one)."""
        return self.observations > 0 and self._redis_lost is not None and await self._redis_lost()

    async def save(self, client: Any, prefix: str) -> None:
        """Overwrite the shared state with this one (``update_shared`` merges instead)."""
        await client.set(prefix + CORRECTION_KEY, self.to_json())

    async def update_shared(self, client: Any, prefix: str, hosts: Sequence[str], observed_ms: Any,
                            predicted_ms: Any, *, applied: Any = None, attempts: int = 20) -> int:
        """``update`` applied to the state in Redis atomically (WATCH/MULTI, retried on conflict).

        Workers each see only their share of ``vm.migrations`` (one consumer
        group); folding every batch into the one shared document means no
        worker's observations are lost to another's overwrite.
        """
        from redis.exceptions import WatchError

        key = prefix + CORRECTION_KEY
        async with client.pipeline(transaction=True) as pipe:
            for _ in range(attempts):
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    base = _State()  # absent: nothing learned yet (or deleted to start over)
                    if raw is None and await self._lost_with_redis():
                        base = self._state  # ... or lost with the rest of Redis: go on from this copy
                    elif raw is not None:
                        try:
                            base = _parse_state(raw)
                        except ValueError as exc:
                            log.warning("replacing invalid %s in Redis: %s", key, exc)
                    new, used = self._updated(base, hosts, observed_ms, predicted_ms, applied)
                    pipe.multi()
                    pipe.set(key, _dump(new))
                    await pipe.execute()
                    self._state = new
                    return used
                except WatchError:
                    continue
        raise RuntimeError(f"{key}: gave up after {attempts} conflicting concurrent updates")


def _host_log(entry: tuple[float, float, int] | None, fallback: float, min_obs: int) -> float:
    return entry[0] if entry is not None and entry[2] >= min_obs else fallback


def _fold(states: list[tuple[float, float, int]], group: np.ndarray, x: np.ndarray,
          decay: float) -> list[tuple[float, float, int]]:
    """Fold observations ``x`` (in order) into per-group EW states, vectorised.

    With S = weighted sum and W = weight sum, m new observations of a group give
    ``S' = decay**m * S + sum_i decay**(later_i) * x_i`` (``later_i``: how many of
    the group's observations come after i in this batch), same for W; mean = S'/W'.
    """
    G = len(states)
    counts = np.bincount(group, minlength=G)
    order = np.argsort(group, kind="stable")
    starts = np.cumsum(counts) - counts
    rank = np.empty_like(group)
    rank[order] = np.arange(group.size) - starts[group[order]]
    later = counts[group] - 1 - rank
    w = decay**later
    old = np.asarray(states, dtype=np.float64).reshape(G, 3)
    keep = decay**counts
    W = keep * old[:, 1] + np.bincount(group, weights=w, minlength=G)
    S = keep * old[:, 0] * old[:, 1] + np.bincount(group, weights=w * x, minlength=G)
    mean = np.where(W > 0, S / np.where(W > 0, W, 1), 0.0)
    n = old[:, 2].astype(np.int64) + counts
    return [(float(m), float(ww), int(c)) for m, ww, c in zip(mean, W, n, strict=True)]


def _dump(st: _State) -> str:
    doc = {"version": STATE_VERSION, "global": list(st.glob), "hosts": {h: list(v) for h, v in st.hosts.items()}}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def _parse_state(text: str | bytes) -> _State:
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"correction state is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
        raise ValueError(f"correction state: expected an object with version {STATE_VERSION}")

    def entry(v: Any, where: str) -> tuple[float, float, int]:
        ok = isinstance(v, list) and len(v) == 3 and all(isinstance(a, (int, float)) for a in v)
        if not ok or not all(math.isfinite(a) for a in v) or v[1] < 0 or v[2] < 0:
            raise ValueError(f"correction state: {where} must be [mean, weight >= 0, count >= 0], got {v!r}")
        return float(v[0]), float(v[1]), int(v[2])

    hosts = doc.get("hosts", {})
    if not isinstance(hosts, dict):
        raise ValueError("correction state: hosts must be an object")
    return _State(entry(doc.get("global"), "global"),
                  MappingProxyType({str(h): entry(v, f"hosts.{h}") for h, v in hosts.items()}))


# ---------------------------------------------------------------------------- the worker's step
async def handle_migrations(
    raws: Sequence[Any],
    keys: Sequence[bytes | None] | None,
    *,
    correction: DowntimeCorrection,
    redis_client: Any,
    prefix: str,
    now: float | None = None,
    scores_corrected: bool = True,
    max_score_age_s: float | None = 3600.0,
    limits: Limits = Limits(),
) -> list[Rejected]:
    """Decode a batch of ``vm.migrations`` messages and fold them into the shared correction.

    Which prediction each observation is compared with:

    - a message with ``predicted_downtime_ms`` carries it (the score in force
      when the migration started, as the executor saw it): used as is, with no
      Redis read and no staleness check; its host is ``host_from`` only (the
      VM's current score may already be the destination's), "" = fleet factor only;
    - otherwise the VM's ``now_downtime_ms`` and ``downtime_factor`` from
      ``<prefix>vm:<vm>`` (one pipelined read for those VMs), which may have been recomputed since:
      its ``host`` is used when the message has no ``host_from``, and a score
      that cannot be the one in force when the migration ran is skipped
      (``counts["stale"]``): computed from samples newer than ``end`` (already
      the destination), or older than ``max_score_age_s`` before ``start``
      (None: no check). VMs without a usable score (none, or 0) are skipped
      (``counts["no_score"]``), and so is a message prediction of 0.

    ``converged`` false: the pause was the policy's (abort, forced switch-over),
    not the model's downtime, so it is not learned from; counted
    (``counts["not_converged"]``) and logged.

    ``scores_corrected``: the predictions were made by a scorer that applies
    this correction, so the factor each one was made with is divided out: the
    score's ``downtime_factor`` (the message's ``predicted_factor``). Why not
    the factor at handling time: a drain reports a burst of migrations against
    scores made before any of them; once the first batch of the burst moves the
    factor (from 1 to 3 where ``min_obs`` is reached), dividing the rest by 3
    learned 9 (a CI run read 4.35 for 3). Only a score or message without the
    field (written before it existed) falls back to the factor at handling time.
    Returns the rejections for the DLQ.
    """
    batch = decode_migrations(raws, keys, now=now, limits=limits)
    correction.counts["rejected"] += len(batch.rejected)
    if len(batch) == 0:
        return batch.rejected
    aborted = batch.converged == 0  # NaN (not reported) compares False: today's behaviour
    own = ~aborted & np.isfinite(batch.predicted_downtime_ms)
    need = ~aborted & ~own
    pred, score_host, last_ts, made_with = await _scores(redis_client, prefix, batch.vm, need)
    pred = np.where(own, batch.predicted_downtime_ms, pred)
    made_with = np.where(own, batch.predicted_factor, made_with)
    hosts = [hf or sh for hf, sh in zip(batch.host_from, score_host, strict=True)]  # sh is "" unless read
    has_pred = np.isfinite(pred) & (pred > 0)
    fresh = np.ones(len(batch), bool)
    if max_score_age_s is not None:
        fresh = ~need | ~np.isfinite(last_ts) | ((last_ts <= batch.end) & (last_ts >= batch.start - max_score_age_s))
    use = ~aborted & has_pred & fresh
    no_score, stale = int((~aborted & ~has_pred).sum()), int((~aborted & has_pred & ~fresh).sum())
    correction.counts["no_score"] += no_score
    correction.counts["stale"] += stale
    correction.counts["not_converged"] += int(aborted.sum())
    if use.any():
        idx = np.flatnonzero(use)
        h = [hosts[i] for i in idx]
        applied = None
        if scores_corrected:
            known = made_with[idx]
            applied = np.where(np.isfinite(known) & (known > 0), known, correction.factor(h))
        used = await correction.update_shared(redis_client, prefix, h, batch.downtime_ms[idx], pred[idx],
                                              applied=applied)
        correction.counts["used"] += used
        correction.counts["message_prediction"] += int(own[idx].sum())
    if aborted.any():
        named = np.flatnonzero(aborted)[:_LOG_NAMED]
        log.info("vm.migrations: %d did not converge, not learned from: %s%s", int(aborted.sum()),
                 ", ".join(f"{batch.vm[i]} (policy {batch.policy[i] or '?'})" for i in named),
                 " ..." if aborted.sum() > _LOG_NAMED else "")
    log.info(
        "vm.migrations: %d observed, %d used (%d with their own prediction), %d without score, %d stale, "
        "%d not converged, %d rejected; global factor %.3f",
        len(batch), int(use.sum()), int((use & own).sum()), no_score, stale, int(aborted.sum()),
        len(batch.rejected), correction.global_factor(),
    )
    return batch.rejected


async def _scores(client: Any, prefix: str, vms: list[str],
                  need: np.ndarray) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """``now_downtime_ms``, ``host``, ``last_ts``, ``downtime_factor`` of the rows in ``need``: one
    pipelined read of their VMs.

    Other rows (and absent numbers) get NaN / "": a batch whose messages all
    carry their own prediction costs no round trip.
    """
    n = len(vms)
    pred, last_ts, factor, host = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan), [""] * n
    rows = np.flatnonzero(need).tolist()
    if not rows:
        return pred, host, last_ts, factor
    uniq = sorted({vms[i] for i in rows})
    keys = RedisKeys.for_client(client, prefix)
    async with client.pipeline(transaction=False) as pipe:
        for vm in uniq:
            pipe.hmget(keys.vm(vm), "now_downtime_ms", "host", "last_ts", "downtime_factor")
        got = await pipe.execute()
    score = {vm: (_num(r[0]), "" if r[1] is None else _text(r[1]), _num(r[2]), _num(r[3]))
             for vm, r in zip(uniq, got, strict=True)}  # fmt: skip
    pred[rows] = [score[vms[i]][0] for i in rows]
    last_ts[rows] = [score[vms[i]][2] for i in rows]
    factor[rows] = [score[vms[i]][3] for i in rows]
    for i in rows:
        host[i] = score[vms[i]][1]
    return pred, host, last_ts, factor


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)

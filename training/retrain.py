"""One retrain run on Dask: history -> grids -> examples (on workers) -> xgboost.dask -> gate -> publish.

The cluster: ``--scheduler ADDRESS`` (an existing one), else ``LocalCUDACluster``
when a GPU is present (``dask_cuda`` imported only then), else a ``LocalCluster``
of processes. Grids and examples are built on the workers, one task per VM group;
the booster is trained with ``xgboost.dask`` through ``training.fit.fit_forecaster``.

Blend (``training.blend``, chosen by the same code as ``zhuge evaluate``'s,
``training.validated.choose_blend``): the last part of the history before the held-out day
is cut into validation folds; for each, boosters fitted before it forecast it, and on all
folds together the combination with the naive forecasts is chosen per target and horizon.
The boosters are then refitted on everything before the held-out day and served with that
blend (a history too short for the folds: boosters alone, logged).

Gate: the most recent day is held out; the challenger is fitted on labels before it.
On forecasts made inside that day it is measured with the workers' live-accuracy
measure (``gpu_kernels.accuracy``: MAE of the median per target and horizon bucket,
against the champion at ``LATEST`` and the naive baselines ``last`` and ``seasonal``,
all on the same pairs), summed up as the mean over (target, bucket) of
MAE / persistence MAE (scale-free; the ratio the ``ZhugeModelWorseThanPersistence``
alert watches live). It is published when that is not worse than the champion's (or
the store is empty, or the champion cannot be loaded/used); every bucket where it is
worse than the best naive baseline is reported (``worse_than_naive``, logged). The
pinball loss (mean over targets and quantiles, / mean |y|) is reported as well; it
decides nothing. Workers are then told through ``app.model_watch``.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training.dataset import CHANNELS, Panel, SlotGrid, panel_examples, panel_from_grids, sample_origins
from training.fit import TrainingKnobs
from training.validated import SE_SCALES, choose_blend, iso_utc, validation_plan

log = logging.getLogger(__name__)
Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class RetrainConfig(TrainingKnobs):
    n_workers: int = 2
    scheduler: str | None = None
    origin_every: int = 6
    max_rows: int = 200_000
    holdout_slots: int = 288
    vm_groups: int = 8


@dataclass
class RetrainResult:
    published: bool
    version: str | None
    reason: str
    challenger_loss: float  # held-out pinball loss (reported, not the gate)
    champion_loss: float | None
    champion: str | None
    timings: dict[str, float] = field(default_factory=dict)
    rows: int = 0
    n_vms: int = 0
    challenger_score: float = float("nan")  # the gate: mean over (target, bucket) of MAE / persistence MAE
    champion_score: float | None = None
    mae: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # target -> bucket -> method -> MAE
    worse_than_naive: list[str] = field(default_factory=list)  # challenger's buckets behind the best naive baseline
    held_out_pairs: int = 0  # cpu_pct (forecast, sample) pairs the gate compared on, all buckets
    held_out_observed: float = float("nan")  # share of the held-out day's VM-slots holding a sample
    held_out_gap_slots: int = 0  # slots without any sample the held-out part reached back across


def open_client(cfg: RetrainConfig, device: str = "auto") -> tuple[Any, Any]:
    """``(client, cluster)``; cluster is None for an external scheduler."""
    from distributed import Client

    if cfg.scheduler:
        return Client(cfg.scheduler), None
    from gpu_kernels.xp import resolve_device

    if resolve_device(device) == "gpu":
        from dask_cuda import LocalCUDACluster

        cluster = LocalCUDACluster()
    else:
        from distributed import LocalCluster

        cluster = LocalCluster(n_workers=cfg.n_workers, threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster), cluster


# --- sources ------------------------------------------------------------------------


def _trace_group(fmt: str, path: str, spec: str | None, slot_s: int) -> list[SlotGrid]:
    from training.dataset import grids_from_trace

    return grids_from_trace(fmt, path, spec, slot_s)


def load_grids(
    client: Any, slot_s: int, *, history: str | None = None, fmt: str | None = None, path: str | None = None,
    vms: str | None = None, groups: int = 8,
) -> list[SlotGrid]:  # fmt: skip
    """Slot grids built on the workers, from the Parquet archive or a trace directory."""
    if history is not None:
        from training.dataset import grid_tasks_from_history

        tasks = grid_tasks_from_history(history, slot_s, groups)
        parts = client.gather(client.compute(tasks))
    else:
        if fmt is None or path is None:
            raise ValueError("give a history URL or both a trace format and path")
        specs: list[str | None] = [vms]
        if fmt == "bitbrains" and vms is None:  # one file per VM: split the files into groups
            from pathlib import Path

            from sim.traces import bitbrains_files

            nums = [n for n, _ in bitbrains_files(Path(path))]
            specs = [",".join(map(str, g)) for g in np.array_split(np.asarray(nums), max(1, groups)) if len(g)]
        futs = client.map(_trace_group, [fmt] * len(specs), [path] * len(specs), specs, [slot_s] * len(specs), pure=False)
        parts = client.gather(futs)
    grids = [g for part in parts for g in part]
    if not grids:
        raise ValueError("no VM with usable samples in the source")
    return sorted(grids, key=lambda g: g.vm)


def _examples(panel: Panel, origins: np.ndarray, horizons: np.ndarray, S: int, slot_s: int, end: int,
              max_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    X, Y = panel_examples(panel, origins, horizons, S, slot_s, end=end)
    if X.shape[0] > max_rows:
        keep = np.sort(np.random.default_rng(seed).choice(X.shape[0], max_rows, replace=False))
        X, Y = X[keep], Y[keep]
    return X, Y


def distributed_examples(client: Any, panel: Panel, settings: Any, cfg: RetrainConfig, end: int) -> tuple[Any, Any, int]:
    """Training (X, Y) as Dask arrays whose blocks were built on the workers (one per VM group)."""
    import dask
    import dask.array as da

    from gpu_kernels.features import FEATURE_NAMES, TARGETS
    from training.model import default_horizons

    S, slot_s = settings.window_slots, settings.slot_s
    horizons = default_horizons(settings.horizon_slots)
    origins = sample_origins(end, S // 2, end - 1, cfg.origin_every, np.random.default_rng(cfg.seed))
    groups = [g for g in np.array_split(np.arange(len(panel.vms)), max(1, cfg.vm_groups)) if len(g)]
    per = max(1, cfg.max_rows // len(groups))
    futs = [
        client.submit(_examples, client.scatter(panel.subset(g)), origins, horizons, S, slot_s, end, per, cfg.seed + i,
                      pure=False)  # fmt: skip
        for i, g in enumerate(groups)
    ]
    sizes = client.gather([client.submit(lambda r: r[0].shape[0], f, pure=False) for f in futs])
    xs = [da.from_delayed(dask.delayed(operator.getitem)(f, 0), (n, len(FEATURE_NAMES)), np.float32) for f, n in zip(futs, sizes) if n]
    ys = [da.from_delayed(dask.delayed(operator.getitem)(f, 1), (n, len(TARGETS)), np.float32) for f, n in zip(futs, sizes) if n]
    if not xs:
        raise ValueError("no training example: the history is shorter than one window plus the held-out day")
    # persisted: the fit then starts from plain in-memory blocks (no alias keys re-submitted per target)
    X, Y = client.persist([da.concatenate(xs), da.concatenate(ys)])
    return X, Y, int(sum(sizes))


# --- gate ---------------------------------------------------------------------------


def holdout_loss(model: Any, X: np.ndarray, Y: np.ndarray) -> float:
    """Mean over targets and quantiles of pinball loss / mean |y| (scale-free, lower is better)."""
    pred = np.asarray(model.predict(X), dtype=np.float64)  # (n, T, Q)
    losses = []
    for j in range(Y.shape[1]):
        y = Y[:, j].astype(np.float64)
        ok = np.isfinite(y)
        if not ok.any():
            continue
        norm = max(float(np.mean(np.abs(y[ok]))), 1e-6)
        for k, q in enumerate(model.quantiles):
            d = y[ok] - pred[ok, j, k]
            losses.append(float(np.mean(np.maximum(q * d, (q - 1) * d))) / norm)
    return float(np.mean(losses)) if losses else float("inf")


def holdout_accuracy(models: dict[str, Any], X: np.ndarray, Y: np.ndarray) -> Any:
    """The live-accuracy measure on held-out rows: each model's median and the naive baselines.

    Returns a ``gpu_kernels.accuracy.ErrorTally`` with methods ``(*models, "last", "seasonal")``;
    the naive forecasts are read from the rows' features (``naive_from_features``: ``<s>_last``
    and ``<s>_yday``, the same definitions the worker reads from its windows), the bucket from
    ``horizon_h``. A row counts for a target only where the label and every method are finite.
    """
    from gpu_kernels.accuracy import ErrorTally, bucket_index, naive_from_features
    from gpu_kernels.features import FEATURE_NAMES

    forecasts = {name: np.asarray(m.predict(X), dtype=np.float32)[:, :, 0] for name, m in models.items()}
    forecasts |= naive_from_features(X)
    bucket = bucket_index(np.asarray(X[:, FEATURE_NAMES.index("horizon_h")], dtype=np.float64) * 3600.0)
    tally = ErrorTally(methods=(*models, "last", "seasonal"))
    tally.add_pairs(Y, forecasts, bucket)
    return tally


def gate_decision(tally: Any, champion: bool) -> tuple[bool, str, float, float | None]:
    """``(publish, reason, challenger score, champion score)`` from :func:`holdout_accuracy`'s tally."""
    c_score = tally.relative_mae("challenger")
    if not champion:
        return True, "store empty", c_score, None
    champ_score = tally.relative_mae("champion")
    if not np.isfinite(c_score) or not np.isfinite(champ_score):
        return False, "champion kept (no held-out pair to compare on)", c_score, champ_score
    if c_score <= champ_score:
        return True, "challenger not worse", c_score, champ_score
    return False, "champion kept (challenger worse)", c_score, champ_score


def _observed_slots(panel: Panel) -> np.ndarray:
    """Per slot of the panel: True where any VM has a cpu sample."""
    return ~np.isnan(panel.series[:, :, CHANNELS.index("cpu_pct")]).all(axis=0)


def holdout_cut(panel: Panel, holdout_slots: int) -> int:
    """The first slot of the held-out part: the oldest of the newest ``holdout_slots`` slots that
    hold a sample (``T - holdout_slots`` when fewer do, or when there is no gap).

    Why: after a gap (workers down for a day; a backfill, then live data a day later) the newest
    ``holdout_slots`` slots were mostly empty and the gate compared on a few windows of next to
    nothing (two new-user trials: 1 % and 0 % of the held-out day observed). Slots no VM has a
    sample in are skipped, so the held-out part reaches back across the gap to a day of samples;
    the challenger is still fitted on labels before it only.
    """
    seen = np.flatnonzero(_observed_slots(panel))
    newest = panel.n_slots - holdout_slots
    return newest if seen.size < holdout_slots else min(int(seen[-holdout_slots]), newest)


def held_out_observed(panel: Panel, cut: int) -> tuple[float, int]:
    """``(share, gap)``: the share of VM-slots with a cpu sample in the held-out part (from ``cut``
    on) over its slots that hold any sample and the VMs that have any (NaN when none has), and
    the slots in it that no VM has a sample in."""
    cpu = ~np.isnan(panel.series[:, cut:, CHANNELS.index("cpu_pct")])
    alive, seen = cpu.any(axis=1), cpu.any(axis=0)
    share = float(cpu[np.ix_(alive, seen)].mean()) if alive.any() else float("nan")
    return share, int((~seen).sum())


def holdout_examples(panel: Panel, settings: Any, cfg: RetrainConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """(X, Y) from origins inside the held-out part, the newest day of samples (``holdout_cut``: so
    every label lies in it); returns the cut too.

    The challenger is fitted on labels before the cut only; the windows of these
    examples do reach into the held-out day, exactly as serving would.
    """
    from training.model import default_horizons

    T = panel.n_slots
    cut = holdout_cut(panel, cfg.holdout_slots)
    if cut <= settings.window_slots // 2 + 1:
        seen = int(_observed_slots(panel).sum())
        raise ValueError(
            f"history holds {T} slots ({seen} with a sample): needs more than "
            f"{cfg.holdout_slots + settings.window_slots // 2 + 1} with a sample (half a window to train on plus the held-out day)"
        )
    origins = np.arange(cut - 1, T - 1, 12)
    X, Y = panel_examples(panel, origins, default_horizons(settings.horizon_slots), settings.window_slots, settings.slot_s)
    return X, Y, cut


# --- the run ------------------------------------------------------------------------


def retrain_once(
    settings: Any, client: Any, cfg: RetrainConfig, *, history: str | None = None, fmt: str | None = None,
    path: str | None = None, vms: str | None = None, progress: Progress = lambda p, f: None,
) -> RetrainResult:  # fmt: skip
    """One retrain: build, fit, gate, publish, notify."""
    from training.fit import fit_forecaster
    from training.model import ForecastModel, ModelRejected, default_horizons
    from training.store import ModelStore

    t: dict[str, float] = {}
    tic = time.perf_counter()
    progress("grids", 0.0)
    grids = load_grids(client, settings.slot_s, history=history, fmt=fmt, path=path, vms=vms, groups=cfg.vm_groups)
    panel = panel_from_grids(grids, cfg.default_mem_mb, zero_unmeasured_net=True)
    t["grids_s"] = time.perf_counter() - tic
    progress("examples", 0.25)
    Xh, Yh, cut = holdout_examples(panel, settings, cfg)
    tic = time.perf_counter()
    X, Y, rows = distributed_examples(client, panel, settings, cfg, end=cut)
    t["examples_s"] = time.perf_counter() - tic
    progress("fit", 0.5)
    tic = time.perf_counter()
    device = "gpu" if _cluster_has_gpu(client) else "cpu"

    def fit(X: Any, Y: Any) -> dict[str, list[Any]]:
        return fit_forecaster(
            X, Y, n_estimators=cfg.n_estimators, max_depth=cfg.max_depth, learning_rate=cfg.learning_rate,
            device=device, dask_client=client, seed=cfg.seed,
        )  # fmt: skip

    horizons = default_horizons(settings.horizon_slots)

    def fit_before(slot: int) -> ForecastModel:
        Xi, Yi, _ = distributed_examples(client, panel, settings, cfg, end=slot)
        return ForecastModel("inner", fit(Xi, Yi), horizons, settings.slot_s)

    blend = None
    try:  # the blend is chosen on validation folds before the held-out day (training.validated)
        plan = validation_plan(0, cut, settings.horizon_slots, settings.window_slots)
    except ValueError:
        log.warning("history too short for a validation split before the held-out day: serving the boosters without a blend")
    else:
        blend, val = choose_blend(panel, plan, settings, fit_before, seed=cfg.seed)
        loose = [f"{t} {b} {k:g} x SE" for t, by in val["se_rule"]["chosen"].items() for b, k in by.items() if k != SE_SCALES[0]]
        log.info("blend chosen on %d validation rows from %d days: %s (window regret on the folds, ms: %s); "
                 "the rule checked forward across the folds: %s", val["rows"], val["days"], val["window_choice"],
                 ", ".join(f"{name} {r['model']:.2f}" for name, r in val["regret_ms"].items()),
                 ", ".join(loose) or f"{SE_SCALES[0]:g} x SE everywhere")  # fmt: skip
    boosters = fit(X, Y)
    t["fit_s"] = time.perf_counter() - tic
    first = panel.first_slot * settings.slot_s
    challenger = ForecastModel(
        version="challenger",
        boosters=boosters,
        horizons=horizons,
        slot_s=settings.slot_s,
        training_range=(int(first), int(first + (cut - 1) * settings.slot_s)),
        metrics={"rows": float(rows), "fit_s": round(t["fit_s"], 3)},
        blend=blend,
    )
    progress("gate", 0.85)
    tic = time.perf_counter()
    c_loss = holdout_loss(challenger, Xh, Yh)
    store = ModelStore(settings.model_store)
    champ_version = store.latest_version()
    champ_loss: float | None = None
    models: dict[str, Any] = {"challenger": challenger}
    unusable = None
    if champ_version is not None:
        try:
            champ = store.load(champ_version, slot_s=settings.slot_s)
            champ_loss = holdout_loss(champ, Xh, Yh)
            models["champion"] = champ
        except (ModelRejected, ValueError) as exc:
            unusable = f"champion unusable ({exc})"
    tally = holdout_accuracy(models, Xh, Yh)
    publish, reason, c_score, champ_score = gate_decision(tally, "champion" in models)
    if unusable is not None:
        publish, reason = True, unusable
    n_pairs = int(tally.counts[list(tally.targets).index("cpu_pct")].sum())
    observed, gap = held_out_observed(panel, cut)
    if gap:
        log.info("the held-out part reaches back across %d slots without a sample to hold a day of samples: %s .. %s",
                 gap, iso_utc((panel.first_slot + cut) * settings.slot_s),
                 iso_utc((panel.first_slot + panel.n_slots) * settings.slot_s))  # fmt: skip
    if observed < 0.5:  # e.g. most VMs report one slot in four: few, odd windows decide
        log.warning("the held-out day is mostly empty (%.0f %% of its VM-slots hold a sample): the gate compares on "
                    "%d cpu_pct pairs only", 100 * observed, n_pairs)  # fmt: skip
    behind = tally.worse_than_naive("challenger")
    if behind:
        log.warning("challenger is worse than the best naive baseline on the held-out day in: %s", "; ".join(behind))
    challenger.metrics.update({"holdout_loss": c_loss, "holdout_mae_vs_last": c_score})
    t["gate_s"] = time.perf_counter() - tic
    version = None
    if publish:
        version = store.publish(challenger)
        _notify(settings, version)
    progress("done", 1.0)
    return RetrainResult(
        publish, version, reason, c_loss, champ_loss, champ_version, t, rows, len(panel.vms),
        challenger_score=c_score, champion_score=champ_score, mae=tally.mae(), worse_than_naive=behind,
        held_out_pairs=n_pairs, held_out_observed=observed, held_out_gap_slots=gap,
    )  # fmt: skip


def _cluster_has_gpu(client: Any) -> bool:
    """True when every worker sees a CUDA device through CuPy (asked on the workers themselves)."""
    from gpu_kernels.xp import gpu_available

    try:
        answers = client.run(gpu_available)
        return bool(answers) and all(answers.values())
    except Exception:  # noqa: BLE001 - a best-effort probe: train on CPU
        return False


def _notify(settings: Any, version: str) -> None:
    try:
        from app.model_watch import notify_new_version
    except ImportError:
        return
    try:
        n = notify_new_version(settings, version)
        log.info("announced model %s to %d listener(s)", version, n)
    except Exception as exc:  # noqa: BLE001 - Redis down must not undo a publication
        log.warning("published %s but could not notify workers through Redis: %s (they poll the store)", version, exc)


def parse_every(text: str) -> float:
    """``"6h"``, ``"30m"``, ``"90s"``, ``"1d"`` -> seconds."""
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1] in units:
            value = float(text[:-1]) * units[text[-1]]
        else:
            value = float(text)
    except (ValueError, IndexError) as exc:
        raise ValueError(f"bad interval {text!r}: use e.g. 6h, 30m, 90s") from exc
    if value <= 0:
        raise ValueError("the interval must be positive")
    return value

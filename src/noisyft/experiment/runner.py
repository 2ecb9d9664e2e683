"""The engine: an Optuna study whose trials are `noisyft train` + `noisyft eval run` subprocesses.

- Storage: ``sqlite:///DIR/study.db`` by default; ``--storage`` takes any Optuna RDB URL (PostgreSQL, MySQL)
  or ``journal:PATH`` (a journal file). Workers on other machines join with ``noisyft experiment work``.
- Grids use Optuna's GridSampler over ``variant`` x ``seed``; searches use TPE over the ranges.
- Resume: a trial left RUNNING by a dead process is marked failed ("interrupted") and run again: at once when
  that process ran on this host (its pid is gone), after the heartbeat grace period otherwise. Completed
  (variant, seed) cells are never run again; a trial that failed with an error is recorded with it, the others
  go on, and the next ``run`` tries it once more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from noisyft._io import file_lock

from .results import trial_metrics
from .settings_bridge import eval_file_settings, train_file_settings
from .spec import ExperimentSpec, Range, trial_train_settings
from .trial import TrialError, run_trial, write_trial_record

logger = logging.getLogger(__name__)

HEARTBEAT_S = 30
GRACE_S = 120


class Stopped(Exception):
    """The experiment is being stopped (Ctrl-C); running trials are taken down and marked interrupted."""


def default_storage(out_dir: Path) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / 'study.db'}"


class StorageError(ValueError):
    """The ``--storage`` URL cannot be opened (malformed, missing driver, missing folder, unreachable server)."""


def _sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URL; None for other URLs and in-memory databases."""
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise StorageError(
            f"storage {_shown(url)!r} is not a database URL (sqlite:///PATH, postgresql://..., mysql://...) or journal:PATH"
        ) from None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    db = Path(parsed.database)
    if not db.parent.is_dir():
        raise StorageError(f"storage {_shown(url)!r}: the folder {db.parent} does not exist")
    return db


def open_storage(url: str, *, attempts: int = 5) -> Any:
    """Open (creating if new) the Optuna storage at `url`; safe when several workers open a new one at once.

    Optuna stamps a new database's schema version on first open, and two workers doing that at the same moment
    collide (``UNIQUE constraint failed: alembic_version``). For SQLite files the opens are serialized with a
    lock file beside the database (``study.db.lock``); for server databases a collision is retried, by which time the other
    worker's stamp is there.
    """
    import optuna
    import sqlalchemy.exc

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len("journal:") :])
        if not path.name or not path.parent.is_dir():
            raise StorageError(f"storage {_shown(url)!r}: journal:PATH needs a file in an existing folder")
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    db = _sqlite_file(url)
    attempt = 0
    while True:
        guard = file_lock(db.with_name(db.name + ".lock")) if db is not None else contextlib.nullcontext()
        try:
            with guard:
                return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as exc:
            attempt += 1
            racing = any(s in str(exc) for s in ("alembic_version", "already exists", "locked"))
            if attempt >= attempts or not racing:
                raise StorageError(f"storage {_shown(url)!r} cannot be opened: {_first_line(exc)}") from exc
            logger.info("storage %s is being created by another worker; retrying", _shown(url))
            time.sleep(0.2 * attempt)
        except (ImportError, sqlalchemy.exc.SQLAlchemyError) as exc:  # no driver installed, bad URL parts
            raise StorageError(f"storage {_shown(url)!r} cannot be opened: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    return _shown(str(exc).strip().splitlines()[0]) if str(exc).strip() else type(exc).__name__


def _shown(text: str) -> str:
    """`text` with the password of any ``scheme://user:password@host`` URL in it masked (for messages, logs)."""
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def _proc_start(pid: int) -> str | None:
    """The kernel start time of a process (to tell a live pid from a reused one), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"
        return "?"


def _grid_sampler_class() -> type:
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's GridSampler, minus its ``study.stop()`` after the last cell: the runner decides when the
        grid is done (it retries failed cells), and it drives the study with ask/tell, outside ``optimize``."""

        def after_trial(self, study, trial, state, values) -> None:
            return None

    return GridSampler


class Runner:
    """One worker process of an experiment (``run`` or ``work``), with ``workers`` trials at a time."""

    def __init__(self, spec: ExperimentSpec, out_dir: Path, storage_url: str, launcher: Sequence[str] = ()):
        import optuna

        grid_sampler = _grid_sampler_class()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # heartbeats and fail_stale_trials are "experimental" (since Optuna 2.9) and meant for optimize(); the
        # runner records heartbeats itself around its ask/tell loop
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        self.spec, self.out_dir, self.launcher = spec, Path(out_dir), list(launcher)
        self.storage = open_storage(storage_url)
        if spec.is_search:
            sampler = optuna.samplers.TPESampler(seed=spec.search.sampler_seed)
            direction = spec.search.direction
        else:
            names = [v.name for v in spec.variants]
            sampler = grid_sampler({"variant": names, "seed": list(spec.seeds)}, seed=0)
            direction = spec.direction
        self.study = optuna.create_study(
            study_name=spec.name,
            storage=self.storage,
            sampler=sampler,
            direction=direction,
            load_if_exists=True,
        )
        self._lock = threading.Lock()
        self._attempted: set[Any] = set()
        self._stop = threading.Event()
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.counts = {"complete": 0, "failed": 0, "interrupted": 0}
        self.progress: Any = None

    # -- which trial next ------------------------------------------------------------------------------------------
    def _fail_dead_local(self) -> None:
        from optuna.trial import TrialState

        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            attrs = t.user_attrs
            if attrs.get("host") != self.host or attrs.get("pid") is None:
                continue
            pid = int(attrs["pid"])
            if pid == self.pid or _proc_start(pid) == attrs.get("pid_start"):
                continue
            self.study._storage.set_trial_user_attr(t._trial_id, "interrupted", f"worker pid {pid} is gone")
            with contextlib.suppress(Exception):
                self.study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            logger.info(
                "trial %s was interrupted (worker pid %d is gone); it will run again",
                attrs.get("trial_id"),
                pid,
            )

    def _cell(self, t: Any) -> Any:
        if self.spec.is_search:
            return t.user_attrs.get("trial_id")
        return (t.params.get("variant"), t.params.get("seed"))

    def finished_cells(self) -> tuple[int, int]:
        """(complete, total) cells: grid cells done, or search trials counted against the budget."""
        status = self.status()
        return status["complete"], status["total"]

    def status(self) -> dict[str, int]:
        """Cells complete, running (in any worker), failed (latest attempt ended in an error), and in total."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        if self.spec.is_search:
            return {
                "complete": sum(1 for t in trials if t.state == TrialState.COMPLETE),
                "running": sum(1 for t in trials if t.state == TrialState.RUNNING),
                "failed": sum(1 for t in trials if t.state == TrialState.FAIL and "error" in t.user_attrs),
                "total": self.spec.search.n_trials,
            }
        latest: dict[Any, Any] = {}
        for t in sorted(trials, key=lambda t: t.number):
            if t.state != TrialState.PRUNED:
                latest[self._cell(t)] = t
        cells = self.spec.cells()
        done = {
            c for c in cells if any(t.state == TrialState.COMPLETE and self._cell(t) == c for t in trials)
        }
        states = [latest[c].state for c in cells if c in latest and c not in done]
        return {
            "complete": len(done),
            "running": states.count(TrialState.RUNNING),
            "failed": states.count(TrialState.FAIL),
            "total": len(cells),
        }

    def _ask_grid(self) -> tuple[Any, Any] | None:
        from optuna.trial import TrialState

        by_cell: dict[Any, list] = {}
        for t in self.study.get_trials(deepcopy=False):
            by_cell.setdefault(self._cell(t), []).append(t)
        fresh, retry = [], []
        for cell in self.spec.cells():
            states = {t.state for t in by_cell.get(cell, [])}
            if TrialState.COMPLETE in states or TrialState.RUNNING in states or cell in self._attempted:
                continue
            (retry if states else fresh).append(cell)
        if not fresh and not retry:
            return None
        if not fresh:
            variant, seed = retry[0]
            self.study.enqueue_trial({"variant": variant, "seed": seed})
        trial = self.study.ask()
        names = [v.name for v in self.spec.variants]
        cell = (
            trial.suggest_categorical("variant", names),
            trial.suggest_categorical("seed", list(self.spec.seeds)),
        )
        trial.set_user_attr("trial_id", f"{cell[0]}-s{cell[1]}")
        return trial, cell

    def _ask_search(self) -> tuple[Any, Any] | None:
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        counted = sum(1 for t in trials if t.state == TrialState.COMPLETE or "error" in t.user_attrs)
        running = sum(1 for t in trials if t.state == TrialState.RUNNING)
        if counted + running >= self.spec.search.n_trials:
            return None
        retried = {
            t.user_attrs.get("trial_id")
            for t in trials
            if t.state != TrialState.FAIL or "error" in t.user_attrs
        }
        pending = [
            t
            for t in trials
            if t.state == TrialState.FAIL
            and "error" not in t.user_attrs
            and t.user_attrs.get("trial_id") not in retried
        ]
        if pending:
            old = pending[0]
            self.study.enqueue_trial(old.params, user_attrs={"trial_id": old.user_attrs["trial_id"]})
        trial = self.study.ask()
        variant = self.spec.variants[0]
        for path, r in variant.axes.items():
            if isinstance(r, Range):
                if r.step is not None and float(r.step).is_integer() and float(r.low).is_integer():
                    trial.suggest_int(path, int(r.low), int(r.high), step=int(r.step), log=r.log)
                else:
                    trial.suggest_float(path, r.low, r.high, log=r.log, step=r.step)
        if "trial_id" not in trial.user_attrs:
            trial.set_user_attr("trial_id", f"{variant.name}-t{trial.number:03d}")
        return trial, trial.user_attrs["trial_id"]

    def _next(self) -> tuple[Any, Any] | None:
        import optuna

        with self._lock:
            if self._stop.is_set():
                return None
            optuna.storages.fail_stale_trials(self.study)
            self._fail_dead_local()
            while True:
                got = self._ask_search() if self.spec.is_search else self._ask_grid()
                if got is None:
                    return None
                trial, cell = got
                if not self.spec.is_search and cell in self._attempted:  # another worker's duplicate
                    self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    continue
                self._attempted.add(cell)
                trial.set_user_attr("host", self.host)
                trial.set_user_attr("pid", self.pid)
                trial.set_user_attr("pid_start", _proc_start(self.pid))
                return trial, cell

    # -- running one -----------------------------------------------------------------------------------------------
    def _trial_plan(self, trial: Any) -> tuple[str, Any, int, dict[str, Any]]:
        trial_id = trial.user_attrs["trial_id"]
        if self.spec.is_search:
            variant, seed = self.spec.variants[0], self.spec.seeds[0]
            values = dict(trial.params)
        else:
            variant, seed, values = self.spec.variant(trial.params["variant"]), int(trial.params["seed"]), {}
        return trial_id, variant, seed, trial_train_settings(variant, seed, values)

    def _heartbeat(self, trial: Any) -> Any:
        last = [0.0]

        def beat() -> None:
            if self._stop.is_set():
                raise Stopped
            if time.monotonic() - last[0] >= HEARTBEAT_S and hasattr(self.study._storage, "record_heartbeat"):
                with contextlib.suppress(Exception):
                    self.study._storage.record_heartbeat(trial._trial_id)
                last[0] = time.monotonic()

        return beat

    def run_one(self, trial: Any) -> None:
        import optuna

        trial_id, variant, seed, settings = self._trial_plan(trial)
        trial_dir = self.out_dir / "trials" / trial_id
        trial_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "id": trial_id, "variant": variant.name, "group": variant.group, "seed": seed,
            "order": self.spec.variants.index(variant),
            "params": {k: v for k, v in trial.params.items() if k not in ("variant", "seed")} or dict(variant.axes),
            "settings": settings, "state": "running", "optuna_number": trial.number, "host": self.host,
            "started": datetime.now().isoformat(timespec="seconds"),
        }  # fmt: skip
        record["params"] = {k: v for k, v in record["params"].items() if not isinstance(v, Range)}
        write_trial_record(trial_dir, record)
        t0 = time.perf_counter()
        try:
            walls = run_trial(
                trial_dir,
                train_file_settings(settings),
                eval_file_settings(self.spec.eval),
                launcher=self.launcher,
                on_wait=self._heartbeat(trial),
            )
            metrics = trial_metrics(trial_dir)
            value = self._objective(metrics)
        except Stopped:
            record.update(state="interrupted", error="stopped by the user")
            write_trial_record(trial_dir, record)
            trial.set_user_attr("interrupted", "stopped by the user")
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            self._count("interrupted")
            return
        except (TrialError, OSError, ValueError) as exc:
            record.update(state="failed", error=str(exc), wall_s=round(time.perf_counter() - t0, 3))
            write_trial_record(trial_dir, record)
            trial.set_user_attr("error", str(exc))
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            logger.warning("trial %s failed: %s", trial_id, exc)
            self._count("failed")
            return
        record.update(
            state="complete", error=None, wall_s=round(time.perf_counter() - t0, 3), step_wall_s=walls,
            finished=datetime.now().isoformat(timespec="seconds"), value=value,
        )  # fmt: skip
        write_trial_record(trial_dir, record)
        trial.set_user_attr("metrics", metrics)
        self.study.tell(trial, value)
        self._count("complete")

    def _objective(self, metrics: dict[str, float]) -> float:
        name = self.spec.search.metric if self.spec.is_search else self.spec.metric
        if name is None:
            return 0.0
        if name not in metrics:
            raise TrialError(
                f"metric {name!r} is not in the trial's results; it has {', '.join(sorted(metrics))}"
            )
        return float(metrics[name])

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1
            if self.progress is not None:
                if key != "interrupted":
                    self.progress.update(1)
                self.progress.set_postfix(failed=self.counts["failed"], refresh=True)

    # -- the loop --------------------------------------------------------------------------------------------------
    def _worker(self) -> None:
        while not self._stop.is_set():
            got = self._next()
            if got is None:
                return
            self.run_one(got[0])

    def run(self, workers: int = 1, progress: bool = True) -> dict[str, int]:
        """Run trials until none is left for this process; returns counts of complete / failed / interrupted."""
        done, total = self.finished_cells()
        if progress:
            from tqdm.auto import tqdm

            self.progress = tqdm(
                total=total, initial=done, unit="trial", desc=self.spec.name, dynamic_ncols=True
            )
        threads = [
            threading.Thread(target=self._worker, name=f"trial-worker-{i}", daemon=True)
            for i in range(workers)
        ]
        try:
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(timeout=0.5)
        except KeyboardInterrupt:
            self._stop.set()
            for t in threads:
                t.join()
            raise
        finally:
            if self.progress is not None:
                self.progress.close()
        return dict(self.counts)

"""Mirror an Ultralytics training's run directory from inside the training process.

    from ultralytics import YOLO
    from asyncsync.integrations.ultralytics import attach

    model = YOLO("yolov8n.pt")
    attach(model, "s3://bucket/experiments")  # keys: experiments/<run name>/<path in the run>
    model.train(data="coco8.yaml", epochs=100)

Ultralytics writes every file of the run in place, checkpoints included, so the callbacks
never upload a file the trainer may be writing:

- ``on_model_save``: right after the trainer wrote its checkpoints, the weights that
  changed are copied (a real copy, never a link: the next epoch truncates the file in
  place) to a staging directory outside the run, and uploaded from there in the
  background. The copy runs in a thread of its own while the training goes on;
  ``on_train_epoch_end``, the last callback before the trainer saves again, waits for it
  (as does ``on_fit_epoch_end`` of the last epoch, before the weights are stripped in
  place). Only the newest snapshot of a file waits for its turn to upload; an older one
  that has not started yet is dropped.
- ``on_fit_epoch_end``: results.csv, args.yaml and the plots are synced in the background,
  after the plotting threads that ultralytics starts have finished their images.
- ``on_train_end`` and ``teardown``: the final flush. The plotting threads are waited for,
  snapshot uploads in flight are allowed to finish (so an older checkpoint never lands on top
  of the final one), and then the whole run directory, now final, is synced, all within
  ``flush_timeout`` seconds. ``teardown`` runs however ``train()`` ends, an exception
  included, so a crashed training still leaves its last epoch in the bucket.

Uploads run in a thread of their own with its own event loop: the training waits for the
network only in the final flush. A run record, ``PREFIX/<run>/_asyncsync/run.json``, says
running, finished or crashed, with the epochs done and the latest metrics.

The callbacks here know ultralytics (its ranks, its plotting threads, the trainer's
attributes); `runsync.RunSync` does the mirroring. Only rank 0 uploads (``RANK`` -1 or
0). Under DDP, ultralytics pickles the callbacks into worker processes it starts later,
and recreates the run directory there: so nothing here holds a thread, loop, file or
client until the first callback runs in rank 0.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from ..config import PushConfig, push_config_from
from ..errors import ConfigError
from ..options import BY_NAME, Kind, from_mapping
from .runsync import RunSync, describe

log = logging.getLogger("asyncsync.training")

EVENTS = ("on_pretrain_routine_start", "on_train_epoch_end", "on_model_save",
          "on_fit_epoch_end", "on_train_end", "teardown")
DEFAULT_FLUSH_TIMEOUT = 600.0
# ultralytics' plot_images runs in a non-daemon thread; Python names it after its target.
_PLOTTING_THREAD = "(plot_images)"


def attach(model: Any, destination: str, **options: Any) -> UltralyticsSync:
    """Register callbacks on an ultralytics model that mirror each training's run directory
    to ``destination`` (``s3://BUCKET/PREFIX`` or ``file:///PATH``).

    Options are the store and transfer options of the option table (`asyncsync.options`:
    the CLI's flags with underscores, ``workers=8``, ``max_bandwidth="50MB/s"``,
    ``endpoint_url=...``, ``exclude=["*.jpg"]``, ``state_dir=...``; None leaves one at its
    default), validated as the CLI validates its flags, plus ``flush_timeout`` (seconds the
    final flush may take, default 600) and ``checkpoint_interval`` (as watch's flag: a
    checkpoint goes up at most once per this many seconds, default 300; 0 uploads every
    epoch's).
    Credentials come from the standard AWS chain. A bad option raises `ConfigError` here,
    before the training starts; problems while training are logged and never stop it.
    """
    sync = UltralyticsSync(destination, **options)
    for event in EVENTS:
        model.add_callback(event, getattr(sync, event))
    return sync


class AttachSettings(NamedTuple):
    push: PushConfig
    flush_timeout: float
    checkpoint_interval: float
    metrics_addr: tuple[str, int] | None = None  # /metrics, /healthz, /readyz while training


def settings_from(destination: str, options: dict[str, Any]) -> AttachSettings:
    """Validate the options through the option table, as the CLI validates its flags."""
    flush_timeout = _seconds(options, "flush_timeout", DEFAULT_FLUSH_TIMEOUT, zero=False)
    checkpoint_interval = _seconds(options, "checkpoint_interval",
                                   BY_NAME["checkpoint_interval"].default, zero=True)
    for name, value in options.items():
        # Keywords are Python values: a whole-number option takes an int, where the table
        # also accepts the text of one (from a flag or a variable).
        option = BY_NAME.get(name)
        if (option is None or option.kind is not Kind.INT or value is None
                or "attach" not in option.commands):
            continue
        minimum = option.minimum or 0
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"attach(): {name}={value!r} must be a whole number of at least "
                              f"{minimum:g}")
    settings = from_mapping("attach", options)
    config = push_config_from(settings, source=".", destination=destination,
                              source_may_be_missing=True)
    # The state directory is resolved now: a DDP worker may start in another directory.
    return AttachSettings(replace(config, state_dir=config.state_dir.resolve()),
                          flush_timeout, checkpoint_interval, settings["metrics_addr"])


def _seconds(options: dict[str, Any], name: str, default: float, *, zero: bool) -> float:
    raw = options.pop(name, default)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = -1.0
    if isinstance(raw, bool) or not (value >= 0 if zero else value > 0) or value == float("inf"):
        bound = "of at least 0" if zero else "above 0"
        raise ConfigError(f"{name} {raw!r}: must be a number of seconds {bound}")
    return value


class UltralyticsSync:
    """The callbacks `attach` registers. Picklable: it holds only settings until rank 0's
    first callback starts the uploader for the run that trainer writes."""

    def __init__(self, destination: str, **options: Any) -> None:
        self._settings = settings_from(destination, dict(options))
        self._run: RunSync | None = None
        self._disabled_for: Path | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_run"] = None
        return state

    @property
    def run(self) -> RunSync | None:
        """The uploader of the current (or last) run in this process, if any."""
        return self._run

    # The callbacks. Each is guarded: a problem with the upload is logged, never raised into
    # the training.

    def on_pretrain_routine_start(self, trainer: Any) -> None:
        self._guarded("start", trainer, lambda run: None)

    def on_model_save(self, trainer: Any) -> None:
        self._guarded("checkpoint snapshot", trainer, lambda run: run.snapshot_weights())

    def on_train_epoch_end(self, trainer: Any) -> None:
        # The trainer validates next, then saves: the copies of the last checkpoints must
        # be made by then. They had a whole epoch of training to get there.
        self._guarded("checkpoint snapshot", trainer, lambda run: run.wait_for_snapshots())

    def on_fit_epoch_end(self, trainer: Any) -> None:
        def epoch_done(run: RunSync) -> None:
            if getattr(trainer, "stop", False):
                # The loop ends here, and final_eval() strips the weights in place next.
                run.wait_for_snapshots()
            run.epoch_done()

        self._guarded("epoch sync", trainer, epoch_done)

    def on_train_end(self, trainer: Any) -> None:
        self._guarded("final flush", trainer, lambda run: run.flush(finished=True))

    def teardown(self, trainer: Any) -> None:
        error = sys.exc_info()[1]  # teardown runs in train()'s `finally`
        try:
            self._guarded("final flush", trainer, lambda run: run.close(error))
        finally:
            self._run = None

    def _guarded(self, what: str, trainer: Any, action: Callable[[RunSync], None]) -> None:
        if _rank() not in (-1, 0):
            return
        try:
            run = self._run_for(trainer)
            if run is not None:
                action(run)
        except Exception as exc:  # noqa: BLE001 - the training must go on
            log.warning("%s failed: %s", what, describe(exc))

    def _run_for(self, trainer: Any) -> RunSync | None:
        run_dir = Path(trainer.save_dir).resolve()
        if self._run is not None and self._run.run_dir != run_dir:
            # A new training with the same model: the previous one's teardown closed it.
            self._run.close(None)
            self._run = None
        if self._run is None and self._disabled_for != run_dir:
            try:
                self._run = RunSync(
                    self._settings.push, run_dir,
                    Path(getattr(trainer, "wdir", run_dir / "weights")),
                    flush_timeout=self._settings.flush_timeout,
                    checkpoint_interval=self._settings.checkpoint_interval,
                    epochs_planned=getattr(trainer, "epochs", None),
                    background_writers=plotting_threads,
                    metrics_addr=self._settings.metrics_addr,
                )
            except Exception:
                self._disabled_for = run_dir  # one warning per run, not one per callback
                raise
        return self._run


def _rank() -> int:
    """The process's global rank as ultralytics reads it (-1 outside DDP)."""
    try:
        return int(os.environ.get("RANK", "-1"))
    except ValueError:
        return -1

def plotting_threads() -> list[threading.Thread]:
    """ultralytics' background plotting threads still running (they write images in place)."""
    return [t for t in threading.enumerate() if t.name.endswith(_PLOTTING_THREAD)]

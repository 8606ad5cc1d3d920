"""Backfill state: embed every scene that lacks a current embedding, resumably.

Work is committed per batch (one transaction each), so a crash or Ctrl-C loses at most one batch, and
running the same command again continues where it stopped. ``--force-regenerate`` re-embeds every
scene: its start time is kept in ``HEIMDEX_HOME/backfill.json`` so a resumed forced run skips the
scenes it already redid (their metadata carries ``embedded_at``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from heimdex_clip_assets.adapters.db import SceneRecord
from heimdex_clip_assets.config import Settings


@dataclass
class ForcedRun:
    """The marker of a forced regeneration in progress."""

    model_version: str
    started_at: float

    @staticmethod
    def path(settings: Settings) -> Path:
        return settings.home / "backfill.json"

    @classmethod
    def load_or_start(cls, settings: Settings) -> ForcedRun:
        path = cls.path(settings)
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("model_version") == settings.clip_model_version:
                return cls(data["model_version"], float(data["started_at"]))
        run = cls(settings.clip_model_version, time.time())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model_version": run.model_version, "started_at": run.started_at}))
        return run

    def pending(self, scene: SceneRecord) -> bool:
        embedded_at = (scene.metadata or {}).get("embedded_at")
        return scene.embedding is None or embedded_at is None or float(embedded_at) < self.started_at

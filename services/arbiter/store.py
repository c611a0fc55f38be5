"""The arbiter's own state file: what it must not forget across a restart.

Commands in flight (so a restarted arbiter does not issue them again),
operator decisions (pins, drains, mode, pause, thresholds), quarantines and
power-cycle history.  Written atomically (temporary file, fsync, rename), so
a crash leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("enersis.arbiter.store")

FORMAT = 1


class StateFile:
    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True):
        self.path = Path(path)
        # Without fsync the rename is still atomic and survives a crash of the arbiter process;
        # only a crash of the whole host can lose the last changes.
        self.fsync = fsync

    def load(self) -> dict[str, Any] | None:
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            # Keep the broken file for a person to look at; start from the broker's picture.
            broken = self.path.with_name(self.path.name + ".broken")
            os.replace(self.path, broken)
            log.error("state file %s is not valid JSON (%s); moved to %s and starting without it", self.path, exc, broken)
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            log.error("state file %s has an unknown format; ignoring it", self.path)
            return None
        return data

    def save(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"format": FORMAT, **data}, separators=(",", ":"), sort_keys=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(payload)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

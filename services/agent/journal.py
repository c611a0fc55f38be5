"""The executor's persistent record of commands, one small JSON file per command id.

Two states per command: "started" (written, fsync'ed, before the migration
begins) and "final" (the CommandResult that was or will be published).  A
restarted executor reads it to answer a duplicate with the same result and
to find the migrations it started but never reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from enersis.common.messages import CommandResult, MigrateVm

log = logging.getLogger("enersis.agent.journal")

STARTED, FINAL = "started", "final"


class Journal:
    def __init__(self, state_dir: str | os.PathLike[str]):
        self.dir = Path(state_dir) / "commands"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, command_id: str) -> Path:
        # Command ids are free text: hash them into safe file names.
        return self.dir / (hashlib.sha256(command_id.encode()).hexdigest()[:40] + ".json")

    def get(self, command_id: str) -> dict[str, Any] | None:
        try:
            rec = json.loads(self._path(command_id).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("journal record of %s is unreadable (%s); treating it as missing", command_id, exc)
            return None
        return rec if rec.get("command_id") == command_id else None

    def _write(self, rec: dict[str, Any]) -> None:
        path = self._path(rec["command_id"])
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            json.dump(rec, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive a power cut
        finally:
            os.close(dir_fd)

    def started(self, cmd: MigrateVm, *, now_ms: int) -> None:
        self._write({"command_id": cmd.command_id, "state": STARTED, "command": asdict(cmd),
                     "started_ms": now_ms})

    def final(self, cmd: MigrateVm, res: CommandResult, *, now_ms: int) -> None:
        prev = self.get(cmd.command_id) or {}
        self._write({"command_id": cmd.command_id, "state": FINAL, "command": asdict(cmd),
                     "started_ms": prev.get("started_ms"), "final_ms": now_ms, "result": asdict(res)})

    @staticmethod
    def command_of(rec: dict[str, Any]) -> MigrateVm:
        return MigrateVm(**rec["command"])

    @staticmethod
    def result_of(rec: dict[str, Any]) -> CommandResult:
        return CommandResult(**rec["result"])

    def unfinished(self) -> list[dict[str, Any]]:
        """Records in state "started": migrations begun and never reported."""
        out = []
        for p in sorted(self.dir.glob("*.json")):
            try:
                rec = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if rec.get("state") == STARTED:
                out.append(rec)
        return out

    def prune(self, older_than_s: float, *, now: float | None = None) -> int:
        """Forget final records older than `older_than_s` (a replay that late gets a fresh answer)."""
        cutoff = (now if now is not None else time.time()) - older_than_s
        removed = 0
        for p in self.dir.glob("*.json"):
            try:
                if p.stat().st_mtime < cutoff and json.loads(p.read_text()).get("state") == FINAL:
                    p.unlink()
                    removed += 1
            except (OSError, ValueError):
                continue
        return removed

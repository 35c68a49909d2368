"""The adapter registry: which LoRA version serves each agent, and hot-swapping it in vLLM.

Registering loads the PEFT directory into vLLM under a new name `{agent}-v{N}` (a name is
never reused: vLLM keeps serving the old weights under a reused name) and then routes the
agent's calls to it by rewriting `model`. Each agent keeps two versions loaded: `active`
and `standby` (the rollback target). Older versions are `retired` and unloaded once no
call is in flight on them, so calls finish on the version they started on. The registry
lives in the store's `adapters` table; a restarted proxy reloads it into vLLM.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from flywheel.proxy.admin import UpstreamAdmin
from flywheel.proxy.errors import ApiError
from flywheel.store.records import AdapterRow
from flywheel.store.writer import BatchWriter

log = logging.getLogger("flywheel.adapters")

ACTIVE, STANDBY, RETIRED, ROLLED_BACK = "active", "standby", "retired", "rolled_back"
_AGENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class Version:
    row: AdapterRow
    in_flight: int = 0
    loaded: bool = False

    @property
    def served_name(self) -> str:
        return self.row.served_name


def validate_adapter_dir(path: str, max_rank: int) -> Path:
    """A loadable PEFT LoRA directory within vLLM's rank limit, or a 400 saying what is wrong."""
    directory = Path(path).expanduser().resolve()
    config_file = directory / "adapter_config.json"
    if not config_file.is_file():
        raise ApiError(400, f"{directory} has no adapter_config.json: not a PEFT adapter directory", "invalid_adapter")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as bad:
        raise ApiError(400, f"{config_file} is not valid JSON: {bad}", "invalid_adapter") from None
    if config.get("peft_type", "LORA").upper() != "LORA":
        raise ApiError(400, f"only LoRA adapters can be served, not {config.get('peft_type')}", "invalid_adapter")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise ApiError(400, f"{config_file}: 'r' must be a positive integer", "invalid_adapter")
    if rank > max_rank:
        raise ApiError(400, f"adapter rank {rank} exceeds the server's --max-lora-rank {max_rank}", "invalid_adapter")
    if not any((directory / name).is_file() for name in _WEIGHT_FILES):
        raise ApiError(400, f"{directory} has no {' or '.join(_WEIGHT_FILES)}", "invalid_adapter")
    return directory


class Registry:
    def __init__(self, writer: BatchWriter, vllm: UpstreamAdmin, default_base_model: str | None, max_lora_rank: int):
        self._writer = writer
        self._vllm = vllm
        self.default_base_model = default_base_model
        self.max_lora_rank = max_lora_rank
        self.versions: dict[str, list[Version]] = {}  # agent -> versions, oldest first
        self.active: dict[str, Version] = {}
        self._lock = asyncio.Lock()  # one registry change at a time

    # ---- the hot path -------------------------------------------------------

    def route(self, agent: str, requested_model: str | None) -> Version | None:
        """The version to serve this call with (counted in flight), or None for the base model."""
        version = self.active.get(agent)
        if version is None:
            return None
        base = version.row.base_model
        if base is not None and requested_model not in (None, base):
            return None  # the client asked for another model: leave it alone
        version.in_flight += 1
        return version

    def release(self, version: Version) -> None:
        version.in_flight -= 1
        if version.in_flight == 0 and version.row.status in (RETIRED, ROLLED_BACK) and version.loaded:
            asyncio.get_running_loop().create_task(self._unload(version))

    # ---- changes ------------------------------------------------------------

    async def register(self, agent: str, path: str, base_model: str | None) -> Version:
        if not _AGENT_NAME.match(agent):
            raise ApiError(400, f"agent name {agent!r} must match {_AGENT_NAME.pattern}", "invalid_agent")
        directory = await asyncio.to_thread(validate_adapter_dir, path, self.max_lora_rank)
        async with self._lock:
            history = self.versions.setdefault(agent, [])
            number = max((v.row.version for v in history), default=0) + 1
            new = Version(AdapterRow(
                served_name=f"{agent}-v{number}", agent=agent, version=number, path=str(directory),
                base_model=base_model or self.default_base_model, created_at=datetime.now(timezone.utc),
                status=ACTIVE,
            ))
            await self._load(new)
            history.append(new)
            await self._persist(new)
            for older in reversed(history[:-1]):
                if older.row.status == ACTIVE:
                    await self._set_status(older, STANDBY)
                elif older.row.status == STANDBY:
                    await self._set_status(older, RETIRED)
            self.active[agent] = new  # from here on the agent's calls go to the new version
            self._unload_idle(agent)
            return new

    async def rollback(self, agent: str) -> Version | None:
        """Back to the standby version (or the base model); returns what now serves."""
        async with self._lock:
            current = self.active.get(agent)
            if current is None:
                raise ApiError(409, f"agent {agent!r} is on the base model: nothing to roll back", "nothing_to_roll_back")
            history = self.versions[agent]
            target = next((v for v in reversed(history) if v.row.status == STANDBY), None)
            if target is not None and not target.loaded:
                await self._load(target)
            await self._set_status(current, ROLLED_BACK)
            if target is None:
                del self.active[agent]
            else:
                await self._set_status(target, ACTIVE)
                self.active[agent] = target
                below = next((v for v in reversed(history)
                              if v.row.status == RETIRED and v.row.version < target.row.version), None)
                if below is not None:  # the next rollback target; loaded when needed
                    await self._set_status(below, STANDBY)
            self._unload_idle(agent)
            return target

    async def restore(self, rows: list[AdapterRow]) -> None:
        """Rebuild from the store, then load every active and standby version into vLLM."""
        for row in rows:
            version = Version(row)
            self.versions.setdefault(row.agent, []).append(version)
            if row.status == ACTIVE:
                self.active[row.agent] = version
        pending = [v for vs in self.versions.values() for v in vs if v.row.status in (ACTIVE, STANDBY)]
        delay = 0.5
        while pending:
            try:
                for version in list(pending):
                    await self._load(version)
                    pending.remove(version)
            except ApiError as failure:
                log.warning("restoring adapters: %s; retrying in %.0f s", failure.message, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
        if rows:
            log.info("restored adapters: %s", {a: v.served_name for a, v in self.active.items()})

    # ---- helpers ------------------------------------------------------------

    def snapshot(self) -> dict:
        return {"agents": {
            agent: {
                "current": self.active[agent].served_name if agent in self.active else None,
                "history": [{**row_json(v.row), "in_flight": v.in_flight, "loaded": v.loaded} for v in versions],
            }
            for agent, versions in sorted(self.versions.items())
        }}

    async def _set_status(self, version: Version, status: str) -> None:
        version.row = dataclasses.replace(version.row, status=status)
        await self._persist(version)

    async def _persist(self, version: Version) -> None:
        await self._writer.submit(version.row)

    def _unload_idle(self, agent: str) -> None:
        for version in self.versions[agent]:
            if version.loaded and version.in_flight == 0 and version.row.status in (RETIRED, ROLLED_BACK):
                asyncio.get_running_loop().create_task(self._unload(version))

    async def _load(self, version: Version) -> None:
        status, text = await self._vllm.post("load_lora_adapter",
                                             {"lora_name": version.served_name, "lora_path": version.row.path})
        if status != 200 and "has already been loaded" not in text:
            raise ApiError(502 if status >= 500 else 400,
                           f"vLLM refused to load {version.served_name} from {version.row.path}: {text}",
                           "adapter_load_failed")
        version.loaded = True

    async def _unload(self, version: Version) -> None:
        if not version.loaded or version.in_flight:
            return
        version.loaded = False
        try:
            status, text = await self._vllm.post("unload_lora_adapter", {"lora_name": version.served_name})
            if status != 200:
                log.warning("vLLM did not unload %s: %s", version.served_name, text)
        except ApiError as failure:
            log.warning("unloading %s: %s", version.served_name, failure.message)


def row_json(row: AdapterRow) -> dict:
    return {**dataclasses.asdict(row), "created_at": row.created_at.isoformat()}

"""The adapter registry: which LoRA version serves each agent, and hot-swapping it in vLLM.

Registering loads the PEFT directory into vLLM under a new name `{agent}-v{N}` (a name is
never reused: vLLM keeps serving the old weights under a reused name) and then routes the
agent's calls to it by rewriting `model`. Each agent keeps two versions loaded: `active`
and `standby` (the rollback target), and a third while one is a `candidate` (on a canary
slice of new episodes, until `flywheel.proxy.rollout` promotes or rejects it). Older versions
are `retired` (rejected ones `rejected`) and unloaded once no call is in flight on them, so
calls finish on the version they started on. An episode stays on the version its first call
of the agent went to while that version is active, a candidate or the standby (a rejected
or rolled-back version serves no new call, so episodes open on it move to what serves). The registry
lives in the store's `adapters` table; a restarted proxy reloads it into vLLM.

With several vLLM replicas (`flywheel.proxy.replicas`) a version is loaded into every live one
before it is routed, and a replica that joins or returns is given every routable version
before it takes new episodes (`sync`, each `adapter_check_s`).

Recovery: a version vLLM refuses to load at restore is marked `failed` and its agent falls
back to its newest loadable version (or the base model); a restarted vLLM (the proxy polls
its model list) gets every loaded version back; loads and unloads of one name never overlap;
a version goes live only once it is persisted. Adapters are taken only from `adapter_roots`
and only as safetensors (a pickled `.bin` runs code when loaded).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from flywheel.proxy.canary import in_canary
from flywheel.proxy.errors import ApiError
from flywheel.proxy.replicas import Replica, Replicas
from flywheel.store.records import AdapterRow
from flywheel.store.writer import BatchWriter

log = logging.getLogger("flywheel.adapters")

CANDIDATE, ACTIVE, STANDBY = "candidate", "active", "standby"
RETIRED, ROLLED_BACK, REJECTED, FAILED = "retired", "rolled_back", "rejected", "failed"
_UNSERVED = (RETIRED, ROLLED_BACK, REJECTED)  # unloaded once no call is in flight on them
_PINNABLE = (ACTIVE, CANDIDATE, STANDBY)  # an episode begun on one of these stays on it
_MAX_PINS = 100_000  # episodes whose version is remembered; the oldest are forgotten first
_AGENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_WEIGHTS = "adapter_model.safetensors"


@dataclass
class Version:
    row: AdapterRow
    in_flight: int = 0
    loaded: bool = False

    @property
    def served_name(self) -> str:
        return self.row.served_name


def validate_adapter_dir(path: str, max_rank: int, roots: tuple[str, ...]) -> Path:
    """A loadable PEFT LoRA directory inside one of `roots`, within vLLM's rank limit, or a
    400/403 saying what is wrong."""
    try:
        directory = Path(path).expanduser().resolve()  # symlinks resolved: a link out of a root is outside it
    except (ValueError, OSError, RuntimeError) as bad:  # a NUL byte, a symlink loop
        raise ApiError(400, f"'path' is not a usable directory path: {bad}", "invalid_adapter") from None
    if not roots:
        raise ApiError(403, "adapter registration is off: set [proxy] adapter_roots (FLYWHEEL_PROXY_ADAPTER_ROOTS) "
                            "to the directories adapters may come from", "adapter_roots_unset")
    if not any(directory.is_relative_to(Path(root).expanduser().resolve()) for root in roots):
        raise ApiError(403, f"{directory} is outside adapter_roots ({', '.join(roots)})", "outside_adapter_roots")
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
    if not (directory / _WEIGHTS).is_file():
        pickled = " (adapter_model.bin is a pickle, which runs code when loaded: save with safe_serialization)" \
            if (directory / "adapter_model.bin").exists() else ""
        raise ApiError(400, f"{directory} has no {_WEIGHTS}{pickled}", "invalid_adapter")
    return directory


class Registry:
    def __init__(self, writer: BatchWriter, replicas: Replicas, default_base_model: str | None, max_lora_rank: int,
                 adapter_roots: tuple[str, ...] = (), canary_fraction: float = 0.2, canary_seed: int = 0):
        self._writer = writer
        self._replicas = replicas
        self.default_base_model = default_base_model
        self.max_lora_rank = max_lora_rank
        self.adapter_roots = adapter_roots
        self.versions: dict[str, list[Version]] = {}  # agent -> versions, oldest first
        self.active: dict[str, Version] = {}
        self.candidates: dict[str, Version] = {}  # agent -> its undecided candidate
        self.canary_fraction, self.canary_seed = canary_fraction, canary_seed
        self._pins: OrderedDict[tuple[str, str], Version | None] = OrderedDict()  # (agent, episode) -> version
        self._lock = asyncio.Lock()  # one registry change at a time
        self._name_locks: dict[str, asyncio.Lock] = {}  # one load or unload of a name at a time
        self.restored = False  # every active and standby version was loaded (or marked failed) at start
        self.reloads = 0  # versions loaded again into a replica that had lost them (a restart)
        # being registered: loaded into the replicas, not yet in `versions`; a replica syncing now gets them too
        self._incoming: dict[str, Version] = {}

    # ---- the hot path -------------------------------------------------------

    def route(self, agent: str, requested_model: str | None, episode_id: str) -> Version | None:
        """The version to serve this call with (counted in flight), or None for the base model."""
        active, candidate = self.active.get(agent), self.candidates.get(agent)
        serving = active or candidate
        if serving is None:
            return None
        base = serving.row.base_model
        if base is not None and requested_model not in (None, base):
            return None  # the client asked for another model: leave it alone
        version = self._episode_version(agent, episode_id, active, candidate)
        if version is not None:
            version.in_flight += 1
        return version

    def _episode_version(self, agent: str, episode_id: str, active: Version | None,
                         candidate: Version | None) -> Version | None:
        """The version the episode began on, if it still serves; else the canary slice's pick, remembered."""
        key = (agent, episode_id)
        if key in self._pins:
            pinned = self._pins[key]
            if pinned is None and (active is None or not self._has_standby(agent)) or pinned is not None \
                    and pinned.loaded and pinned.row.status in _PINNABLE:
                return pinned  # the base model is the standby while no version is
        version = candidate if candidate is not None and (
            in_canary(episode_id, self.canary_seed, self.canary_fraction)) else active
        self._pins[key] = version
        if len(self._pins) > _MAX_PINS:
            self._pins.popitem(last=False)
        return version

    def _has_standby(self, agent: str) -> bool:
        return any(v.row.status == STANDBY for v in self.versions.get(agent, ()))

    def hold(self, version: Version) -> None:
        """Keep a version loaded for work still to be done on it (shadow samples); `release` it after."""
        version.in_flight += 1

    def release(self, version: Version) -> None:
        version.in_flight -= 1
        if version.in_flight == 0 and version.row.status in _UNSERVED and version.loaded:
            asyncio.get_running_loop().create_task(self._unload(version))

    # ---- changes ------------------------------------------------------------

    async def register(self, agent: str, path: str, base_model: str | None, canary: bool = False) -> Version:
        """A new version: active at once, or with `canary` a candidate on the canary slice (replacing
        an undecided older candidate, which is rejected)."""
        if not _AGENT_NAME.match(agent):
            raise ApiError(400, f"agent name {agent!r} must match {_AGENT_NAME.pattern}", "invalid_agent")
        directory = await asyncio.to_thread(validate_adapter_dir, path, self.max_lora_rank, self.adapter_roots)
        async with self._lock:
            history = self.versions.get(agent, [])
            number = max((v.row.version for v in history), default=0) + 1
            now = datetime.now(timezone.utc)
            new = Version(AdapterRow(
                served_name=f"{agent}-v{number}", agent=agent, version=number, path=str(directory),
                base_model=base_model or self.default_base_model, created_at=now,
                status=CANDIDATE if canary else ACTIVE, live_at=None if canary else now,
            ))
            self._incoming[new.served_name] = new
            try:
                await self._load(new)
                try:  # live only once persisted: a version the store does not have must never serve
                    await self._persist(new)
                except Exception as failure:
                    await self._unload(new, force=True)
                    raise ApiError(503, f"{new.served_name} loaded but could not be recorded ({failure}); "
                                        "not put live", "store_unavailable") from None
                history.append(new)
                self.versions[agent] = history
            finally:
                del self._incoming[new.served_name]
            older = self.candidates.pop(agent, None)
            if older is not None:
                await self._decide(older, REJECTED, f"replaced by {new.served_name} before a decision")
            if canary:
                self.candidates[agent] = new  # from here on the canary slice of new episodes goes to it
            else:
                await self._make_active(new)
            self._unload_idle(agent)
            return new

    async def promote(self, agent: str, reason: str, comparison: str | None = None) -> Version:
        """The agent's candidate becomes active; the active one becomes the standby."""
        async with self._lock:
            candidate = self._candidate(agent)
            now = datetime.now(timezone.utc)
            candidate.row = dataclasses.replace(candidate.row, live_at=now, decided_at=now, reason=reason,
                                                comparison=comparison or candidate.row.comparison)
            del self.candidates[agent]
            await self._make_active(candidate)
            self._unload_idle(agent)
            return candidate

    async def reject(self, agent: str, reason: str, comparison: str | None = None) -> Version:
        """The agent's candidate stops serving new episodes (calls in flight finish on it) and is unloaded."""
        async with self._lock:
            candidate = self._candidate(agent)
            if comparison is not None:
                candidate.row = dataclasses.replace(candidate.row, comparison=comparison)
            del self.candidates[agent]
            await self._decide(candidate, REJECTED, reason)
            self._unload_idle(agent)
            return candidate

    async def record(self, version: Version, comparison: str) -> None:
        """Keep the latest comparison (or watch) of a version in its row."""
        version.row = dataclasses.replace(version.row, comparison=comparison)
        await self._persist(version)

    def _candidate(self, agent: str) -> Version:
        if agent not in self.candidates:
            raise ApiError(409, f"agent {agent!r} has no candidate to decide on", "no_candidate")
        return self.candidates[agent]

    async def _make_active(self, new: Version) -> None:
        """`new` serves the agent from here on; the active version becomes the standby, the standby retires."""
        before = self.active.get(new.row.agent)
        changed = [new]
        new.row = dataclasses.replace(new.row, status=ACTIVE, live_at=new.row.live_at or datetime.now(timezone.utc))
        for older in self.versions[new.row.agent]:
            if older is before or older.row.status == STANDBY and older is not new:
                older.row = dataclasses.replace(older.row, status=STANDBY if older is before else RETIRED)
                changed.append(older)
        self.active[new.row.agent] = new  # routed and shown at once, whole; persisted next
        for version in changed:
            await self._persist(version)

    async def _decide(self, version: Version, status: str, reason: str) -> None:
        version.row = dataclasses.replace(version.row, decided_at=datetime.now(timezone.utc), reason=reason)
        await self._set_status(version, status)

    async def rollback(self, agent: str, reason: str = "rolled back by hand") -> Version | None:
        """Back to the standby version (or the base model); returns what now serves."""
        async with self._lock:
            current = self.active.get(agent)
            if current is None:
                raise ApiError(409, f"agent {agent!r} is on the base model: nothing to roll back", "nothing_to_roll_back")
            history = self.versions[agent]
            target = next((v for v in reversed(history) if v.row.status == STANDBY), None)
            if target is not None and not target.loaded:
                await self._load(target)
            # route first: from here on no new call reaches `current`, which can then go
            if target is None:
                del self.active[agent]
            else:
                self.active[agent] = target
            await self._decide(current, ROLLED_BACK, reason)
            if target is not None:
                target.row = dataclasses.replace(target.row, live_at=datetime.now(timezone.utc))
                await self._set_status(target, ACTIVE)
                below = next((v for v in reversed(history)
                              if v.row.status == RETIRED and v.row.version < target.row.version), None)
                if below is not None:  # the next rollback target; loaded when needed
                    await self._set_status(below, STANDBY)
            self._unload_idle(agent)
            return target

    async def restore(self, rows: list[AdapterRow]) -> None:
        """Rebuild from the store, then load every active and standby version into vLLM.

        Unreachable vLLM: retried with a back-off. A version vLLM refuses: marked failed, and
        an agent whose active version failed falls back to its newest loadable one, or the base.
        """
        for row in rows:
            version = Version(row)
            self.versions.setdefault(row.agent, []).append(version)
            if row.status == ACTIVE:
                self.active[row.agent] = version
            elif row.status == CANDIDATE:
                self.candidates[row.agent] = version
        for agent in list(self.versions):
            async with self._lock:
                await self._restore_agent(agent)
        self.restored = True
        if rows:
            log.info("restored adapters: %s", {a: v.served_name for a, v in self.active.items()})

    async def _restore_agent(self, agent: str) -> None:
        for version in [v for v in self.versions[agent] if v.row.status in (ACTIVE, STANDBY, CANDIDATE)]:
            if await self._load_or_fail(version):
                continue
            if self.candidates.get(agent) is version:
                del self.candidates[agent]
            if self.active.get(agent) is not version:
                continue
            fallback = None
            for older in reversed(self.versions[agent]):
                if older.row.status in (STANDBY, RETIRED, ROLLED_BACK) and older.row.version < version.row.version \
                        and await self._load_or_fail(older):
                    fallback = older
                    break
            if fallback is None:
                del self.active[agent]
                log.error("agent %s falls back to the base model: %s failed to load", agent, version.served_name)
            else:
                await self._set_status(fallback, ACTIVE)
                self.active[agent] = fallback
                log.error("agent %s falls back to %s: %s failed to load", agent, fallback.served_name,
                          version.served_name)

    async def _load_or_fail(self, version: Version) -> bool:
        """Load, retrying while vLLM is unreachable; a refusal marks the version failed (False)."""
        delay = 0.5
        while True:
            try:
                await self._load(version)
                return True
            except ApiError as failure:
                if failure.status == 502:  # unreachable or failing: vLLM may still be starting
                    log.warning("restoring %s: %s; retrying in %.0f s", version.served_name, failure.message, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10)
                    continue
                log.error("%s cannot be loaded, marked failed: %s", version.served_name, failure.message)
                await self._set_status(version, FAILED)
                return False

    # ---- the vLLM replicas ---------------------------------------------------

    def _routable(self) -> list[Version]:
        """What every live replica must hold: the versions that serve, may serve next (a loaded
        standby) or are being registered."""
        held = {v.served_name: v for vs in self.versions.values() for v in vs
                if v.row.status in (ACTIVE, CANDIDATE) or (v.row.status == STANDBY and v.loaded)}
        return [*held.values(), *(v for name, v in self._incoming.items() if name not in held)]

    async def watch_upstream(self, interval_s: float) -> None:
        """Forever: sync every replica (a restarted or returning vLLM gets its adapters back)."""
        while True:
            await asyncio.gather(*(self._sync_logged(replica) for replica in self._replicas.replicas))
            await asyncio.sleep(interval_s)

    async def _sync_logged(self, replica: Replica) -> None:
        try:
            await self.sync(replica)
        except Exception:  # a bad answer must not end the watch
            log.exception("adapter check of %s failed", replica.url)

    async def sync(self, replica: Replica) -> None:
        """Look at a replica's model list: down if it does not answer; else load whatever it lacks
        of the routable versions, unload what it holds of those no longer served, and mark it live.
        The last look and `live` happen in one step, so a version registered meanwhile is not missed
        (it is `_incoming` from before its first load until it is in `versions`)."""
        try:
            listed = set(await replica.models())
            while missing := [v for v in self._routable() if v.served_name not in listed]:
                for version in missing:
                    async with self._name_lock(version):
                        fresh = await self._load_on(replica, version)
                    if fresh and version.served_name in replica.held:
                        log.warning("vLLM at %s had lost %s (restarted?): loaded it again", replica.url,
                                    version.served_name)
                        self.reloads += 1
                    replica.held.add(version.served_name)
                    listed.add(version.served_name)
        except ApiError as failure:
            self._replicas.mark_down(replica, failure.message)
            return
        self._replicas.mark_live(replica)
        for version in [v for vs in self.versions.values() for v in vs if v.served_name in listed and not v.loaded
                        and v.in_flight == 0 and v.row.status in (*_UNSERVED, FAILED)]:
            await self._unload_from(replica, version)  # left from before a proxy restart, or missed while down

    # ---- several proxies on one store ---------------------------------------

    async def follow(self, interval_s: float) -> None:
        """Forever, on a store that other proxies write too: take the registry changes they made
        (versions registered, promoted, rejected, rolled back) within `interval_s` plus a load."""
        seen = None
        while True:
            await asyncio.sleep(interval_s)
            try:
                changed = await self._writer.read(self._writer.store.adapters_changed_at)
                if changed != seen:
                    await self.take_changes()
                    seen = changed
            except Exception:  # the store or vLLM failing now must not end the watch: the next round retries
                log.exception("following the shared registry failed")

    async def take_changes(self) -> None:
        """Apply the store's adapter rows that differ from ours. Under the registry's lock, after a
        flush: every change of ours is then committed, so a row read back is never older than ours.
        A version now routable is loaded before it is routed; one whose load fails keeps its old
        row here, so the next round tries again."""
        async with self._lock:
            await self._writer.flush()
            rows = await self._writer.read(self._writer.store.adapter_rows)
            known = {v.served_name: v for vs in self.versions.values() for v in vs}
            changed: set[str] = set()
            for row in rows:
                version = known.get(row.served_name)
                if version is not None and _same_row(version.row, row):
                    continue
                if version is None:
                    version = Version(dataclasses.replace(row, status=RETIRED))  # served once loaded
                    self.versions.setdefault(row.agent, []).append(version)
                    self.versions[row.agent].sort(key=lambda v: v.row.version)
                if row.status in (ACTIVE, CANDIDATE) and not version.loaded:
                    try:
                        await self._load(version)
                    except ApiError as failure:
                        log.warning("%s, set %s by another proxy: %s", row.served_name, row.status, failure.message)
                        continue
                version.row = row
                changed.add(row.agent)
            for agent in changed:
                by_status = {v.row.status: v for v in self.versions[agent]}  # the newest of each status
                for serving, status in ((self.active, ACTIVE), (self.candidates, CANDIDATE)):
                    if status in by_status:
                        serving[agent] = by_status[status]
                    else:
                        serving.pop(agent, None)
                self._unload_idle(agent)
            if changed:
                log.info("took registry changes from the store: %s", ", ".join(sorted(changed)))

    def restore_detail(self) -> str:
        failed = [v.served_name for vs in self.versions.values() for v in vs if v.row.status == FAILED]
        state = "restored" if self.restored else "restoring"
        return f"{state}; failed: {', '.join(failed)}" if failed else state

    # ---- helpers ------------------------------------------------------------

    def snapshot(self) -> dict:
        return {"agents": {
            agent: {
                "current": self.active[agent].served_name if agent in self.active else None,
                "candidate": self.candidates[agent].served_name if agent in self.candidates else None,
                "history": [{**row_json(v.row), "state": v.row.status, "in_flight": v.in_flight, "loaded": v.loaded}
                            for v in versions],
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
            if version.loaded and version.in_flight == 0 and version.row.status in _UNSERVED:
                asyncio.get_running_loop().create_task(self._unload(version))

    def _name_lock(self, version: Version) -> asyncio.Lock:
        return self._name_locks.setdefault(version.served_name, asyncio.Lock())

    async def _load(self, version: Version) -> None:
        """Into every live replica (every replica while none is), and into any that goes live
        meanwhile, before anything routes to it. A refusal anywhere unloads it again and is
        raised; replicas that cannot be reached are marked down (they get it when they return);
        none reached is a 502."""
        async with self._name_lock(version):
            if version.loaded:
                return
            tried: list[Replica] = []
            loaded: list[Replica] = []
            unreachable: ApiError | None = None
            refusal: BaseException | None = None
            while fresh := [r for r in (self._replicas.live() or self._replicas.replicas) if r not in tried]:
                tried += fresh
                results = await asyncio.gather(*(self._load_on(r, version) for r in fresh), return_exceptions=True)
                for replica, result in zip(fresh, results):
                    if isinstance(result, bool):
                        loaded.append(replica)
                        replica.held.add(version.served_name)
                    elif isinstance(result, ApiError) and result.status == 502:
                        self._replicas.mark_down(replica, result.message)
                        unreachable = result
                    else:
                        refusal = result
            if refusal is not None or not loaded:
                for replica in loaded:
                    await self._unload_from(replica, version)
                raise refusal or unreachable
            version.loaded = True

    async def _load_on(self, replica: Replica, version: Version) -> bool:
        """Load `version` into one replica; False if it was there already (loaded meanwhile, or
        before a proxy restart)."""
        status, text = await self._post_load(replica, version)
        if status != 200 and "has already been loaded" in text:
            if await self._loaded_path(replica, version) == version.row.path:  # ours
                return False
            # loaded by someone else, or from another directory: its weights are not ours
            log.warning("%s was already in vLLM at %s: replacing it with %s", version.served_name, replica.url,
                        version.row.path)
            await replica.admin.post("unload_lora_adapter", {"lora_name": version.served_name})
            status, text = await self._post_load(replica, version)
        if status != 200:
            raise ApiError(502 if status >= 500 else 400,
                           f"vLLM at {replica.url} refused to load {version.served_name} from {version.row.path}: "
                           f"{text}", "adapter_load_failed")
        return True

    @staticmethod
    async def _loaded_path(replica: Replica, version: Version) -> str | None:
        """The directory vLLM loaded `version`'s name from, if it lists it (None without a list:
        then the version is loaded again)."""
        try:
            return (await replica.models()).get(version.served_name)
        except ApiError:
            return None

    @staticmethod
    async def _post_load(replica: Replica, version: Version) -> tuple[int, str]:
        return await replica.admin.post("load_lora_adapter",
                                        {"lora_name": version.served_name, "lora_path": version.row.path})

    async def _unload(self, version: Version, force: bool = False) -> None:
        """Unload a version no call uses and nothing needs (re-checked under the name's lock, so an
        unload queued before a rollback revived the version does nothing); `force`: regardless.
        Replicas down now are cleaned when they return (`sync`)."""
        async with self._name_lock(version):
            needed = (version.in_flight or version.row.status not in (*_UNSERVED, FAILED)
                      or self.active.get(version.row.agent) is version)
            if not version.loaded or (needed and not force):
                return
            version.loaded = False
            for replica in self._replicas.replicas:
                if replica.up:
                    await self._unload_from(replica, version)

    @staticmethod
    async def _unload_from(replica: Replica, version: Version) -> None:
        replica.held.discard(version.served_name)
        try:
            status, text = await replica.admin.post("unload_lora_adapter", {"lora_name": version.served_name})
            if status != 200:
                log.warning("vLLM at %s did not unload %s: %s", replica.url, version.served_name, text)
        except ApiError as failure:
            log.warning("unloading %s from %s: %s", version.served_name, replica.url, failure.message)


def _same_row(ours: AdapterRow, stored: AdapterRow) -> bool:
    """Equal but for how the store round-trips timestamps (precision, time zone)."""
    return all(getattr(ours, f.name) == getattr(stored, f.name) or
               isinstance(getattr(ours, f.name), datetime) and getattr(stored, f.name) is not None
               and abs((getattr(ours, f.name) - getattr(stored, f.name)).total_seconds()) < 1e-3
               for f in dataclasses.fields(AdapterRow))


def row_json(row: AdapterRow) -> dict:
    fields = dataclasses.asdict(row)
    return {**fields, **{name: value.isoformat() for name, value in fields.items() if isinstance(value, datetime)},
            "comparison": json.loads(row.comparison) if row.comparison else None}

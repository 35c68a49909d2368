"""The access rules, live: reloaded from the configuration without a restart.

`flywheel serve` reloads on SIGHUP, and `POST /v1/admin/reload` (admin key) does the same and
answers what changed. What reloads (`RELOADABLE`): the keys (`api_keys`, `admin_keys`,
`[[proxy.keys]]`), the agent rules (`[[proxy.agents]]`) and redaction (`redact`,
`redact_restore`): rotating a key, tightening a tenant's policy or limits, adding a detector.
A new configuration that could not serve (a short key, no keys on a public address, a bad
regex) is refused whole and the running rules stay. Other settings need a restart; the reply
names those that changed. Each reload is audited (the names of what changed, never a key).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

from flywheel.proxy.auth import Keys, check_bind
from flywheel.proxy.config import ProxyConfig
from flywheel.proxy.redaction import Detector, detectors
from flywheel.proxy.sampling import checked_defaults
from flywheel.store.records import AuditEntry
from flywheel.store.writer import BatchWriter

log = logging.getLogger("flywheel.proxy")

RELOADABLE = ("api_keys", "admin_keys", "keys", "agents", "redact", "redact_restore")

Loader = Callable[[], ProxyConfig]  # the configuration as the file and environment say now


class Rules:
    """The reloadable part of the configuration, as the handlers and the key check read it."""

    def __init__(self, config: ProxyConfig):
        self._set(config)

    def _set(self, config: ProxyConfig) -> None:
        check_bind(config)  # InsecureConfig (a ValueError) for keys or a bind that would expose the store
        found = detectors(config.redact)  # UnknownDetector (a ValueError)
        self.config, self.keys = config, Keys(config)
        self.detectors: list[Detector] = found

    def reload(self, fresh: ProxyConfig) -> dict[str, list[str]]:
        """Take `fresh`'s reloadable settings (ValueError, and nothing taken, if they cannot serve);
        returns {"changed": [...], "needs_restart": [...]} (setting names)."""
        current = self.config
        changed = [name for name in RELOADABLE if getattr(fresh, name) != getattr(current, name)]
        needs_restart = [f.name for f in dataclasses.fields(ProxyConfig)
                         if f.name not in RELOADABLE and getattr(fresh, f.name) != getattr(current, f.name)]
        self._set(dataclasses.replace(current, **{name: getattr(fresh, name) for name in RELOADABLE}))
        return {"changed": changed, "needs_restart": needs_restart}


class NothingToReload(RuntimeError):
    """The proxy was built from code, not from a configuration file and the environment."""


async def reload_rules(rules: Rules, load: Loader | None, writer: BatchWriter, key_id: str | None) -> dict:
    """Load the configuration again and take its reloadable settings; audited. ValueError (with
    the running rules kept) for a configuration that cannot be read or could not serve."""
    if load is None:
        raise NothingToReload("this proxy was not started from a configuration (flywheel serve): nothing to reload")
    fresh = load()  # ConfigError (a ValueError) for a file or variable it cannot use
    result = rules.reload(dataclasses.replace(fresh, sampling_defaults=checked_defaults(fresh.sampling_defaults)))
    await writer.put(AuditEntry.now(key_id, "config_reload", detail=result))
    log.info("configuration reloaded: changed %s; needing a restart %s", result["changed"] or "nothing",
             result["needs_restart"] or "nothing")
    return result

"""Names of the Redis keys zhuge writes and reads: every writer and reader builds them here.

Two layouts, same data (README "Redis keys and queries"):

- **single node** (or a managed Redis without cluster mode), the contract layout:
  ``<prefix>vm:<vm>``, ``<prefix>curve:<vm>``, ``<prefix>rank:now|window|best``,
  ``<prefix>host:<host>``, ``<prefix>hosts``, ``<prefix>worker:<worker>``.
- **Redis Cluster** (``ZHUGE_REDIS_CLUSTER=true``): keys carry hash tags, so that
  what one atomic script touches lives in one slot. A VM's hash and curve share
  the VM id's slot, ``<prefix>vm:{<vm>}`` and ``<prefix>curve:{<vm>}``; the
  fleet-wide index (ranks, host sets, the host list, and ``{fleet}:vms``, the
  index's own newer-wins record VM -> ``"<last_ts> <host>"``) shares the
  ``{fleet}`` slot: ``<prefix>{fleet}:rank:now``, ``<prefix>{fleet}:host:<host>``,
  ``<prefix>{fleet}:hosts``. A VM id containing ``}`` (which would end the tag
  early, or leave it empty) is tagged with the first 16 hex digits of its SHA-1
  instead, the id following the tag: ``<prefix>vm:{<sha1>}<vm>``. Worker markers
  are one per primary, ``<prefix>worker:{<tag>}<worker>`` with a tag hashing to
  a slot of that primary.

Keys that are one key whatever the layout (``correction``, ``drain:<host>``, the
``models`` pub/sub channel, which Redis Cluster broadcasts to every node) are the
same in both.
"""

from __future__ import annotations

import hashlib
from typing import Any

FLEET_TAG = "{fleet}"
CORRECTION = "correction"


def is_cluster_client(client: Any) -> bool:
    """True for redis-py's ``RedisCluster`` clients (asyncio or not): they get the cluster layout."""
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.cluster import RedisCluster

    return isinstance(client, AsyncRedisCluster | RedisCluster)


class RedisKeys:
    """The key names under ``prefix`` in the single-node (``cluster=False``) or Redis Cluster layout."""

    __slots__ = ("prefix", "cluster", "_fleet")

    def __init__(self, prefix: str, cluster: bool = False) -> None:
        if cluster and ("{" in prefix or "}" in prefix):
            raise ValueError(f"Redis prefix {prefix!r}: no braces with Redis Cluster (they would change the hash tags)")
        self.prefix = prefix
        self.cluster = cluster
        self._fleet = prefix + FLEET_TAG + ":" if cluster else prefix

    @classmethod
    def for_client(cls, client: Any, prefix: str) -> RedisKeys:
        """The layout that goes with ``client``: cluster for a ``RedisCluster``, single node otherwise."""
        return cls(prefix, cluster=is_cluster_client(client))

    def __repr__(self) -> str:
        return f"RedisKeys({self.prefix!r}, cluster={self.cluster})"

    # --- per VM --------------------------------------------------------------------
    def vm_tag(self, vm: str) -> str:
        """What goes between the braces of the VM's keys (cluster layout)."""
        return hashlib.sha1(vm.encode()).hexdigest()[:16] if "}" in vm else vm

    def _per_vm(self, kind: str, vm: str) -> str:
        if not self.cluster:
            return f"{self.prefix}{kind}:{vm}"
        if "}" in vm:
            return f"{self.prefix}{kind}:{{{self.vm_tag(vm)}}}{vm}"
        return f"{self.prefix}{kind}:{{{vm}}}"

    def vm(self, vm: str) -> str:
        """The VM's score hash."""
        return self._per_vm("vm", vm)

    def curve(self, vm: str) -> str:
        """The VM's downtime curve (``streams.curve``), written with its hash."""
        return self._per_vm("curve", vm)

    # --- fleet-wide index -------------------------------------------------------------
    @property
    def rank_now(self) -> str:
        return self._fleet + "rank:now"

    @property
    def rank_window(self) -> str:
        return self._fleet + "rank:window"

    @property
    def rank_best(self) -> str:
        return self._fleet + "rank:best"

    @property
    def ranks(self) -> tuple[str, str, str]:
        return self.rank_now, self.rank_window, self.rank_best

    @property
    def host_prefix(self) -> str:
        """``host(h) == host_prefix + h``."""
        return self._fleet + "host:"

    def host(self, host: str) -> str:
        """The set of the host's VM ids."""
        return self.host_prefix + host

    @property
    def hosts(self) -> str:
        """The set of host names with scored VMs."""
        return self._fleet + "hosts"

    @property
    def vms(self) -> str:
        """Cluster layout only: the index's record VM -> ``"<last_ts> <host>"`` (newer wins on it)."""
        if not self.cluster:
            raise AttributeError("the single-node layout has no index record (ranks and hash are written atomically)")
        return self._fleet + "vms"

    # --- other keys ----------------------------------------------------------------
    def worker(self, worker: str, tag: str | None = None) -> str:
        """A worker's "Redis still holds my writes" marker (cluster: one per primary, ``tag`` hashing to it)."""
        if tag is None:
            return f"{self.prefix}worker:{worker}"
        return f"{self.prefix}worker:{{{tag}}}{worker}"

    def drain(self, host: str) -> str:
        """The latest drain plan computed for the host (JSON)."""
        return f"{self.prefix}drain:{host}"

    @property
    def correction(self) -> str:
        """The learned downtime correction (JSON, ``streams.migrations``)."""
        return self.prefix + CORRECTION

    @property
    def models_channel(self) -> str:
        """The pub/sub channel announcing published models."""
        return self.prefix + "models"

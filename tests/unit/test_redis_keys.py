"""Redis key names: the single-node layout is the contract's, the cluster layout keeps each atomic step in one slot."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from app.settings import Settings
from streams.redis_keys import RedisKeys, is_cluster_client


def _slot(key: str) -> int:
    return key_slot(key.encode())


def test_single_node_names_are_the_contract_ones() -> None:
    k = RedisKeys("zhuge:")
    assert (k.vm("vm-1"), k.curve("vm-1")) == ("zhuge:vm:vm-1", "zhuge:curve:vm-1")
    assert k.ranks == ("zhuge:rank:now", "zhuge:rank:window", "zhuge:rank:best")
    assert (k.host("h 1"), k.host_prefix, k.hosts) == ("zhuge:host:h 1", "zhuge:host:", "zhuge:hosts")
    assert (k.worker("w1"), k.drain("h1"), k.correction, k.models_channel) == (
        "zhuge:worker:w1", "zhuge:drain:h1", "zhuge:correction", "zhuge:models")  # fmt: skip
    assert k.vm("a}b{") == "zhuge:vm:a}b{"  # no tags, ids verbatim
    with pytest.raises(AttributeError):
        _ = k.vms


@pytest.mark.parametrize("vm", ["vm-1", "a{b", "{x}", "}", "}lead", "a}b}", "ünï cødé", "x" * 256])
def test_cluster_names_put_a_vms_hash_and_curve_in_one_slot(vm: str) -> None:
    k = RedisKeys("zhuge:", cluster=True)
    assert _slot(k.vm(vm)) == _slot(k.curve(vm))
    assert k.vm(vm).startswith("zhuge:vm:{") and vm in k.vm(vm)
    if "}" not in vm:
        assert k.vm(vm) == f"zhuge:vm:{{{vm}}}" and _slot(k.vm(vm)) == _slot(vm)


def test_cluster_names_are_distinct_per_vm_even_with_braces() -> None:
    k = RedisKeys("p:", cluster=True)
    vms = ["a", "a}", "}a", "a}}", "{a}", "}", "}}", "_}}", "a}b", "a}b}"]
    assert len({k.vm(vm) for vm in vms}) == len(vms)


def test_cluster_fleet_index_shares_one_slot() -> None:
    k = RedisKeys("zhuge:", cluster=True)
    assert k.rank_now == "zhuge:{fleet}:rank:now" and k.host("h1") == "zhuge:{fleet}:host:h1"
    assert k.hosts == "zhuge:{fleet}:hosts" and k.vms == "zhuge:{fleet}:vms"
    keys = [*k.ranks, k.hosts, k.vms, k.host("h1"), k.host("{odd}"), k.host_prefix + "x"]
    assert len({_slot(x) for x in keys}) == 1
    assert k.worker("w1", "m3") == "zhuge:worker:{m3}w1" and _slot(k.worker("w{1}", "m3")) == _slot("m3")
    assert k.correction == "zhuge:correction" and k.drain("h1") == "zhuge:drain:h1"


def test_cluster_prefix_without_braces() -> None:
    with pytest.raises(ValueError, match="no braces"):
        RedisKeys("a{b}:", cluster=True)
    assert RedisKeys("a{b}:").vm("x") == "a{b}:vm:x"  # single node: anything goes


def test_the_setting_parses_and_is_checked() -> None:
    assert Settings.from_env({}).redis_cluster is False
    for raw, want in (("true", True), ("True", True), ("1", True), ("yes", True), ("false", False), ("OFF", False)):
        assert Settings.from_env({"ZHUGE_REDIS_CLUSTER": raw}).redis_cluster is want
    with pytest.raises(ValueError, match="ZHUGE_REDIS_CLUSTER='maybe': expected true or false"):
        Settings.from_env({"ZHUGE_REDIS_CLUSTER": "maybe"})
    with pytest.raises(ValueError, match="database 0 only"):
        Settings.from_env({"ZHUGE_REDIS_CLUSTER": "true", "ZHUGE_REDIS_URL": "redis://127.0.0.1:7000/1"})
    with pytest.raises(ValueError, match="must not contain braces"):
        Settings.from_env({"ZHUGE_REDIS_CLUSTER": "true", "ZHUGE_REDIS_PREFIX": "{z}:"})
    Settings.from_env({"ZHUGE_REDIS_CLUSTER": "true", "ZHUGE_REDIS_URL": "rediss://:pw@127.0.0.1:7000"})


async def test_the_clients_and_the_sink_follow_the_setting() -> None:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    from streams.sinks.redis_cluster import ClusterRedisSink
    from streams.sinks.redis_sink import RedisSink

    single = Settings.from_env({}, redis_url="redis://127.0.0.1:1/0")
    cluster = single.replace(redis_cluster=True)
    one, many = single.redis_client(), cluster.redis_client()  # asyncio clients connect lazily
    try:
        assert isinstance(one, Redis) and not is_cluster_client(one)
        assert isinstance(many, RedisCluster) and is_cluster_client(many)
        assert type(RedisSink(single, one)) is RedisSink and type(RedisSink(cluster, many)) is ClusterRedisSink
        assert RedisKeys.for_client(many, "z:").cluster and not RedisKeys.for_client(one, "z:").cluster
        assert cluster.redis_keys().cluster and not single.redis_keys().cluster
    finally:
        await one.aclose()
        await many.aclose()

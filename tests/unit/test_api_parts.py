"""Small parts of the web service that need no Redis: exposure rule, wrk output parsing."""

from __future__ import annotations

import pytest

from api.service import check_exposure, is_loopback
from app.settings import Settings
from bench.api_load import parse_wrk, wrk_script

WRK_OUTPUT = """Running 20s test @ http://127.0.0.1:8000
  1 threads and 20 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.52ms  612.00us  18.31ms   91.20%
    Req/Sec     2.01k    95.33     2.20k    71.00%
  Latency Distribution
     50%    1.41ms
     75%    1.70ms
     90%    2.05ms
     99%    3.90ms
  40012 requests in 20.00s, 52.10MB read
  Non-2xx or 3xx responses: 3
Requests/sec:   2000.55
Transfer/sec:      2.60MB
"""


def test_wrk_summary_is_read_in_milliseconds() -> None:
    r = parse_wrk(WRK_OUTPUT)
    assert r["requests_per_s"] == 2000.55 and r["requests"] == 40012 and r["non_2xx"] == 3
    assert (r["p50_ms"], r["p90_ms"], r["p99_ms"]) == (1.41, 2.05, 3.90)
    assert parse_wrk(WRK_OUTPUT.replace("3.90ms", "1.20s"))["p99_ms"] == 1200.0
    with pytest.raises(ValueError, match="no summary"):
        parse_wrk("wrk: connection refused")


def test_the_wrk_script_paces_only_when_asked_and_quotes_ids() -> None:
    assert "delay" not in wrk_script(["vm-1"], 0)
    script = wrk_script(['we"ird', "vm-2"], 9.0)
    assert 'return 9.0' in script and '"we\\"ird"' in script


def test_beyond_loopback_the_api_needs_a_token() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    check_exposure(Settings.from_env({}))  # loopback, no token: fine
    with pytest.raises(ValueError, match="ZHUGE_API_TOKEN"):
        check_exposure(Settings.from_env({}, api_host="0.0.0.0"))
    check_exposure(Settings.from_env({}, api_host="0.0.0.0", api_token="t"))
    assert "topsecret" not in repr(Settings.from_env({}, api_token="topsecret"))  # a secret, masked like passwords

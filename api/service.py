"""The FastAPI app of ``zhuge api``: routes, JSON errors, the bearer token, request metrics, the web page.

Stateless: every answer is read from Redis when asked, so replicas need no
coordination. Errors are ``{"error": code, "reason": sentence}`` with the HTTP
status that says what went wrong (404 unknown VM or host, 401 token, 422 bad
parameters, 503 Redis unreachable). Request counts and latency histograms live
in the app's own Prometheus registry (no process-global state), served at
``/metrics``.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from api.plans import PlanRefused, UnknownHost, plan_host_drain
from api.reads import ScoreReads
from app.settings import Settings

STATIC_DIR = Path(__file__).with_name("static")
_ENCODE = msgspec.json.Encoder().encode


class FastJSON(JSONResponse):
    """msgspec's encoder: a VM with its 288-slot curve encodes several times faster than with ``json``.

    Routes return it themselves, so FastAPI skips its ``jsonable_encoder`` walk over every list item.
    """

    def render(self, content: Any) -> bytes:
        return _ENCODE(content)


class DrainRequest(BaseModel):
    host: str = Field(min_length=1, description="host to empty")
    deadline_s: float = Field(21600.0, gt=0, le=86400, description="every migration ends within this, s from now")
    max_concurrent: int | None = Field(None, ge=1, le=16, description="migrations at once (default ZHUGE_DRAIN_MAX_CONCURRENT)")


class ApiError(HTTPException):
    """An HTTP error with a short machine-readable code beside the reason."""

    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(status_code=status, detail=reason)
        self.code = code


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> None:
    """Refuse to serve beyond loopback without a token (the scores and plans are the fleet's layout)."""
    if not settings.api_token and not is_loopback(settings.api_host):
        raise ValueError(f"zhuge api on {settings.api_host} needs ZHUGE_API_TOKEN (a bearer token); "
                         "without one it only binds a loopback address")  # fmt: skip


class RequestMetrics:
    """Request counts and latency per route template, in a registry of the app's own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("zhuge_api_requests", "HTTP requests answered", ["method", "route", "status"],
                                registry=self.registry)  # fmt: skip
        self.latency = Histogram("zhuge_api_request_seconds", "time to answer a request", ["route"],
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
                                 registry=self.registry)  # fmt: skip

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)


def create_app(settings: Settings, client: Any = None) -> FastAPI:
    """The app; ``client``: an asyncio Redis client to use (default: one from the settings, closed at shutdown)."""
    check_exposure(settings)
    metrics = RequestMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = client is None
        app.state.reads = ScoreReads(settings.redis_client() if own else client, settings.redis_prefix)
        try:
            yield
        finally:
            if own:
                await app.state.reads.client.aclose()

    app = FastAPI(title="zhuge", version="1", default_response_class=FastJSON, lifespan=lifespan,
                  description="Migration-window scores, downtime curves and host drain plans of a VM fleet.")  # fmt: skip

    # dependencies are coroutines: FastAPI runs plain-function dependencies in a thread pool
    async def reads(request: Request) -> ScoreReads:
        return request.app.state.reads

    async def authorised(request: Request) -> None:
        if not settings.api_token:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), settings.api_token.encode()):
            raise ApiError(401, "unauthorized", "a valid bearer token is required (Authorization: Bearer <token>)")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = getattr(exc, "code", None) or {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return FastJSON({"error": code, "reason": str(exc.detail)}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Response:
        reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return FastJSON({"error": "bad_request", "reason": reasons}, status_code=422)

    @app.exception_handler(PlanRefused)
    async def refused(request: Request, exc: PlanRefused) -> Response:
        if isinstance(exc, UnknownHost):
            return FastJSON({"error": "not_found", "reason": str(exc)}, status_code=404)
        return FastJSON({"error": "bad_request", "reason": str(exc)}, status_code=422)

    @app.exception_handler(OSError)
    async def redis_down(request: Request, exc: Exception) -> Response:
        return FastJSON({"error": "redis_unavailable", "reason": f"cannot reach Redis at {settings.redis_address}: {exc}"},
                        status_code=503)  # fmt: skip

    import redis

    app.add_exception_handler(redis.RedisError, redis_down)

    # --- probes and metrics (no token: load balancers and Prometheus ask) ---------------------
    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, Any]:
        """The process answers."""
        return {"ok": True}

    @app.get("/readyz", tags=["ops"])
    async def readyz(r: ScoreReads = Depends(reads)) -> Response:
        """Ready when Redis answers."""
        try:
            await r.ping()
        except (OSError, redis.RedisError) as exc:
            return FastJSON({"ready": False, "reason": f"Redis at {settings.redis_address}: {exc}"}, status_code=503)
        return FastJSON({"ready": True})

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- the API ------------------------------------------------------------------------------
    v1 = [Depends(authorised)]

    @app.get("/v1/fleet", dependencies=v1, tags=["scores"])
    async def fleet(r: ScoreReads = Depends(reads)) -> FastJSON:
        """How many VMs can migrate within the downtime target now, only at their recommended window, not at all."""
        return FastJSON(await r.fleet(settings.downtime_target_ms))

    @app.get("/v1/vms/{vm}", dependencies=v1, tags=["scores"])
    async def vm(vm: str, r: ScoreReads = Depends(reads)) -> FastJSON:
        """The VM's score, its predicted downtime per future slot and the forecast quantiles behind it."""
        score, curve = await r.vm_with_curve(vm)
        if score is None:
            raise ApiError(404, "not_found", f"no score for VM {vm!r}: unknown, or not sampled for {settings.vm_ttl_s} s")
        return FastJSON({"vm": vm, "score": score, "curve": None if curve is None else curve.to_json()})

    @app.get("/v1/hosts", dependencies=v1, tags=["hosts"])
    async def hosts(r: ScoreReads = Depends(reads)) -> FastJSON:
        """Every host with scored VMs."""
        return FastJSON({"hosts": await r.hosts()})

    @app.get("/v1/hosts/{host}", dependencies=v1, tags=["hosts"])
    async def host(host: str, r: ScoreReads = Depends(reads)) -> FastJSON:
        """The host's VMs with their scores (best to migrate now first) and its latest drain plan."""
        rows = await r.host_scores(host)
        if not rows:
            raise ApiError(404, "not_found", f"no scored VMs on host {host!r}")
        return FastJSON({"host": host, "vms": rows, "drain": await r.stored_plan(host)})

    @app.get("/v1/candidates", dependencies=v1, tags=["scores"])
    async def candidates(
        n: int = Query(20, ge=1, le=1000), host: str | None = Query(None, min_length=1), r: ScoreReads = Depends(reads)
    ) -> FastJSON:
        """The best VMs to migrate now (lowest predicted downtime), fleet-wide or on one host."""
        return FastJSON({"n": n, "host": host, "candidates": await r.candidates(n, host)})

    @app.post("/v1/drain", dependencies=v1, tags=["hosts"])
    async def drain(req: DrainRequest, r: ScoreReads = Depends(reads)) -> FastJSON:
        """Plan the drain of a host: every VM's start, share of the link and predicted downtime, within the deadline."""
        k = req.max_concurrent or settings.drain_max_concurrent
        return FastJSON(await plan_host_drain(r, settings, req.host, req.deadline_s, k))

    # --- the web page ---------------------------------------------------------------------------
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        async def page() -> FileResponse:
            return FileResponse(STATIC_DIR / "index.html")

    app.add_middleware(MeasureRequests, metrics=metrics)
    return app


class MeasureRequests:
    """Pure ASGI middleware (Starlette's ``BaseHTTPMiddleware`` costs a task and a stream per request)."""

    def __init__(self, app: Any, metrics: RequestMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t = time.perf_counter()
        status = 500

        async def send_and_see(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(scope["method"], route, status, time.perf_counter() - t)

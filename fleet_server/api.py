"""The HTTP API (FastAPI; OpenAPI docs at /docs): routes of a few lines over the registry services.

Errors are ``{"detail": "<message for people>"}``: 404 for an unknown id (the message names
it), 409 for a valid request the current state forbids, 400 for an unusable upload, 422 for
a malformed body (the message names the field). ``app.state.server`` is the FleetServer, for
the dashboard router, which is included when ``fleet_server/dashboard.py`` defines ``router``.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fleet_server import registry
from fleet_server.events import sse_frame
from fleet_server.whatif import hardware_profile, what_if
from toco_core.device import DeviceProfile, profile_from_dict
from toco_core.errors import TocoError
from toco_core.plan import Policy


class AnalysisRequest(BaseModel):
    """Start an analysis; unset fields take the server's analysis defaults."""

    model_config = ConfigDict(extra="forbid")
    budget: float | None = Field(None, gt=0, lt=1, description="fidelity budget (max disagreement)")
    max_rounds: int | None = Field(None, ge=1, le=50, description="QBC rounds at most")
    field_samples: bool = Field(False, description="add the field samples uploaded by devices running this model")


class WhatIfRequest(BaseModel):
    """A device profile, a known device, or typed limits; the budget and objective of the plan."""

    model_config = ConfigDict(extra="forbid")
    profile: dict[str, Any] | None = None
    device_id: str | None = None
    memory: int | None = Field(None, gt=0, description="bytes")
    storage: int | None = Field(None, gt=0, description="bytes")
    latency_s: float | None = Field(None, gt=0)
    budget: float = Field(0.01, gt=0, lt=1)
    objective: Literal["fidelity", "size"] = "fidelity"


class Target(BaseModel):
    """Exactly one of: a device, a group, or all devices."""

    model_config = ConfigDict(extra="forbid")
    device: str | None = None
    group: str | None = None
    all: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        if sum(x is not None and x is not False for x in (self.device, self.group, self.all)) != 1:
            raise ValueError('give exactly one of {"device": id}, {"group": name} or {"all": true}')
        return self


class DeploymentRequest(BaseModel):
    """Deploy the bundle of a finished analysis."""

    model_config = ConfigDict(extra="forbid")
    analysis_id: str
    target: Target
    canary_share: float | None = Field(None, gt=0, le=1)
    failure_threshold: float | None = Field(None, ge=0, le=1)


class AcceptRequest(BaseModel):
    """Accept a drift alert's new data as normal, for its device or its whole group."""

    model_config = ConfigDict(extra="forbid")
    scope: Literal["device", "group"] = "device"


STATUS = {registry.NotFoundError: 404, registry.ConflictError: 409}


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def _profile(server, req: WhatIfRequest) -> DeviceProfile | None:
    if req.profile is not None:
        return profile_from_dict(req.profile, "the given profile")
    if req.device_id is None:
        return None
    return hardware_profile(req.device_id, registry.get_device(server.db, device_id=req.device_id, points=0)["hardware"])


def create_app(server) -> FastAPI:
    """The FastAPI app over a FleetServer."""
    app = FastAPI(title="TOCO Fleet", version="1", description="Fleet server: models, analyses, devices, "
                  "deployments, drift. Errors are {'detail': message}.")
    app.state.server = server
    db, store, settings = server.db, server.store, server.settings

    @app.exception_handler(TocoError)
    async def _toco_error(request: Request, exc: TocoError):
        return JSONResponse({"detail": str(exc)}, status_code=STATUS.get(type(exc), 400))

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _validation_detail(exc)}, status_code=422)

    @app.get("/api/health")
    def health() -> dict:
        return server.health()

    @app.get("/api/public-key", response_class=PlainTextResponse, summary="PEM public key agents verify bundles with")
    def public_key() -> str:
        return server.public_key_path.read_text()

    @app.get("/api/devices")
    def devices() -> Response:
        # the hot path (every dashboard polls it, 1,000 devices): bytes built by the registry, no re-encoding
        return Response(registry.devices_json(db), media_type="application/json")

    @app.get("/api/devices/{device_id}")
    def device(device_id: str) -> dict:
        return registry.get_device(db, device_id=device_id)

    @app.get("/api/models")
    def models() -> list[dict]:
        return registry.list_models(db)

    @app.post("/api/models", summary="Register an ONNX model with its analysis pool (.npz with x[, y])")
    async def add_model(file: Annotated[UploadFile, File()], pool: Annotated[UploadFile, File()],
                        name: Annotated[str, Form()], preprocessing: Annotated[str | None, Form()] = None) -> dict:
        onnx_bytes, pool_bytes = await file.read(), await pool.read()
        return await asyncio.to_thread(registry.add_model, db, store, name=name, onnx_bytes=onnx_bytes,
                                       pool_bytes=pool_bytes, preprocessing=preprocessing)

    @app.get("/api/models/{model_id}")
    def model(model_id: str) -> dict:
        return registry.get_model(db, model_id=model_id)

    @app.post("/api/models/{model_id}/analyses", summary="Queue an analysis (runs in a worker process)")
    def start_analysis(model_id: str, req: AnalysisRequest) -> dict:
        update = {k: v for k, v in (("budget", req.budget), ("max_rounds", req.max_rounds)) if v is not None}
        ids = registry.field_sample_ids_for_model(db, model_id=model_id) if req.field_samples else []
        view = registry.create_analysis(db, model_id=model_id, settings=settings.analysis.model_copy(update=update),
                                        reason="initial" if not ids else f"field samples: {len(ids)}",
                                        field_sample_ids=ids)
        server.jobs.kick()
        return view

    @app.get("/api/analyses")
    def analyses() -> list[dict]:
        return registry.list_analyses(db)

    @app.get("/api/analyses/{analysis_id}")
    def analysis(analysis_id: str) -> dict:
        return registry.analysis_detail(db, analysis_id=analysis_id)

    @app.post("/api/analyses/{analysis_id}/whatif", summary="The plan a profile or limits would get; nothing is built")
    def whatif(analysis_id: str, req: WhatIfRequest) -> dict:
        paths = registry.analysis_paths(db, analysis_id=analysis_id)
        policy = Policy(budget=req.budget, memory=req.memory, storage=req.storage, latency_s=req.latency_s,
                        objective=req.objective)
        return what_if(result_dir=paths["result_dir"], model_path=paths["model_path"], profile=_profile(server, req),
                       policy=policy)

    @app.post("/api/deployments", summary="Deploy an analysis's bundle to a device, a group or all (staged)")
    def create_deployment(req: DeploymentRequest) -> dict:
        return server.deployments.create(
            analysis_id=req.analysis_id, target=req.target.model_dump(exclude_none=True),
            canary_share=req.canary_share if req.canary_share is not None else settings.canary_share,
            failure_threshold=req.failure_threshold if req.failure_threshold is not None else settings.failure_threshold)

    @app.get("/api/deployments")
    def deployments() -> list[dict]:
        return server.deployments.list()

    @app.get("/api/deployments/{deployment_id}")
    def deployment(deployment_id: str) -> dict:
        return server.deployments.get(deployment_id=deployment_id)

    @app.post("/api/deployments/{deployment_id}/rollback")
    def rollback(deployment_id: str) -> dict:
        return server.deployments.rollback(deployment_id=deployment_id)

    @app.get("/api/drift")
    def drift(device_id: str | None = None, limit: int = 500) -> list[dict]:
        return registry.drift_points(db, device_id=device_id, limit=max(1, min(limit, 5000)))

    @app.get("/api/reanalyses")
    def reanalyses() -> list[dict]:
        return server.policy.list()

    @app.post("/api/reanalyses/{reanalysis_id}/approve")
    def approve(reanalysis_id: str) -> dict:
        return server.policy.approve(reanalysis_id=reanalysis_id)

    @app.get("/api/drift-alerts", summary="Drift alerts (fidelity | data | unclassified), newest first")
    def drift_alerts(device_id: str | None = None, active: bool = False) -> list[dict]:
        return server.drift_actions.list(device_id=device_id, active=active)

    @app.post("/api/drift-alerts/{alert_id}/accept", summary="Accept the new data as normal: rebase the reference")
    def accept_alert(alert_id: str, req: AcceptRequest | None = None) -> dict:
        return server.drift_actions.accept(alert_id=alert_id, scope=(req or AcceptRequest()).scope)

    @app.post("/api/drift-alerts/{alert_id}/acknowledge")
    def acknowledge_alert(alert_id: str) -> dict:
        return server.drift_actions.acknowledge(alert_id=alert_id)

    @app.post("/api/drift-alerts/{alert_id}/reanalyse", summary="Re-analyse anyway (data drift, cooldown, cap)")
    def reanalyse_alert(alert_id: str) -> dict:
        return server.drift_actions.reanalyse(alert_id=alert_id)

    @app.get("/api/events", summary="Server-sent events: device, telemetry, drift, status, analysis, deployment, reanalysis")
    async def events(request: Request) -> StreamingResponse:
        sub = server.events.subscribe()

        async def stream():
            try:
                yield ": connected\n\n"
                while not await request.is_disconnected():
                    try:
                        kind, data = await asyncio.wait_for(sub.queue.get(), 10)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    yield sse_frame(kind, data)
            finally:
                server.events.unsubscribe(sub)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    _include_dashboard(app)
    return app


def _include_dashboard(app: FastAPI) -> None:
    # the dashboard is built separately; when its module exists, an import error in it must surface
    if importlib.util.find_spec("fleet_server.dashboard") is None:
        return
    module = importlib.import_module("fleet_server.dashboard")
    router = getattr(module, "router", None)
    if router is not None:
        app.include_router(router)

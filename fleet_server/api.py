"""The HTTP API (FastAPI; OpenAPI docs at /docs): routes of a few lines over the registry services.

Errors are ``{"detail": "<message for people>"}``: 404 for an unknown id (the message names
it), 409 for a valid request the current state forbids, 400 for an unusable upload, 422 for
a malformed body (the message names the field). ``app.state.server`` is the FleetServer, for
the dashboard's pages (``fleet_server/dashboard.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.middleware.trustedhost import TrustedHostMiddleware

from fleet_server import dashboard, event_log, login, registry
from fleet_server.device_listing import DevicePage, DeviceQuery, device_page
from fleet_server.events import CLOSING, sse_frame
from fleet_server.http_auth import AuthMiddleware, Sessions, load_session_secret
from fleet_server.model_versions import group_versions
from fleet_server.mqtt_client import PublishRefused
from fleet_server.sample_gallery import recent_samples, sample_image
from fleet_server.uploads import BodyLimitMiddleware, MissingPartError, UploadTooLargeError, receive_form
from fleet_server.version_rollback import rollback_group
from fleet_server.whatif import hardware_profile, what_if
from toco_core.device import DeviceProfile, profile_from_dict
from toco_core.errors import TocoError
from toco_core.plan import Policy

if TYPE_CHECKING:  # the server builds the app: a run-time import would be circular
    from fleet_server.db import Database
    from fleet_server.registry import Store
    from fleet_server.server import FleetServer


class AnalysisRequest(BaseModel):
    """Start an analysis; unset fields take the server's analysis defaults."""

    model_config = ConfigDict(extra="forbid")
    budget: float | None = Field(None, gt=0, lt=1, description="fidelity budget (max disagreement)")
    max_rounds: int | None = Field(None, ge=1, le=50, description="QBC rounds at most")
    field_samples: bool = Field(False, description="add the field samples uploaded by devices running this model")
    output: str | None = Field(None, min_length=1, max_length=256,
                               description="the output the analysis scores (default: detected, e.g. the "
                                           "probabilities in front of a label tail)")
    task: Literal["classifier", "regression", "score", "embedding"] | None = Field(
        None, description="task kind of the scored output (toco_core.task_kind; default: detected); "
                          "re-analyses of this analysis keep it")


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


class VersionRollbackRequest(BaseModel):
    """Roll a group back from the version of a model it runs to the previous version (staged)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="the model's name")
    group: str
    canary_share: float | None = Field(None, gt=0, le=1)
    failure_threshold: float | None = Field(None, ge=0, le=1)


class AcceptRequest(BaseModel):
    """Accept a drift alert's new data as normal, for its device or its whole group."""

    model_config = ConfigDict(extra="forbid")
    scope: Literal["device", "group"] = "device"


# PublishRefused: the MQTT client has no packet id free right now (a rollback's commands); try again shortly
STATUS = {registry.NotFoundError: 404, registry.ConflictError: 409, UploadTooLargeError: 413, MissingPartError: 422,
          PublishRefused: 503}
# the multipart form of POST /api/models, for the OpenAPI docs (the route reads the body itself, streamed)
_MODEL_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "pool", "name"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "the ONNX model"},
                   "pool": {"type": "string", "format": "binary", "description": ".npz with x[, y]"},
                   "name": {"type": "string"},
                   "preprocessing": {"type": "string", "description": "JSON of toco_core.preprocessing"}}}}}}}


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def _profile(server: FleetServer, req: WhatIfRequest) -> DeviceProfile | None:
    if req.profile is not None:
        return profile_from_dict(req.profile, "the given profile")
    if req.device_id is None:
        return None
    return hardware_profile(req.device_id,
                            registry.get_device(server.db, device_id=req.device_id, points=0)["hardware"])


def _add_model(db: Database, store: Store, files: dict[str, Path], fields: dict[str, str]) -> dict[str, Any]:
    return registry.add_model(db, store, name=fields.get("name", ""), onnx_bytes=files["file"].read_bytes(),
                              pool_bytes=files["pool"].read_bytes(), preprocessing=fields.get("preprocessing"))


def create_app(server: FleetServer) -> FastAPI:
    """The FastAPI app over a FleetServer: every route but /api/health needs a token (fleet_server.http_auth),
    and only the Host names of ``settings.allowed_hosts`` are answered (400 otherwise: DNS rebinding)."""
    app = FastAPI(title="TOCO Fleet", version="1", description="Fleet server: models, analyses, devices, "
                  "deployments, drift. Errors are {'detail': message}. Authenticate with 'Authorization: Bearer "
                  "<token>' (toco-fleet tokens create).")
    app.state.server = server
    app.state.sessions = Sessions(load_session_secret(server.settings.session_key_path))
    # the last added middleware runs first: the Host check, authentication, the body limit, then the routes
    app.add_middleware(BodyLimitMiddleware, max_bytes=server.settings.max_body_bytes,
                       streamed=frozenset({("POST", "/api/models")}))
    app.add_middleware(AuthMiddleware, db=server.db, sessions=app.state.sessions, login_page=login.login_page)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=server.settings.allowed_hosts)
    db, store, settings = server.db, server.store, server.settings

    @app.exception_handler(TocoError)
    async def _toco_error(request: Request, exc: TocoError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=STATUS.get(type(exc), 400))

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_detail(exc)}, status_code=422)

    @app.get("/api/health")
    def health() -> dict:
        return server.health()

    @app.get("/api/public-key", response_class=PlainTextResponse, summary="PEM public key agents verify bundles with")
    def public_key() -> str:
        return server.public_key_path.read_text()

    @app.get("/api/devices", summary="Devices: a page of a filtered listing, or (no query string) every device",
             responses={200: {"model": DevicePage}})
    def devices(request: Request, query: Annotated[DeviceQuery, Query()]) -> Response:
        # any query string asks for a DevicePage; none keeps the bare array of every device older callers read
        if request.query_params:
            page = device_page(db, query, settings.overview_counts_max_age_s)
            return Response(page.model_dump_json(), media_type="application/json")
        return Response(registry.devices_json(db), media_type="application/json")

    @app.get("/api/devices/{device_id}")
    def device(device_id: str) -> dict:
        return registry.get_device(db, device_id=device_id)

    @app.get("/api/devices/{device_id}/samples", summary="The device's newest uploaded field samples (evidence)")
    def device_samples(device_id: str, limit: int = 24) -> list[dict]:
        registry.get_device(db, device_id=device_id)  # 404 for an unknown device
        return recent_samples(db, device_id, limit=max(1, min(limit, 200)))

    @app.get("/api/samples/{sample_id}/image.png", summary="A field sample drawn as an image (image inputs only)")
    def sample_png_route(sample_id: int) -> Response:
        return Response(sample_image(db, sample_id), media_type="image/png")

    @app.get("/api/models")
    def models() -> list[dict]:
        return registry.list_models(db)

    @app.post("/api/models", summary="Register an ONNX model with its analysis pool (.npz with x[, y])",
              openapi_extra=_MODEL_FORM)
    async def add_model(request: Request) -> dict:
        # streamed to disk under a cap (fleet_server.uploads); only an accepted upload is loaded
        with await receive_form(request, folder=settings.uploads_dir, max_bytes=settings.max_upload_bytes,
                                files={"file", "pool"}, fields={"name", "preprocessing"},
                                required={"file", "pool", "name"}) as form:
            return await asyncio.to_thread(_add_model, db, store, form.files, form.fields)

    @app.post("/api/models/rollback", summary="Roll a group back to the previous version of a model (staged, "
              "signed rollback commands naming that version's newest bundle)")
    def rollback_version(req: VersionRollbackRequest) -> dict:
        return rollback_group(db, server.deployments, name=req.name, group=req.group,
                              canary_share=req.canary_share if req.canary_share is not None else settings.canary_share,
                              failure_threshold=(req.failure_threshold if req.failure_threshold is not None
                                                 else settings.failure_threshold))

    @app.get("/api/groups/versions", summary="Which model versions each group's enrolled devices run, with counts")
    def group_model_versions() -> list[dict]:
        return group_versions(db)

    @app.get("/api/models/{model_id}")
    def model(model_id: str) -> dict:
        return registry.get_model(db, model_id=model_id)

    @app.post("/api/models/{model_id}/analyses", summary="Queue an analysis (runs in a worker process)")
    def start_analysis(model_id: str, req: AnalysisRequest) -> dict:
        update = {k: v for k, v in (("budget", req.budget), ("max_rounds", req.max_rounds), ("output", req.output),
                                    ("task", req.task)) if v is not None}
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

    @app.post("/api/analyses/{analysis_id}/cancel", summary="Cancel a queued or running analysis (409 once ended)")
    def cancel_analysis(analysis_id: str) -> dict:
        return server.jobs.cancel(analysis_id)

    @app.post("/api/analyses/{analysis_id}/whatif", summary="The plan a profile or limits would get; no deployment")
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
            failure_threshold=(req.failure_threshold if req.failure_threshold is not None
                               else settings.failure_threshold))

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
    def drift(device_id: str | None = None, model_id: str | None = None, limit: int = 500) -> list[dict]:
        # model_id: one version's windows only (drift history per version)
        return registry.drift_points(db, device_id=device_id, model_id=model_id, limit=max(1, min(limit, 5000)))

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

    @app.get("/api/events",
             summary="Server-sent events: device, telemetry, drift, status, analysis, deployment, reanalysis")
    async def events(request: Request) -> StreamingResponse:
        sub = server.events.subscribe()

        async def stream() -> AsyncIterator[str]:
            try:
                yield ": connected\n\n"
                while not await request.is_disconnected() and not server.events.closed.is_set():
                    try:
                        kind, data = await asyncio.wait_for(sub.queue.get(), 10)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    if kind == CLOSING:  # the server is stopping: the browser reconnects (to another replica)
                        return
                    yield sse_frame(kind, data)
            finally:
                server.events.unsubscribe(sub)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app.include_router(login.router)
    app.include_router(event_log.router)
    dashboard.include(app)
    return app

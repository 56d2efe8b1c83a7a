"""``toco-fleet``: run the server, and drive it over its HTTP API (models, analyses, deployments, devices, drift)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fleet_server.cli_alerts import make_alerts_app
from fleet_server.cli_database import DATA_DIR, DB_URL, database_url, db_app, opening, tokens_app
from fleet_server.cli_keys import keys_app
from toco_core.cli_support import cli_errors, console
from toco_core.errors import ConfigError, TocoError
from toco_core.log_format import configure_logging
from toco_core.units import format_size

app = typer.Typer(help="TOCO fleet server: registry, analyses, signed bundles, staged deployments, drift.",
                  no_args_is_help=True)
models_app = typer.Typer(help="Registered models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(db_app, name="db")
devices_app = typer.Typer(help="The fleet's devices: list them (over HTTP); enroll and revoke them (offline, on "
                          "--data-dir, with their mosquitto password).", no_args_is_help=True)
app.add_typer(devices_app, name="devices")
app.add_typer(keys_app, name="keys")
app.add_typer(tokens_app, name="tokens")
SERVER = typer.Option("http://127.0.0.1:8080", "--server", envvar="TOCO_FLEET_URL", help="fleet server URL")


def _call(server: str, method: str, path: str, **kw):
    import httpx

    from fleet_server.client_token import ENV, find_token, token_file

    token = find_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.request(method, server.rstrip("/") + path, timeout=60, headers=headers, **kw)
    except httpx.HTTPError as exc:
        raise ConfigError(f"cannot reach the fleet server at {server}: {exc}",
                          "start it with `toco-fleet serve`") from None
    if r.status_code == 401:
        where = f"set {ENV} or put the token in {token_file()}"
        if token is None:
            raise ConfigError(f"the fleet server at {server} needs an API token and none is set",
                              f"{where}; make one with `toco-fleet tokens create --role operator`")
        raise ConfigError(f"the fleet server at {server} refused the API token (unknown or revoked)",
                          f"{where} with a valid token; see `toco-fleet tokens list`")
    if r.status_code >= 400:
        detail = r.json().get("detail") if r.headers.get("content-type", "").startswith("application/json") else r.text
        raise TocoError(f"server said {r.status_code}: {detail}")
    return r.json()


# the alerts group calls the server through _call (whatever authentication it adds)
app.add_typer(make_alerts_app(_call, SERVER), name="alerts")


@app.callback()
def _root(verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="-v info, -vv debug")) -> None:
    configure_logging(verbose)


@app.command()
@cli_errors
def serve(config: Path | None = typer.Option(None, "--config", help="TOML file of FleetSettings keys (e.g. "
                                                "/etc/toco-fleet/fleet.toml); TOCO_FLEET_* and these flags "
                                                "override it"),
          data_dir: Path | None = typer.Option(None, help="database, bundles, keys [fleet-data]"),
          broker: str | None = typer.Option(None, help="'embedded' or mqtt://host:port / mqtts://host:port [embedded]"),
          broker_host: str | None = typer.Option(None, help="embedded broker address; any but 127.0.0.1 needs "
                                                    "--broker-password-file [127.0.0.1]"),
          broker_port: int | None = typer.Option(None, help="embedded broker port [1883]"),
          broker_password_file: Path | None = typer.Option(None, help="the embedded broker's users "
                                                              "(user:argon2-hash lines)"),
          mqtt_username: str | None = typer.Option(None, help="the server's own MQTT user (toco-server)"),
          mqtt_password_file: Path | None = typer.Option(None, help="file whose first line is its password "
                                                            "(or TOCO_FLEET_MQTT_PASSWORD; never a flag: "
                                                            "`ps` shows flags)"),
          mqtt_ca_file: Path | None = typer.Option(None, help="CA that signed the broker's certificate (mqtts://)"),
          host: str | None = typer.Option(None, help="HTTP bind address [127.0.0.1]"),
          port: int | None = typer.Option(None, help="HTTP port [8080]"),
          fleet: str | None = typer.Option(None, help="fleet name (topic root toco/v1/{fleet}) [default]"),
          drift_policy: str | None = typer.Option(None, help="auto | approval [auto]"),
          concurrency: int | None = typer.Option(None, help="analysis worker processes [1]"),
          executor: str | None = typer.Option(None, help="where analyses run: 'local' worker processes or a "
                                              "Dask scheduler, tcp://HOST:8786 [local]"),
          db_url: str | None = typer.Option(None, "--db-url", help="SQLAlchemy URL [sqlite in --data-dir]"),
          replicas: bool | None = typer.Option(None, "--replicas/--no-replicas", help="one of several serves on "
                                                  "one PostgreSQL (--db-url) and one external broker [off]"),
          replica_id: str | None = typer.Option(None, help="this replica's name [hostname-pid]")) -> None:
    """Run the fleet server (embedded broker + SQLite by default) until Ctrl-C."""
    from fleet_server.config import load_settings
    from fleet_server.replicas import check_replica_setup
    from fleet_server.serve_process import serve as run

    given = {"data_dir": data_dir, "broker": broker, "broker_host": broker_host, "broker_port": broker_port,
             "broker_password_file": broker_password_file, "mqtt_username": mqtt_username,
             "mqtt_password_file": mqtt_password_file,
             "mqtt_ca_file": None if mqtt_ca_file is None else str(mqtt_ca_file),
             "http_host": host, "http_port": port, "fleet": fleet, "drift_policy": drift_policy,
             "analysis_concurrency": concurrency, "executor": executor, "db_url": db_url, "replicas": replicas,
             "replica_id": replica_id}
    flags: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if mqtt_password_file is not None:  # the flag beats a password from the environment or the file
        flags["mqtt_password"] = None
    settings = load_settings(config, **flags)
    check_replica_setup(settings)
    if settings.broker == "embedded":  # refused before anything is started or printed
        from fleet_server.broker import check_bind

        check_bind(settings.broker_host, settings.broker_password_file)
    if settings.executor != "local":  # an unreachable scheduler is one line here, before anything starts
        from fleet_server.analysis_cluster import check_scheduler

        workers = check_scheduler(settings.executor)
        console.print(f"analyses on the Dask cluster at {settings.executor} ({workers} workers now)", highlight=False)
    who = f", replica {settings.replica_id}" if settings.replicas else ""
    console.print(f"fleet server on http://{settings.http_host}:{settings.http_port} (docs /docs), broker "
                  f"{settings.broker}, data {settings.data_dir}{who}", highlight=False)
    run(settings)


@models_app.command("add")
@cli_errors
def models_add(model: Path = typer.Argument(..., exists=True, dir_okay=False),
               pool: Path = typer.Option(..., exists=True),
               name: str | None = typer.Option(None), server: str = SERVER) -> None:
    """Register an ONNX model with its analysis pool (.npz with x[, y]); an existing --name gets a new version."""
    m = _call(server, "POST", "/api/models", data={"name": name or model.stem},
              files={"file": (model.name, model.read_bytes()), "pool": (pool.name, pool.read_bytes())})
    parent = f" (after {m['parent_id']})" if m.get("parent_id") else ""
    console.print(f"model {m['model_id']}: {m['name']} v{m['version']}{parent}, {m['weights']} weights, "
                  f"pool {m['pool_size']}", highlight=False)


@models_app.command("list")
@cli_errors
def models_list(server: str = SERVER) -> None:
    """List registered models, every version (newest first within a name) with its parent."""
    t = Table("model", "name", "version", "parent", "weights", "size", "pool")
    rows = sorted(_call(server, "GET", "/api/models"), key=lambda m: (m["name"], -m["version"]))
    for m in rows:
        t.add_row(m["model_id"], m["name"], f"v{m['version']}", m.get("parent_id") or "-", str(m["weights"]),
                  format_size(m["size_bytes"]), str(m["pool_size"]))
    console.print(t)


@models_app.command("rollback")
@cli_errors
def models_rollback(name: str = typer.Argument(..., help="the model's name"),
                    group: str = typer.Option(..., "--group", help="the group to take back to the previous version"),
                    canary: float | None = typer.Option(None), threshold: float | None = typer.Option(None),
                    server: str = SERVER) -> None:
    """Roll a group back to the previous version of a model: its newest bundle, staged like a deployment."""
    d = _call(server, "POST", "/api/models/rollback", json={"name": name, "group": group, "canary_share": canary,
                                                            "failure_threshold": threshold})
    old, new = d["from_version"], d["to_version"]
    console.print(f"deployment {d['deployment_id']}: group {group} from {name} v{old['version']} to v{new['version']}, "
                  f"stage {d['stage']}, {d['counts']}", highlight=False)


@app.command()
@cli_errors
def analyze(model_id: str, budget: float | None = typer.Option(None), max_rounds: int | None = typer.Option(None),
            field_samples: bool = typer.Option(False), wait: bool = typer.Option(True),
            output: str | None = typer.Option(None, help="the output the analysis scores (default: detected)"),
            server: str = SERVER) -> None:
    """Queue an analysis and (by default) follow its progress until the bundle is built."""
    a = _call(server, "POST", f"/api/models/{model_id}/analyses",
              json={"budget": budget, "max_rounds": max_rounds, "field_samples": field_samples, "output": output})
    console.print(f"analysis {a['analysis_id']} queued")
    if not wait:
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("queued", total=1)
        while a["status"] in ("queued", "running"):
            time.sleep(0.5)
            a = _call(server, "GET", f"/api/analyses/{a['analysis_id']}")
            p = a["progress"]
            bar.update(task, description=p["phase"], completed=p["done"], total=max(p["total"], 1))
    if a["status"] != "done":
        raise TocoError(f"analysis {a['analysis_id']} failed: {a['error']}")
    console.print(f"done: bundle {a['bundle_id'][:12]}")


@app.command()
@cli_errors
def deploy(analysis_id: str, device: str | None = typer.Option(None), group: str | None = typer.Option(None),
           all_devices: bool = typer.Option(False, "--all"), canary: float | None = typer.Option(None),
           threshold: float | None = typer.Option(None), server: str = SERVER) -> None:
    """Deploy an analysis's bundle to a device, a group or all devices (staged: canary first)."""
    target = {"device": device} if device else {"group": group} if group else {"all": True} if all_devices else None
    if target is None:
        raise ConfigError("no target", "give --device ID, --group NAME or --all")
    d = _call(server, "POST", "/api/deployments", json={"analysis_id": analysis_id, "target": target,
                                                        "canary_share": canary, "failure_threshold": threshold})
    console.print(f"deployment {d['deployment_id']}: stage {d['stage']}, {d['counts']}")
    for w in d.get("expected_infeasible", []):
        console.print(f"[yellow]warning:[/] {w['device_id']} will likely refuse it: {w['reason']}")


@app.command()
@cli_errors
def rollback(deployment_id: str, server: str = SERVER) -> None:
    """Roll a deployment back on every device that got it."""
    d = _call(server, "POST", f"/api/deployments/{deployment_id}/rollback")
    console.print(f"deployment {d['deployment_id']}: {d['stage']}")


@devices_app.command("list")
@cli_errors
def devices_list(server: str = SERVER) -> None:
    """The fleet as a table: state (quarantined: never enrolled; revoked), model version, hardware, active plan,
    agreement."""
    t = Table("device", "group", "state", "model", "memory", "cores", "plan", "predicted", "measured")
    t.columns[0].no_wrap = True  # the id is what every other command takes: whole, on narrow terminals too
    for d in _call(server, "GET", "/api/devices"):
        hw, act, ver = d["hardware"], d["active"] or {}, d.get("model_version")
        pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
        t.add_row(d["device_id"], d["group"], d["state"], f"{ver['name']} v{ver['version']}" if ver else "-",
                  format_size(hw.get("total_memory", 0)),
                  str(hw.get("physical_cores", "-")), act.get("plan_label") or "-", pct(act.get("predicted_agreement")),
                  pct(act.get("measured_agreement")))
    console.print(t)


@app.command()
@cli_errors
def drift(device: str | None = typer.Option(None), model: str | None = typer.Option(None, help="model name"),
          version: int | None = typer.Option(None, help="only windows measured on this version of --model"),
          last: int = typer.Option(10), server: str = SERVER) -> None:
    """Drift windows per device: agreement, confidence, input shift, alert (optionally of one model version)."""
    params = {"device_id": device} if device else {}
    if version is not None:
        params["model_id"] = _version_id(server, model, version)
    points = _call(server, "GET", "/api/drift", params=params)
    for dev in sorted({p["device_id"] for p in points}):
        t = Table("window", "agreement", "confidence", "entropy", "input shift", "alert", title=dev)
        for p in [p for p in points if p["device_id"] == dev][-last:]:
            ag = "-" if p["agreement"] is None else f"{p['agreement']:.1%}"
            t.add_row(str(p["window"]), ag, f"{p['confidence']:.2f}", f"{p['entropy']:.2f}", f"{p['input_shift']:.2f}",
                      "[red]ALERT[/red]" if p["alert"] else "")
        console.print(t)



def _version_id(server: str, name: str | None, version: int) -> str:
    """The model id of ``name`` v``version``. Raises ConfigError without --model, TocoError for an unknown version."""
    if not name:
        raise ConfigError("--version needs --model", "give --model NAME --version N")
    found = [m for m in _call(server, "GET", "/api/models") if m["name"] == name]
    match = [m["model_id"] for m in found if m["version"] == version]
    if not match:
        have = ", ".join(f"v{m['version']}" for m in sorted(found, key=lambda m: m["version"])) or "no versions"
        raise TocoError(f"model {name!r} has no version v{version} ({have})")
    return match[0]


PASSWD = typer.Option(None, "--passwd", help="mosquitto password file to add the device to / remove it from, e.g. "
                      "/etc/mosquitto/toco/passwd; left out: the server's record only (embedded broker, or broker "
                      "users managed elsewhere)")


@devices_app.command("enroll")
@cli_errors
def devices_enroll(name: str = typer.Argument(..., help="device id = its MQTT username and client id"),
                   group: str = typer.Option(..., "--group", help="the device's group (the server's, whatever the "
                                             "device's config says)"),
                   allow: list[str] | None = typer.Option(None, "--allow", help="a model id the device may run "
                                                             "(repeat; default: any model)"),
                   passwd: Path | None = PASSWD,
                   password_file: Path | None = typer.Option(None, help="use the password in this file's first line"),
                   out: Path | None = typer.Option(None, help="write a generated password here (mode 0600) to "
                                                      "provision the box with install-agent.sh --password-file"),
                   reload: bool = typer.Option(False,
                                               help="systemctl reload mosquitto, so the password counts at once"),
                   data_dir: Path = DATA_DIR, db_url: str | None = DB_URL) -> None:
    """Enroll a device: its broker password (with --passwd) and its server record (group, allowed models).

    Enrolling it again replaces its password, group and allowed models. Works without the server running.
    """
    from fleet_server import broker_passwords as bp
    from fleet_server.db import Database
    from fleet_server.enrollment import check_device_name, enroll

    check_device_name(name)
    url = database_url(data_dir, db_url, must_exist=False)
    if passwd is not None:  # the broker first: a missing mosquitto_passwd must leave no half-enrolled device
        if password_file is not None:
            password = password_file.read_text().splitlines()[0].strip() if password_file.exists() else ""
            if not password:
                raise ConfigError(f"no password in {password_file}", "put the password on its first line")
        elif out is not None:
            password = bp.new_password()
        else:
            raise ConfigError("no --password-file and no --out", "pass --out FILE to receive the generated password "
                              "(it is never printed)")
        bp.set_password(passwd, name, password)
        if password_file is None:
            assert out is not None  # no --password-file: --out was checked above
            bp.write_password_out(out, password)
            console.print(f"password for {name} written to {out} (copy it to the box, then delete it here)")
        console.print(f"{name} in {passwd}")
    with opening(url):
        db = Database(url)
    try:
        d = enroll(db, name, group, allow)
    finally:
        db.close()
    models = ", ".join(d["allowed_models"]) if d["allowed_models"] else "any model"
    console.print(f"enrolled {name} in group {group} ({models})", highlight=False)
    if passwd is not None and reload:
        bp.reload_mosquitto()
        console.print("mosquitto reloaded")


@devices_app.command("revoke")
@cli_errors
def devices_revoke(name: str = typer.Argument(..., help="device id"), passwd: Path | None = PASSWD,
                   reload: bool = typer.Option(False,
                                               help="systemctl reload mosquitto, so the password is gone at once"),
                   data_dir: Path = DATA_DIR, db_url: str | None = DB_URL) -> None:
    """Revoke a device: the server ignores it from now on, and (with --passwd) its broker password is removed."""
    from fleet_server import broker_passwords as bp
    from fleet_server.db import Database
    from fleet_server.enrollment import revoke

    url = database_url(data_dir, db_url, must_exist=True)
    with opening(url):
        db = Database(url)
    try:  # the server's record first: from this commit on, whatever the device still sends is ignored
        revoke(db, name)
    finally:
        db.close()
    console.print(f"revoked {name}: the server ignores it", highlight=False)
    if passwd is not None:
        removed = bp.remove_user(passwd, name)
        console.print(f"{name} removed from {passwd}" if removed else f"{name} had no password in {passwd}")
        if reload:
            bp.reload_mosquitto()
            console.print("mosquitto reloaded")

"""The emulator's HTTP side: Cloud SQL Admin API, OAuth token endpoint, GCE metadata, control."""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from sqlproxy.certs import load_public_key, pem
from sqlproxy.dialer import ADMIN_API_SCOPES
from sqlproxy.emulator.auth import AuthError, TokenInfo


@dataclass(frozen=True, slots=True)
class AdminCall:
    """AdminCall records one Admin API request: method, instance and quota project."""

    method: str
    instance: str
    quota_project: str | None


if TYPE_CHECKING:
    from sqlproxy.emulator.core import Emulator
    from sqlproxy.emulator.instance import EmulatedInstance

API = "/sql/v1beta4"
METADATA = "/computeMetadata/v1"
FLAVOR = {"Metadata-Flavor": "Google"}
EMULATOR_KEY: web.AppKey[Emulator] = web.AppKey("emulator")


def _google_error(status: int, message: str, grpc_status: str, **extra: Any) -> web.Response:
    error: dict[str, Any] = {"code": status, "message": message, "status": grpc_status}
    error.update(extra)
    return web.json_response({"error": error}, status=status)


def _insufficient_scopes(method: str) -> web.Response:
    # The exact shape Google answers when the token lacks the API's OAuth scopes.
    return _google_error(
        403,
        "Request had insufficient authentication scopes.",
        "PERMISSION_DENIED",
        details=[
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
                "domain": "googleapis.com",
                "metadata": {
                    "service": "sqladmin.googleapis.com",
                    "method": f"google.cloud.sql.v1beta4.SqlConnectService.{method}",
                },
            }
        ],
    )


def _unauthenticated() -> web.Response:
    return _google_error(
        401,
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
        "cookie or other valid authentication credential. See "
        "https://developers.google.com/identity/sign-in/web/devconsole-project.",
        "UNAUTHENTICATED",
    )


def _not_found() -> web.Response:
    return _google_error(
        404,
        "The Cloud SQL instance does not exist.",
        "NOT_FOUND",
        errors=[
            {
                "message": "The Cloud SQL instance does not exist.",
                "domain": "global",
                "reason": "instanceDoesNotExist",
            }
        ],
    )


def _rfc3339(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Refused(Exception):
    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


async def _admin_call(
    request: web.Request, method: str
) -> tuple[Emulator, EmulatedInstance, TokenInfo]:
    """_admin_call checks the token, the faults and the instance, as the Admin API would."""
    emu = request.app[EMULATOR_KEY]
    project = request.match_info["project"]
    name = request.match_info["instance"].split(":", 1)[0]
    emu.admin_calls.append(
        AdminCall(method, f"{project}:{name}", request.headers.get("x-goog-user-project"))
    )
    inst = emu.find_instance(project, name)
    if inst is not None and inst.faults.admin_delay:
        await asyncio.sleep(inst.faults.admin_delay)
    auth = request.headers.get("Authorization", "")
    token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
    info = emu.tokens.lookup(token) if token else None
    if info is None or not info.valid:
        raise _Refused(_unauthenticated())
    if not info.scopes & ADMIN_API_SCOPES or (inst is not None and inst.faults.insufficient_scopes):
        raise _Refused(_insufficient_scopes(method))
    if inst is not None and inst.faults.admin_5xx:
        raise _Refused(_google_error(503, "The service is currently unavailable.", "UNAVAILABLE"))
    if inst is None or inst.faults.not_found:
        raise _Refused(_not_found())
    return emu, inst, info


async def connect_settings(request: web.Request) -> web.Response:
    """connect_settings answers GET .../instances/{instance}/connectSettings."""
    try:
        _, inst, _ = await _admin_call(request, "GetConnectSettings")
    except _Refused as refused:
        return refused.response
    addresses = [{"type": "PRIMARY", "ipAddress": inst.advertised("PRIMARY")}]
    if not inst.faults.no_private_ip:
        addresses.append({"type": "PRIVATE", "ipAddress": inst.advertised("PRIVATE")})
    body: dict[str, Any] = {
        "kind": "sql#connectSettings",
        "serverCaCert": {
            "kind": "sql#sslCert",
            "certSerialNumber": str(inst.authority.cert.serial_number),
            "cert": inst.ca_pem,
            "commonName": "C=US,O=Google\\, Inc,CN=Google Cloud SQL Server CA,"
            f"dnQualifier={inst.name}",
            "instance": inst.name,
        },
        "ipAddresses": addresses,
        "region": inst.region,
        "databaseVersion": inst.database_version,
        "backendType": "SECOND_GEN",
        "pscEnabled": "PSC" in inst.addresses,
    }
    if "PSC" in inst.addresses:
        # No DNS here: the PSC "DNS name" is the PSC address itself.
        psc_name = inst.advertised("PSC") + "."
        body["dnsName"] = psc_name
        body["dnsNames"] = [
            {"name": psc_name, "connectionType": "PRIVATE_SERVICE_CONNECT", "dnsScope": "INSTANCE"}
        ]
    return web.json_response(body)


async def get_instance(request: web.Request) -> web.Response:
    """get_instance answers GET .../instances/{instance} (what `gcloud sql instances describe`
    shows), which sqlproxy doctor reads for state and addresses."""
    try:
        _, inst, _ = await _admin_call(request, "Get")
    except _Refused as refused:
        return refused.response
    addresses = [{"type": "PRIMARY", "ipAddress": inst.advertised("PRIMARY")}]
    network: dict[str, Any] = {"ipv4Enabled": True}
    if not inst.faults.no_private_ip:
        addresses.append({"type": "PRIVATE", "ipAddress": inst.advertised("PRIVATE")})
        network["privateNetwork"] = f"projects/{inst.project}/global/networks/default"
    if "PSC" in inst.addresses:
        network["pscConfig"] = {"pscEnabled": True}
    return web.json_response(
        {
            "kind": "sql#instance",
            "name": inst.name,
            "project": inst.project,
            "connectionName": inst.connection_name,
            "region": inst.region,
            "databaseVersion": inst.database_version,
            "state": "RUNNABLE",
            "backendType": "SECOND_GEN",
            "ipAddresses": addresses,
            "settings": {"ipConfiguration": network},
        }
    )


async def instance_action(request: web.Request) -> web.Response:
    """instance_action answers POST .../instances/{instance}:generateEphemeralCert."""
    _, _, action = request.match_info["instance"].partition(":")
    if action != "generateEphemeralCert":
        return _google_error(404, f"Method not found: {action}", "NOT_FOUND")
    try:
        emu, inst, info = await _admin_call(request, "GenerateEphemeralCert")
    except _Refused as refused:
        return refused.response
    try:
        body = await request.json()
        public_key = load_public_key(str(body["public_key"]))
    except (ValueError, KeyError, TypeError):
        return _google_error(
            400, "Invalid request: public_key is not a PEM public key.", "INVALID_ARGUMENT"
        )
    not_after = time.time() + emu.cert_ttl
    iam_user: str | None = None
    if "access_token" in body:
        login = emu.tokens.lookup(str(body["access_token"]))
        if login is None or not login.valid:
            return _google_error(
                400, "Invalid request: the access_token is invalid or expired.", "INVALID_ARGUMENT"
            )
        # IAM login: the certificate cannot outlive the token it vouches for.
        not_after = min(not_after, login.expires)
        iam_user = login.email.removesuffix(".gserviceaccount.com")
        emu.iam_logins.append(login.email)
    cert = inst.issue_cert(public_key, info.email, iam_user, not_after)
    return web.json_response(
        {
            "ephemeralCert": {
                "kind": "sql#sslCert",
                "certSerialNumber": str(cert.serial_number),
                "cert": pem(cert),
                "commonName": info.email,
                "instance": inst.name,
                "expirationTime": _rfc3339(not_after),
            }
        }
    )


async def token(request: web.Request) -> web.Response:
    """token is the OAuth 2.0 token endpoint named in the emulator's key files."""
    emu = request.app[EMULATOR_KEY]
    form = {k: str(v) for k, v in (await request.post()).items()}
    try:
        access, info = emu.tokens.grant(form, emu.token_uri, emu.token_ttl)
    except AuthError as exc:
        return web.json_response(
            {"error": exc.error, "error_description": exc.description}, status=400
        )
    return web.json_response(
        {
            "access_token": access,
            "expires_in": int(info.expires - time.time()),
            "token_type": "Bearer",
            "scope": " ".join(sorted(info.scopes)),
        }
    )


@web.middleware
async def metadata_flavor(request: web.Request, handler: Any) -> web.StreamResponse:
    """metadata_flavor enforces and sets the Metadata-Flavor header on metadata requests."""
    if request.path == "/" or request.path.startswith(METADATA):
        if request.path != "/" and request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(
                status=403, text="Missing Metadata-Flavor:Google header.", headers=FLAVOR
            )
        response: web.StreamResponse = await handler(request)
        response.headers.update(FLAVOR)
        return response
    result: web.StreamResponse = await handler(request)
    return result


async def metadata_root(_request: web.Request) -> web.Response:
    """metadata_root answers google-auth's "are we on GCE?" ping."""
    return web.Response(text="computeMetadata/\n")


async def metadata(request: web.Request) -> web.Response:
    """metadata answers the GCE metadata paths google-auth and sqlproxy doctor read."""
    emu = request.app[EMULATOR_KEY]
    path = request.match_info["path"].rstrip("/")
    vm = emu.vm
    account = "instance/service-accounts/"
    if path in (f"{account}default", f"{account}{vm.email}"):
        return web.json_response(
            {"aliases": ["default"], "email": vm.email, "scopes": list(vm.scopes)}
        )
    if path in (f"{account}default/token", f"{account}{vm.email}/token"):
        # As on Compute Engine, the token carries the VM's scopes whatever was asked for.
        access, info = emu.tokens.mint(vm.email, vm.scopes, emu.token_ttl)
        return web.json_response(
            {
                "access_token": access,
                "expires_in": int(info.expires - time.time()),
                "token_type": "Bearer",
            }
        )
    if path in (f"{account}default/email", f"{account}{vm.email}/email"):
        return web.Response(text=vm.email)
    if path in (f"{account}default/scopes", f"{account}{vm.email}/scopes"):
        return web.Response(text="\n".join(vm.scopes) + "\n")
    if path == "project/project-id":
        return web.Response(text=vm.project)
    if path == "universe/universe-domain":
        return web.Response(text="googleapis.com")
    if path == "instance/name":
        return web.Response(text=vm.name)
    if path == "instance/zone":
        return web.Response(text=f"projects/{vm.project}/zones/{vm.zone}")
    return web.Response(status=404, text="Not Found")


async def control_instances(request: web.Request) -> web.Response:
    """control_instances lists the emulated instances, their addresses and faults."""
    emu = request.app[EMULATOR_KEY]
    return web.json_response(emu.describe())


async def control_faults(request: web.Request) -> web.Response:
    """control_faults switches an instance's faults: POST {"listener": "refused", ...}."""
    emu = request.app[EMULATOR_KEY]
    inst = emu.instances.get(request.match_info["name"])
    if inst is None:
        return web.json_response({"error": "no such instance"}, status=404)
    try:
        await inst.set_faults(await request.json())
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response({"faults": vars(inst.faults)})


async def control_connections(request: web.Request) -> web.Response:
    """control_connections lists what each instance accepted on 3307."""
    emu = request.app[EMULATOR_KEY]
    return web.json_response([r.to_json() for inst in emu.instances.values() for r in inst.records])


async def control_token(request: web.Request) -> web.Response:
    """control_token mints an access token: POST {"email": ..., "scopes": [...], "ttl": s}."""
    emu = request.app[EMULATOR_KEY]
    body = await request.json() if request.can_read_body else {}
    scopes = body.get("scopes") or [emu.tokens_default_scope]
    access, info = emu.tokens.mint(
        str(body.get("email", emu.account.email)),
        set(scopes),
        float(body.get("ttl", emu.token_ttl)),
    )
    return web.json_response(
        {"access_token": access, "expires_in": int(info.expires - time.time())}
    )


def make_app(emulator: Emulator) -> web.Application:
    """make_app wires every route to one emulator."""
    app = web.Application(middlewares=[metadata_flavor])
    app[EMULATOR_KEY] = emulator
    app.router.add_get(
        f"{API}/projects/{{project}}/instances/{{instance}}/connectSettings", connect_settings
    )
    app.router.add_post(f"{API}/projects/{{project}}/instances/{{instance}}", instance_action)
    app.router.add_get(f"{API}/projects/{{project}}/instances/{{instance}}", get_instance)
    app.router.add_post("/token", token)
    app.router.add_get("/", metadata_root)
    app.router.add_get(f"{METADATA}/{{path:.*}}", metadata)
    app.router.add_get("/emulator/v1/instances", control_instances)
    app.router.add_post("/emulator/v1/instances/{name}/faults", control_faults)
    app.router.add_get("/emulator/v1/connections", control_connections)
    app.router.add_post("/emulator/v1/tokens", control_token)
    return app

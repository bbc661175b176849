"""Connector internals sqlproxy relies on: an upgrade that moves them fails here.

sqlproxy/dialer.py uses CloudSQLClient.get_connection_info, ConnectionInfo and the connection
name parser, which are not public API; pyproject pins the 1.23 line for that reason.
"""

from __future__ import annotations

import asyncio
import inspect
import ssl

import google.oauth2.credentials
import pytest
from google.cloud.sql.connector import version as connector_version
from google.cloud.sql.connector.client import CloudSQLClient
from google.cloud.sql.connector.connection_info import ConnectionInfo
from google.cloud.sql.connector.connection_name import _parse_connection_name
from google.cloud.sql.connector.enums import IPTypes
from google.cloud.sql.connector.exceptions import CloudSQLIPTypeError

from sqlproxy.dialer import _generate_keys
from sqlproxy.emulator import Emulator
from tests.conftest import MAIN


def test_pinned_version() -> None:
    assert connector_version.__version__.startswith("1.23.")


def test_signatures_we_call() -> None:
    init = inspect.signature(CloudSQLClient.__init__).parameters
    assert list(init)[:4] == ["self", "sqladmin_api_endpoint", "quota_project", "credentials"]
    assert "user_agent" in init
    get = inspect.signature(CloudSQLClient.get_connection_info).parameters
    assert list(get) == ["self", "conn_name", "keys", "enable_iam_auth"]
    assert inspect.iscoroutinefunction(CloudSQLClient.get_connection_info)
    assert inspect.iscoroutinefunction(ConnectionInfo.create_ssl_context)
    assert [t.value for t in IPTypes][:3] == ["PRIMARY", "PRIVATE", "PSC"]
    name = _parse_connection_name("example.com:proj:region:inst")
    assert (name.project, name.region, name.instance_name) == ("example.com:proj", "region", "inst")


async def test_connection_info_from_the_emulator(emulator: Emulator) -> None:
    creds = google.oauth2.credentials.Credentials(token=emulator.mint_token())  # type: ignore[no-untyped-call]
    client = CloudSQLClient(emulator.url, None, creds, user_agent="contract-test")
    keys = asyncio.get_running_loop().create_task(asyncio.to_thread(_generate_keys))
    try:
        info = await client.get_connection_info(_parse_connection_name(MAIN), keys, False)
    finally:
        await client.close()
    inst = emulator.instance(MAIN)
    assert info.database_version.startswith("POSTGRES_")
    assert info.get_preferred_ips(IPTypes.PRIVATE) == [inst.addresses["PRIVATE"]]
    assert info.expiration.tzinfo is not None
    context = await info.create_ssl_context(False)
    assert isinstance(context, ssl.SSLContext)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    # One context per certificate generation: the info object caches it.
    assert await info.create_ssl_context(False) is context
    with pytest.raises(CloudSQLIPTypeError, match="does not have any IP addresses matching"):
        info.get_preferred_ips(IPTypes.SQL_DATA)

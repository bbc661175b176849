"""Credential sources and IAM database authentication, through google-auth for real."""

from __future__ import annotations

import asyncpg
import pytest

from sqlproxy.emulator import Emulator
from sqlproxy.emulator.auth import GCE_DEFAULT_SCOPES
from tests.conftest import MAIN, PG, make_config, running_proxy


async def _current_user(host: str, port: int, user: str, password: str | None) -> str:
    conn = await asyncpg.connect(
        host=host, port=port, user=user, password=password, database="postgres", ssl=False
    )
    try:
        return str(await conn.fetchval("SELECT current_user"))
    finally:
        await conn.close()


def _last_subject(emulator: Emulator) -> str:
    return emulator.instance(MAIN).records[-1].client_subject


async def test_credentials_file_is_used_through_the_token_endpoint(
    emulator: Emulator, pg: PG
) -> None:
    async with running_proxy(make_config(emulator)) as proxy:
        addr = proxy.addresses[0]
        assert await _current_user(addr.host, addr.port, pg.user, pg.password) == pg.user
    assert f"CN={emulator.account.email}" in _last_subject(emulator)


async def test_static_token(emulator: Emulator, pg: PG) -> None:
    token = emulator.mint_token(email="token-user@example.com")
    async with running_proxy(make_config(emulator, token=token)) as proxy:
        addr = proxy.addresses[0]
        assert await _current_user(addr.host, addr.port, pg.user, pg.password) == pg.user
    assert "CN=token-user@example.com" in _last_subject(emulator)


async def test_application_default_credentials_from_the_metadata_server(
    emulator: Emulator, pg: PG
) -> None:
    config = make_config(emulator, credentials_file=None)
    async with running_proxy(config) as proxy:
        addr = proxy.addresses[0]
        assert await _current_user(addr.host, addr.port, pg.user, pg.password) == pg.user
    assert f"CN={emulator.vm.email}" in _last_subject(emulator)


async def test_vm_without_cloud_sql_scope_gets_insufficient_scopes(
    emulator: Emulator, pg: PG, proxy_logs: pytest.LogCaptureFixture
) -> None:
    saved = emulator.vm.scopes
    emulator.vm.scopes = GCE_DEFAULT_SCOPES
    try:
        async with running_proxy(make_config(emulator, credentials_file=None)) as proxy:
            addr = proxy.addresses[0]
            with pytest.raises(asyncpg.exceptions.ClientCannotConnectError) as refused:
                await _current_user(addr.host, addr.port, pg.user, pg.password)
    finally:
        emulator.vm.scopes = saved
    assert (
        "insufficient-scopes: Admin API answered 403 Request had insufficient " in proxy_logs.text
    )
    assert "--scopes=cloud-platform" in str(refused.value.hint)


async def test_auto_iam_authn_logs_in_the_service_account_without_password(
    emulator: Emulator,
) -> None:
    iam_user = emulator.account.iam_user
    before = len(emulator.iam_logins)
    async with running_proxy(make_config(emulator, auto_iam_authn=True)) as proxy:
        addr = proxy.addresses[0]
        assert await _current_user(addr.host, addr.port, iam_user, None) == iam_user
    # The certificate request carried the (down-scoped) token of the service account.
    assert emulator.iam_logins[before:] == [emulator.account.email]
    assert emulator.instance(MAIN).records[-1].iam_user == iam_user


async def test_iam_user_without_auto_iam_authn_needs_a_password(emulator: Emulator) -> None:
    async with running_proxy(make_config(emulator)) as proxy:
        addr = proxy.addresses[0]
        with pytest.raises(asyncpg.exceptions.InvalidPasswordError):
            await _current_user(addr.host, addr.port, emulator.account.iam_user, "wrong")

"""Ephemeral certificates: sessions outlive them; new connections get fresh ones."""

from __future__ import annotations

import asyncio

import pytest

from sqlproxy.emulator import Emulator
from tests.conftest import MAIN, PG, connect, make_config, running_proxy

CERT_TTL = 3.0


@pytest.mark.parametrize("lazy", [False, True], ids=["background", "lazy"])
async def test_sessions_outlive_their_certificate_and_new_ones_get_a_new_one(
    emulator: Emulator, pg: PG, lazy: bool
) -> None:
    emulator.cert_ttl = CERT_TTL
    inst = emulator.instance(MAIN)
    async with running_proxy(make_config(emulator, lazy_refresh=lazy)) as proxy:
        addr = proxy.addresses[0]
        first = await connect(pg, addr.host, addr.port)
        try:
            first_cert = inst.records[-1].client_serial
            expiry = inst.issued[first_cert].expires
            await asyncio.sleep(CERT_TTL + 1)
            # The certificate that opened this session has expired; the session carries on.
            assert await first.fetchval("SELECT 'still here'") == "still here"
            second = await connect(pg, addr.host, addr.port)
            try:
                assert await second.fetchval("SELECT 2") == 2
            finally:
                await second.close()
        finally:
            await first.close()
    second_cert = inst.records[-1].client_serial
    assert second_cert != first_cert
    assert inst.issued[second_cert].expires > expiry


async def test_reconnects_resume_the_tls_session(emulator: Emulator, pg: PG) -> None:
    """New tunnels resume the instance's TLS 1.3 session: no certificate exchange or RSA
    signature on reconnects, as haproxy does by default."""
    inst = emulator.instance(MAIN)
    before = len(inst.records)
    async with running_proxy(make_config(emulator)) as proxy:
        addr = proxy.addresses[0]
        for _ in range(3):
            conn = await connect(pg, addr.host, addr.port)
            assert await conn.fetchval("SELECT 1") == 1
            await conn.close()
    records = inst.records[before:]
    assert [r.resumed for r in records] == [False, True, True]
    # The resumed sessions still carry the ephemeral certificate's identity.
    assert len({r.client_subject for r in records}) == 1
    assert records[0].client_subject

"""Which address sqlproxy dials, and which ports its listeners take."""

from __future__ import annotations

import socket

import pytest

from sqlproxy.emulator import Emulator
from tests.conftest import MAIN, PG, SECOND, connect, make_config, running_proxy


async def _query_through(pg: PG, host: str, port: int) -> int:
    conn = await connect(pg, host, port)
    try:
        return int(await conn.fetchval("SELECT 1"))
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("options", "ip_type"),
    [({}, "PRIMARY"), ({"private_ip": True}, "PRIVATE"), ({"psc": True}, "PSC")],
)
async def test_address_type_decides_which_ip_is_dialled(
    emulator: Emulator, pg: PG, options: dict[str, bool], ip_type: str
) -> None:
    inst = emulator.instance(MAIN)
    before = len(inst.records)
    async with running_proxy(make_config(emulator, MAIN, **options)) as proxy:
        addr = proxy.addresses[0]
        assert await _query_through(pg, addr.host, addr.port) == 1
    new = inst.records[before:]
    assert [r.ip_type for r in new] == [ip_type]
    assert new[0].address == inst.addresses[ip_type]
    assert new[0].accepted


async def test_query_parameter_overrides_global_private_ip(emulator: Emulator, pg: PG) -> None:
    inst = emulator.instance(MAIN)
    before = len(inst.records)
    config = make_config(emulator, f"{MAIN}?private-ip=false", private_ip=True)
    async with running_proxy(config) as proxy:
        addr = proxy.addresses[0]
        await _query_through(pg, addr.host, addr.port)
    assert [r.ip_type for r in inst.records[before:]] == ["PRIMARY"]


def free_port_pair() -> int:
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            base = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", base + 1))
                except OSError:
                    continue
                return int(base)
    raise RuntimeError("no two consecutive free ports")


async def test_several_instances_listen_on_incrementing_ports(emulator: Emulator, pg: PG) -> None:
    base = free_port_pair()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        explicit = s.getsockname()[1]
    config = make_config(emulator, MAIN, f"{SECOND}?port={explicit}", MAIN + "?port=0", port=base)
    # Two listeners for one instance are fine; the explicit port does not shift the others.
    async with running_proxy(config) as proxy:
        ports = {(a.instance, a.port) for a in proxy.addresses}
        assert (MAIN, base) in ports
        assert (SECOND, explicit) in ports
        for addr in proxy.addresses:
            assert await _query_through(pg, addr.host, addr.port) == 1
    main_records = emulator.instance(MAIN).records
    second_records = emulator.instance(SECOND).records
    assert main_records[-1].instance == MAIN
    assert second_records[-1].instance == SECOND


async def test_port_numbering_follows_googles_proxy(emulator: Emulator) -> None:
    base = free_port_pair()
    config = make_config(emulator, MAIN, SECOND, port=base)
    assert [(i.name, i.port) for i in config.instances] == [(MAIN, base), (SECOND, base + 1)]
    async with running_proxy(config) as proxy:
        assert sorted(a.port for a in proxy.addresses) == [base, base + 1]

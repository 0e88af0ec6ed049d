"""A Dask scheduler given with `--dask-address`, checked before a build starts.

Prefect's Dask task runner tries an address for 30 s and only once the flow run has begun (a temporary
server started, a run recorded as failed); a typo in the address (`tcp://host` without a port, a closed port,
a worker's address) should be one message up front instead.
"""
from __future__ import annotations

import asyncio

CONNECT_TIMEOUT_S = 10.0


async def _identity(address: str, timeout_s: float) -> dict:
    # The scheduler's own `identity` call, over one connection: a distributed.Client would also start a
    # heartbeat and, when it fails to connect, complain again at interpreter exit.
    from distributed.core import rpc

    async with rpc(address, timeout=timeout_s) as server:
        return await asyncio.wait_for(server.identity(), timeout_s)


def check_scheduler(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> int:
    """The number of workers of the Dask scheduler at `address` (0 is allowed: an adaptive cluster starts them
    on demand). Raises ValueError for an address that is not a scheduler's, ConnectionError when nothing
    answers there."""
    try:
        identity = asyncio.run(_identity(address, timeout_s))
    except ValueError as exc:
        raise ValueError(f"--dask-address {address!r} is not a scheduler address ({exc}); "
                         f"give tcp://HOST:PORT, e.g. tcp://10.0.0.1:8786") from None
    except (OSError, TimeoutError) as exc:
        why = str(exc) or f"nothing within {timeout_s:.0f} s"
        raise ConnectionError(f"no Dask scheduler answers at {address} ({why}); "
                              f"start one (`dask scheduler`) or leave out --dask-address") from None
    if identity.get("type") != "Scheduler":
        raise ValueError(f"--dask-address {address} is a Dask {identity.get('type', 'server')}, not the scheduler; "
                         f"give the scheduler's address (a worker's `scheduler` field: {identity.get('scheduler')})")
    return len(identity.get("workers", {}))

"""``syncbit server``: one trio process, one root nursery: the API and the liveness checker."""

from __future__ import annotations

import logging

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from ..config import ServerConfig
from .api import build_app
from .controlplane import ControlPlane
from .store import Store

log = logging.getLogger(__name__)


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.store = Store(config.db)
        self.cp = ControlPlane(self.store, node_down_after=config.node_down_after,
                               heartbeat_interval=config.heartbeat_interval)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg = HypercornConfig()
        cfg.bind = [self.config.listen]
        cfg.accesslog = None
        cfg.errorlog = logging.getLogger("syncbit.server.http")
        cfg.graceful_timeout = 1.0
        # Above any heartbeat interval: agents keep one connection instead of a new one per beat.
        cfg.keep_alive_timeout = 75
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, build_app(self.cp), cfg)
                nursery.start_soon(self._liveness)
                nursery.start_soon(self._signals, nursery.cancel_scope)
                log.info("control plane listening on %s (state in %s)", self.config.listen, self.config.db)
                task_status.started()
        finally:
            self.cp.flush()
            self.store.close()
            log.info("control plane stopped")

    async def _liveness(self) -> None:
        period = min(1.0, self.config.node_down_after / 4)
        while True:
            due = trio.current_time() + period
            await trio.sleep(period)
            self.cp.check_liveness(lag=trio.current_time() - due)

    async def _signals(self, scope: trio.CancelScope) -> None:
        import signal

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s; shutting down", signal.Signals(signum).name)
                scope.cancel()
                return

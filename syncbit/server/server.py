"""``syncbit server``: one trio process, one root nursery: the API and the liveness checker."""

from __future__ import annotations

import logging

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from ..config import ServerConfig, export_insecure_registries
from .api import build_app
from .controlplane import ControlPlane
from .store import Store

log = logging.getLogger(__name__)


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        export_insecure_registries(config.insecure_registries)
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
                if self.config.kubernetes.enabled:
                    await self._kubernetes(nursery)
                nursery.start_soon(self._liveness)
                nursery.start_soon(self._signals, nursery.cancel_scope)
                log.info("control plane listening on %s (state in %s)", self.config.listen, self.config.db)
                task_status.started()
        finally:
            self.cp.flush()
            self.store.close()
            log.info("control plane stopped")

    async def _kubernetes(self, nursery: trio.Nursery) -> None:
        """The admission webhook (HTTPS) and the controller (docs/kubernetes.md)."""
        from pathlib import Path

        from ..k8s import webhook
        from ..k8s.certs import webhook_certificate
        from ..k8s.client import KubeClient, KubeError
        from ..k8s.controller import KubeController

        kcfg = self.config.kubernetes
        # Placements select on Node labels too: none is recomputed before the first list of Nodes.
        self.cp.hold_placements(True)
        ca = None
        if kcfg.webhook_cert_file:
            cert_file, key_file = kcfg.webhook_cert_file, kcfg.webhook_key_file
        else:
            cert_file, key_file, ca = await trio.to_thread.run_sync(
                webhook_certificate, Path(self.config.db).resolve().parent / "webhook", kcfg.webhook_dns_names)
        hcfg = HypercornConfig()
        hcfg.bind = [kcfg.webhook_listen]
        hcfg.certfile, hcfg.keyfile = str(cert_file), str(key_file)
        hcfg.accesslog = None
        hcfg.errorlog = logging.getLogger("syncbit.k8s.webhook.http")
        hcfg.graceful_timeout = 1.0
        await nursery.start(serve, webhook.app(kcfg.mount_root), hcfg)
        log.info("kubernetes: webhook on https://%s%s", kcfg.webhook_listen, webhook.PATH)

        async def controller() -> None:
            # The API server may be unreachable for a while (a control plane upgrade, a
            # network hiccup): agents keep being served meanwhile; the controller starts later.
            delay = 1.0
            while True:
                try:
                    client = await KubeClient.connect(kcfg.kubeconfig or None)
                    break
                except KubeError as e:
                    log.warning("kubernetes: %s (retrying in %.0fs)", e, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 30.0)
            try:
                await KubeController(self.cp, kcfg, client, webhook_ca=ca).run()
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()

        nursery.start_soon(controller)

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


"""Prometheus metrics of the agent: one sample per VM per scrape, collected on demand."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.agent.runtime.machines import Machines

log = structlog.get_logger(__name__)
LABELS = ["namespace", "name", "uid"]


class MachineCollector(Collector):
    """Reads stats at scrape time (pull-only: nothing is sampled without a scraper).

    The scrape runs in prometheus-client's HTTP thread; stats are gathered on the
    agent's event loop so they see the same records the servicer does.
    """

    def __init__(self, machines: Machines, loop: asyncio.AbstractEventLoop) -> None:
        self.machines = machines
        self.loop = loop

    def collect(self) -> Iterator[Metric]:
        vcpu = CounterMetricFamily(
            "zmachine_vcpu_seconds", "CPU time of the VMM's vCPU threads", labels=LABELS
        )
        rss = GaugeMetricFamily("zmachine_vmm_memory_bytes", "RSS of the VMM", labels=LABELS)
        net_rx = CounterMetricFamily("zmachine_net_rx_bytes", "Bytes received", labels=LABELS)
        net_tx = CounterMetricFamily("zmachine_net_tx_bytes", "Bytes sent", labels=LABELS)
        blk_r = CounterMetricFamily("zmachine_block_read_bytes", "Disk bytes read", labels=LABELS)
        blk_w = CounterMetricFamily(
            "zmachine_block_write_bytes", "Disk bytes written", labels=LABELS
        )
        restarts = CounterMetricFamily(
            "zmachine_restarts", "VMM restarts by the supervisor", labels=LABELS
        )
        boot = GaugeMetricFamily(
            "zmachine_boot_duration_seconds", "VMM start to entrypoint handover", labels=LABELS
        )
        running = GaugeMetricFamily("zmachine_up", "1 if the VMM process runs", labels=LABELS)
        for rec in list(self.machines.records.values()):
            labels = [rec.ref.namespace, rec.ref.name, rec.ref.uid]
            restarts.add_metric(labels, rec.restarts)
            boot.add_metric(labels, rec.boot_duration)
            alive = rec.vmm is not None and rec.vmm.alive()
            running.add_metric(labels, 1.0 if alive else 0.0)
            if not alive:
                continue
            try:
                fut = asyncio.run_coroutine_threadsafe(self.machines.prov.stats(rec), self.loop)
                s = fut.result(timeout=5)
            except Exception as exc:
                log.warning("stats failed", uid=rec.ref.uid, error=str(exc))
                continue
            vcpu.add_metric(labels, s.vcpu_seconds)
            rss.add_metric(labels, s.vmm_rss_bytes)
            net_rx.add_metric(labels, s.net_rx_bytes)
            net_tx.add_metric(labels, s.net_tx_bytes)
            blk_r.add_metric(labels, s.block_read_bytes)
            blk_w.add_metric(labels, s.block_write_bytes)
        yield from (vcpu, rss, net_rx, net_tx, blk_r, blk_w, restarts, boot, running)

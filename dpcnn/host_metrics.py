"""System metrics from every host of a job, in its one MLflow run, told apart by host.

Rank 0's tracker samples its own host (MLflow's ``SystemMetricsMonitor``). When
the job spans several hosts, the lowest rank on each other host starts a sampler
of its own into the same run, and every sampler names its host (MLflow's
per-node system metrics: ``system/<host>/cpu_utilization_percentage``, ...), so
a user sees which machine is short of CPU or memory. On one host nothing changes
(``system/cpu_utilization_percentage``). The other hosts' samplers write to the
tracking URI from their side of the network: an ``http(s)://`` tracking server,
or a database every host reaches; with a local ``sqlite:`` file (which another
host cannot see) only rank 0's host is sampled, and a warning says so.
"""

from __future__ import annotations

import logging
import os

from .dist import Dist
from .system_metrics import finish_sampler
from .tracking import default_uri

log = logging.getLogger("dpcnn")
_RUNNING: list["HostMetrics"] = []
NODE_ENV = "MLFLOW_SYSTEM_METRICS_NODE_ID"  # MLflow's own setting: the node id of this process's samplers


def _hosts(dist: Dist) -> list[str]:
    return getattr(dist.watchdog, "hosts", None) or [os.uname().nodename]


def name_this_host(dist: Dist) -> None:
    """On a job over several hosts, name this process's samplers after its host."""
    hosts = _hosts(dist)
    if len(set(hosts)) > 1:
        os.environ.setdefault(NODE_ENV, hosts[dist.rank])


class HostMetrics:
    """The sampler of this host if this rank is its lowest one (and not rank 0); else nothing."""

    def __init__(self, tracking_cfg, dist: Dist, run_id: str | None):
        self.monitor = None
        hosts = _hosts(dist)
        if not (run_id and tracking_cfg.system_metrics and len(set(hosts)) > 1):
            return
        uri = tracking_cfg.uri or default_uri()
        if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
            if dist.is_root:
                log.warning("system metrics come from rank 0's host only: tracking.uri=%s is a local store the "
                            "other hosts cannot reach (use an mlflow server: tracking.uri=http://...)", uri)
            return
        if dist.is_root or hosts.index(hosts[dist.rank]) != dist.rank:
            return
        name_this_host(dist)
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=float(tracking_cfg.system_metrics_interval),
                                                node_id=hosts[dist.rank], tracking_uri=uri)
            self.monitor.start()
            _RUNNING.append(self)
        except Exception as e:  # noqa: BLE001 - metrics are not worth a failed run
            log.warning("system metrics of host %s disabled: %s: %s", hosts[dist.rank], type(e).__name__, e)
            self.monitor = None

    def finish(self) -> None:
        """Stop sampling. Called once rank 0 has ended the run (`finish_all`), so a host samples the
        whole run, its end phase included, not only its own part of the training."""
        if self.monitor is not None:
            finish_sampler(self.monitor)
            self.monitor = None


def finish_all() -> None:
    """Stop this process's host samplers (after the job's end-phase barrier)."""
    while _RUNNING:
        _RUNNING.pop().finish()

"""Stopping MLflow's system-metrics sampler so that no run loses its last sample.

Used by rank 0's tracker (`dpcnn.tracking.MlflowTracker`) and by every other host's sampler
(`dpcnn.host_metrics.HostMetrics`). No MPI and no MLflow import here: the monitor is MLflow's own.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def finish_sampler(monitor) -> None:
    """Stop MLflow's system-metrics sampler, and publish its last sample if it never published one.

    MLflow's sampler takes a sample, waits ``sampling_interval``, then publishes; stopped sooner (a run
    shorter than the interval), it drops the sample it holds and the run has no ``system/*`` metric at
    all. Here that sample is published at step 0, so every sampled host shows up in every run.
    """
    try:
        monitor.finish()
        if getattr(monitor, "_logging_step", 1) == 0:  # MLflow's counter of published samples
            metrics = monitor.aggregate_metrics()
            if not metrics:  # stopped before its thread took the first sample
                monitor.collect_metrics()
                metrics = monitor.aggregate_metrics()
            monitor.publish_metrics(metrics)
            monitor.mlflow_logger.flush()
    except Exception as e:  # noqa: BLE001 - metrics are not worth a failed run
        log.warning("stopping the system metrics sampler failed: %s: %s", type(e).__name__, e)

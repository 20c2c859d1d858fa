"""``producer plan``: what a load profile will do with a set of autoscaling values, before deploying them.

Pure core (no broker, no files), each module one concern:

* :mod:`producer.plan.pods`: one pod's service model (rows/s by batch size, prefetch, cold start) from
  ``worker calibrate --out`` / ``worker coldstart --out``;
* :mod:`producer.plan.values`: the chart's ``autoscaling.*`` (and ``worker.*``) values as a
  :class:`~producer.plan.control.Autoscaling`;
* :mod:`producer.plan.control`: KEDA's polling, activation and cooldown to zero, and the HPA's
  desired-replicas formula, tolerance, stabilization windows and scaling policies;
* :mod:`producer.plan.simulate`: the queue model: arrivals, prefetch windows, batches, pod start and
  SIGTERM drain, and what it costs (pod-seconds) and how requests fared (latency, past deadline);
* :mod:`producer.plan.search`: the cheapest values over a grid that meet a p99 or a deadline goal.

I/O apart: :mod:`producer.plan.cli` (files, printing) and :mod:`producer.plan.plot` (matplotlib).
"""

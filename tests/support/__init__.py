"""Test tooling shared by the tests, the fault-injection harness and the benchmarks (``bench/`` imports it).

:mod:`.models` (small ONNX models and a text model folder built on the spot), :mod:`.worker_process`
(the one way worker processes are started and watched), :mod:`.workers` (an in-process worker and an
RPC client that publishes many requests at once), :mod:`.tls_broker` (a second, TLS-only RabbitMQ node
with its certificates) and :mod:`.otlp_receiver` (a real OTLP/HTTP trace receiver). No tests here:
pytest collects none of these modules.
"""

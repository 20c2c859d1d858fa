"""The AMQP layer both sides share: connections and TLS, broker URLs, request messages, trace context, routes,
and the library's logging (``logs``: standard ``logging`` under ``qinfer.*``, silent unless configured).

Built on :mod:`producer.wire`; used by the client, bulk jobs, the load test, the CLI and the worker. Nothing here
imports the client or bulk code.
"""

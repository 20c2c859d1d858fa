"""The wire contract both sides stand on: messages, names, errors and rows. Pure: no broker, no aio-pika.

``protocol`` (Open Inference Protocol messages over AMQP), ``names`` (queues, headers, content types, queue
arguments), ``errors`` (the exception tree), ``rows`` (rows of several requests as one tensor). The worker and
every producer import these; nothing here imports the rest of the project.
"""

"""Baseline consumers the worker is measured against, run as separate processes.

* ``echo``: the cheapest correct consumer: reply with the request body, ack after the broker
  confirmed the reply (the worker's own guarantee), one message at a time.
* ``unbatched``: decode, run the model on this one request, reply, ack: what a consumer without
  batching does.

Usage: python -m bench.baselines {echo,unbatched} --queue Q [--model PATH] [--prefetch N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal

import aio_pika
import onnxruntime as ort

from producer.wire.names import DEFAULT_AMQP_URL, request_queue_arguments
from producer.wire.protocol import decode_request, encode_reply, reply_content_type


async def serve(kind: str, queue_name: str, model: str | None, prefetch: int) -> None:
    url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    consume_conn = await aio_pika.connect(url)
    publish_conn = await aio_pika.connect(url)
    publish = await publish_conn.channel(publisher_confirms=True)
    channel = await consume_conn.channel()
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.declare_queue(queue_name, durable=True, arguments=request_queue_arguments(queue_name))
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"]) if model else None
    output_names = [o.name for o in session.get_outputs()] if session else []

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = message.body
        content_type = message.content_type
        if session is not None:
            request = decode_request(body, content_type, default_id=message.correlation_id or "")
            values = session.run(output_names, request.inputs)
            content_type = reply_content_type(content_type)
            body = encode_reply(request.id, dict(zip(output_names, values, strict=True)), content_type, model_name="m")
        await publish.default_exchange.publish(
            aio_pika.Message(body, content_type=content_type, correlation_id=message.correlation_id),
            routing_key=message.reply_to or "",
            mandatory=False,
        )
        await message.ack()

    await queue.consume(on_message)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(json.dumps({"event": "ready", "kind": kind, "queue": queue_name}), flush=True)
    await stop.wait()
    await consume_conn.close()
    await publish_conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["echo", "unbatched"])
    parser.add_argument("--queue", required=True)
    parser.add_argument("--model", default=None, help="ONNX model (unbatched only)")
    parser.add_argument("--prefetch", type=int, default=256)
    args = parser.parse_args()
    asyncio.run(serve(args.kind, args.queue, args.model if args.kind == "unbatched" else None, args.prefetch))


if __name__ == "__main__":
    main()

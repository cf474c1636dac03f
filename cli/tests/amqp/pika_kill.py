"""Publisher confirms through a kill -9, with pika: a publisher and a consumer that
keep going while nodes die, for cli/tests/amqp.rs.

usage: pika_kill.py publish HOSTS PORT QUEUE FIRST END
       pika_kill.py consume HOSTS PORT QUEUE

HOSTS is a comma-separated list; each side connects to the first and, when its
connection breaks, to the next one (round-robin), as a client with several broker
addresses does.

publish: publishes "m-FIRST" ... "m-{END-1}" to the default exchange with routing key QUEUE,
one at a time on a confirm channel, and prints "confirmed m-i" once the broker acked
it. A nack, a timeout or a broken connection is retried (reconnecting if need be) until
the message is confirmed (the queue is declared, durable, on each new connection);
"done" at the end. A wait for a confirm ends when the connection breaks (heartbeats
every 10 s); the caller bounds the whole run.

consume: consumes QUEUE with manual acks and prints "got <body>" for each delivery
before acking it; reconnects when the connection breaks; runs until killed.
"""
import os
import sys
import time

import pika

MODE, HOSTS, PORT, QUEUE = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), sys.argv[4]


def say(line):
    try:
        print(line, flush=True)
    except BrokenPipeError:
        os._exit(0)  # the test is over


class Reconnecting:
    """A connection to one of HOSTS, replaced by one to the next host when it breaks."""

    def __init__(self):
        self.next_host = 0
        self.conn = None

    def open(self):
        while True:
            host = HOSTS[self.next_host % len(HOSTS)]
            self.next_host += 1
            try:
                params = pika.ConnectionParameters(host=host, port=PORT, heartbeat=10, blocked_connection_timeout=30,
                                                   socket_timeout=5, stack_timeout=15)
                self.conn = pika.BlockingConnection(params)
                say(f"connected {host}")
                return self.conn
            except pika.exceptions.AMQPError as e:
                say(f"connect {host} failed: {e!r}")
                time.sleep(0.5)

    def broken(self, e):
        say(f"connection lost: {e!r}")
        try:
            if self.conn is not None and self.conn.is_open:
                self.conn.close()
        except Exception:  # noqa: BLE001 - whatever state the socket is in
            pass
        self.conn = None
        # Retry the same host once first: a nack does not mean the node is gone.
        time.sleep(0.2)


def publish(first, end):
    link = Reconnecting()
    ch = None
    for i in range(first, end):
        body = f"m-{i}"
        while True:
            try:
                if ch is None or not ch.is_open:
                    ch = link.open().channel()
                    ch.confirm_delivery()
                    ch.queue_declare(queue=QUEUE, durable=True)
                # BlockingChannel.basic_publish waits for the confirm, processing
                # heartbeats meanwhile: a node that dies breaks the connection within
                # two heartbeats; the test bounds the whole run.
                ch.basic_publish(exchange="", routing_key=QUEUE, body=body,
                                 properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent))
                say(f"confirmed {body}")
                break
            except pika.exceptions.NackError as e:
                say(f"nack {body}: {e!r}")
                time.sleep(0.2)
            except (pika.exceptions.AMQPError, TimeoutError, OSError) as e:
                say(f"retry {body}: {e!r}")
                link.broken(e)
                ch = None
    say("done")


def consume():
    link = Reconnecting()
    while True:
        try:
            ch = link.open().channel()
            ch.basic_qos(prefetch_count=200)

            def on_message(ch, method, _props, body):
                say(f"got {body.decode()}")
                ch.basic_ack(delivery_tag=method.delivery_tag)

            ch.basic_consume(queue=QUEUE, on_message_callback=on_message)
            ch.start_consuming()
        except (pika.exceptions.AMQPError, OSError) as e:
            link.broken(e)


if MODE == "publish":
    publish(int(sys.argv[5]), int(sys.argv[6]))
elif MODE == "consume":
    consume()
else:
    sys.exit(f"unknown mode {MODE}")

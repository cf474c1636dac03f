"""Holds an exclusive queue, for cli/tests/amqp.rs: connects to HOST:PORT, declares
QUEUE exclusive (and KEPT, an ordinary queue, on the same connection), prints
"declared", then keeps the connection (and its heartbeats) until it breaks or the
caller kills it; prints "closed" when the broker side went away.

usage: pika_exclusive.py HOST PORT QUEUE KEPT
"""
import os
import sys

import pika

HOST, PORT, QUEUE, KEPT = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]


def say(line):
    try:
        print(line, flush=True)
    except BrokenPipeError:
        os._exit(0)  # the test is over


c = pika.BlockingConnection(pika.ConnectionParameters(host=HOST, port=PORT, heartbeat=10))
ch = c.channel()
ch.queue_declare(queue=QUEUE, exclusive=True)
ch.queue_declare(queue=KEPT)
say("declared")
try:
    while True:
        c.process_data_events(time_limit=1)
except pika.exceptions.AMQPError:
    say("closed")

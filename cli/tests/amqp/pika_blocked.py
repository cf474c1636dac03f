"""Waits for connection.blocked and connection.unblocked on two pika connections to one
node: one that announces the connection.blocked capability (pika's default) and one
that does not. Prints "connected" once both are open, then "blocked <reason>" and
"unblocked" as the first one is told, and "told-uncapable ..." should the other one be
told anything; ends after "unblocked" (or after 120 s).

usage: pika_blocked.py HOST PORT
"""
import sys
import time

import pika

HOST, PORT = sys.argv[1], int(sys.argv[2])


def connect(**kw):
    return pika.BlockingConnection(pika.ConnectionParameters(host=HOST, port=PORT, **kw))


capable = connect()
# pika replaces the whole capabilities table with this one: no connection.blocked.
uncapable = connect(client_properties={"capabilities": {"publisher_confirms": True, "basic.nack": True}})
events = []
capable.add_on_connection_blocked_callback(lambda _c, m: events.append(f"blocked {m.method.reason}"))
capable.add_on_connection_unblocked_callback(lambda _c, _m: events.append("unblocked"))
uncapable.add_on_connection_blocked_callback(lambda _c, _m: print("told-uncapable blocked", flush=True))
uncapable.add_on_connection_unblocked_callback(lambda _c, _m: print("told-uncapable unblocked", flush=True))
print("connected", flush=True)
deadline = time.time() + 120
while time.time() < deadline:
    capable.process_data_events(time_limit=0.1)
    uncapable.process_data_events(time_limit=0.1)
    while events:
        e = events.pop(0)
        print(e, flush=True)
        if e == "unblocked":
            # The other connection had as long to be told, had it been.
            uncapable.process_data_events(time_limit=1)
            print("done", flush=True)
            sys.exit(0)
print("FAIL timed out", flush=True)
sys.exit(1)

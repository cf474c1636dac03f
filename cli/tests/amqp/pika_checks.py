"""AMQP checks with pika, the Python client RabbitMQ's tutorials use.

Each check does what one of RabbitMQ's six tutorials does (hello world, work queues,
publish/subscribe, routing, topics, RPC), or provokes one AMQP exception, and prints
"ok <name>" when the client saw what it would see against RabbitMQ. Publishers and
consumers connect to different nodes. Every wait is bounded.

usage: pika_checks.py PUBLISH_HOST CONSUME_HOST PORT CHECK...
"""
import re
import sys
import time
import uuid

import pika

PUB, CON, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
WAIT_S = 20


def connect(host, **kw):
    params = pika.ConnectionParameters(host=host, port=PORT, connection_attempts=3, retry_delay=1, **kw)
    return pika.BlockingConnection(params)


def drain(channel, queue, want, auto_ack=True, prefetch=None):
    """Consumes from `queue` until `want` bodies arrived or WAIT_S passed."""
    got = []
    if prefetch:
        channel.basic_qos(prefetch_count=prefetch)

    def on_message(ch, method, _props, body):
        got.append(body.decode())
        if not auto_ack:
            ch.basic_ack(delivery_tag=method.delivery_tag)

    tag = channel.basic_consume(queue=queue, on_message_callback=on_message, auto_ack=auto_ack)
    deadline = time.time() + WAIT_S
    while len(got) < want and time.time() < deadline:
        channel.connection.process_data_events(time_limit=0.2)
    channel.basic_cancel(tag)
    return got


def expect(name, got, want):
    if got != want:
        print(f"FAIL {name}: got {got!r}, want {want!r}")
        sys.exit(1)
    print(f"ok {name}", flush=True)


def hello():
    c = connect(CON)
    ch = c.channel()
    ch.queue_declare(queue="hello")
    p = connect(PUB)
    p.channel().basic_publish(exchange="", routing_key="hello", body="Hello World!")
    p.close()
    expect("hello", drain(ch, "hello", 1), ["Hello World!"])
    c.close()


def work_queues():
    c = connect(CON)
    ch = c.channel()
    ch.queue_declare(queue="task_queue", durable=True)
    p = connect(PUB)
    pch = p.channel()
    pch.confirm_delivery()
    tasks = [f"task {i}{'.' * (i % 3)}" for i in range(10)]
    for t in tasks:
        pch.basic_publish(exchange="", routing_key="task_queue", body=t,
                          properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent))
    p.close()
    expect("work_queues", drain(ch, "task_queue", 10, auto_ack=False, prefetch=1), tasks)
    c.close()


def publish_subscribe():
    c = connect(CON)
    ch = c.channel()
    ch.exchange_declare(exchange="logs", exchange_type="fanout")
    queues = []
    for _ in range(2):
        q = ch.queue_declare(queue="", exclusive=True).method.queue
        assert q.startswith("amq.gen-"), q
        ch.queue_bind(exchange="logs", queue=q)
        queues.append(q)
    p = connect(PUB)
    pch = p.channel()
    pch.exchange_declare(exchange="logs", exchange_type="fanout")
    lines = [f"log {i}" for i in range(5)]
    for line in lines:
        pch.basic_publish(exchange="logs", routing_key="", body=line)
    p.close()
    got = [drain(ch, q, 5) for q in queues]
    expect("publish_subscribe", got, [lines, lines])
    c.close()


def routed(name, exchange, kind, binding_keys, publish_keys, want):
    """A server-named exclusive queue bound to `exchange` with each binding key gets,
    of messages published with `publish_keys` (bodies: the keys), exactly `want`."""
    c = connect(CON)
    ch = c.channel()
    ch.exchange_declare(exchange=exchange, exchange_type=kind)
    q = ch.queue_declare(queue="", exclusive=True).method.queue
    for key in binding_keys:
        ch.queue_bind(exchange=exchange, queue=q, routing_key=key)
    p = connect(PUB)
    pch = p.channel()
    for key in publish_keys:
        pch.basic_publish(exchange=exchange, routing_key=key, body=key)
    p.close()
    expect(name, drain(ch, q, len(want)), want)
    c.close()


def routing():
    routed("routing", "direct_logs", "direct", ["warning", "error"], ["info", "warning", "error", "info"],
           ["warning", "error"])


def topics():
    routed("topics", "topic_logs", "topic", ["kern.*", "*.critical"], ["kern.info", "app.info", "app.critical", "kern.disk.full"],
           ["kern.info", "app.critical"])


def rpc():
    server = connect(CON)
    sch = server.channel()
    sch.queue_declare(queue="rpc_queue")
    sch.basic_qos(prefetch_count=1)

    def on_request(ch, method, props, body):
        n = int(body)
        ch.basic_publish(exchange="", routing_key=props.reply_to,
                         properties=pika.BasicProperties(correlation_id=props.correlation_id),
                         body=str(n * n))
        ch.basic_ack(delivery_tag=method.delivery_tag)

    sch.basic_consume(queue="rpc_queue", on_message_callback=on_request)
    client = connect(PUB)
    cch = client.channel()
    callback = cch.queue_declare(queue="", exclusive=True).method.queue
    answers = {}

    def on_response(_ch, _method, props, body):
        answers[props.correlation_id] = int(body)

    cch.basic_consume(queue=callback, on_message_callback=on_response, auto_ack=True)
    corr = str(uuid.uuid4())
    cch.basic_publish(exchange="", routing_key="rpc_queue", body="30",
                      properties=pika.BasicProperties(reply_to=callback, correlation_id=corr))
    deadline = time.time() + WAIT_S
    while corr not in answers and time.time() < deadline:
        server.process_data_events(time_limit=0.1)
        client.process_data_events(time_limit=0.1)
    expect("rpc", answers.get(corr), 900)
    client.close()
    server.close()


def confirms_and_mandatory():
    c = connect(PUB)
    ch = c.channel()
    ch.confirm_delivery()
    ch.queue_declare(queue="confirmed")
    ch.basic_publish(exchange="", routing_key="confirmed", body="kept", mandatory=True)
    try:
        ch.basic_publish(exchange="", routing_key="no-such-queue", body="lost", mandatory=True)
        returned = False
    except pika.exceptions.UnroutableError:
        returned = True
    expect("confirms_and_mandatory", returned, True)
    c.close()


def dead_letters():
    """A quorum-queue style delivery limit with a dead-letter exchange: a message
    rejected (requeued) twice goes to the queue bound to the dead-letter exchange,
    with RabbitMQ's x-first-death-* headers."""
    c = connect(CON)
    ch = c.channel()
    ch.exchange_declare(exchange="dlx", exchange_type="fanout")
    ch.queue_declare(queue="dlq")
    ch.queue_bind(exchange="dlx", queue="dlq")
    ch.queue_declare(queue="jobs", arguments={"x-delivery-limit": 2, "x-dead-letter-exchange": "dlx"})
    p = connect(PUB)
    pch = p.channel()
    pch.confirm_delivery()
    pch.basic_publish(exchange="", routing_key="jobs", body="poison")
    p.close()
    rejected = 0
    deadline = time.time() + WAIT_S
    while rejected < 2 and time.time() < deadline:
        method, _props, _body = ch.basic_get(queue="jobs", auto_ack=False)
        if method:
            ch.basic_reject(delivery_tag=method.delivery_tag, requeue=True)
            rejected += 1
        else:
            time.sleep(0.1)
    got = None
    while got is None and time.time() < deadline:
        method, props, body = ch.basic_get(queue="dlq", auto_ack=True)
        if method:
            h = props.headers or {}
            got = (body.decode(), h.get("x-first-death-reason"), h.get("x-first-death-queue"), h.get("x-delivery-count"))
        else:
            time.sleep(0.1)
    expect("dead_letters", (rejected, got), (2, ("poison", "delivery_limit", "jobs", "2")))
    left, _, _ = ch.basic_get(queue="jobs", auto_ack=True)
    expect("dead_letters_not_redelivered", left, None)
    c.close()


def channel_error(name, code, action):
    c = connect(PUB)
    ch = c.channel()
    try:
        action(ch)
        got = None
    except pika.exceptions.ChannelClosedByBroker as e:
        got = e.reply_code
        # The broker's log line of the exception names the id at the end of the text.
        ids = re.findall(r" \[request id: ([0-9a-f]+)\]$", e.reply_text)
        print(f"request-id {name} {ids[0] if ids else 'none in ' + repr(e.reply_text)}", flush=True)
    expect(name, got, code)
    # The connection survives a channel exception.
    c.channel().queue_declare(queue="after-" + name)
    c.close()


def errors():
    channel_error("error_404_passive_queue", 404, lambda ch: ch.queue_declare(queue="missing", passive=True))
    channel_error("error_404_publish_exchange", 404,
                  lambda ch: (ch.confirm_delivery(), ch.basic_publish(exchange="missing-x", routing_key="k", body="x")))

    def redeclare(ch):
        ch.exchange_declare(exchange="typed", exchange_type="direct")
        ch.exchange_declare(exchange="typed", exchange_type="fanout")

    channel_error("error_406_exchange_type", 406, redeclare)
    channel_error("error_406_queue_argument", 406,
                  lambda ch: ch.queue_declare(queue="with-max-bytes", arguments={"x-max-length-bytes": 1000}))
    channel_error("error_403_reserved_name", 403, lambda ch: ch.exchange_declare(exchange="amq.mine", exchange_type="direct"))
    try:
        connect(PUB, virtual_host="no-such-vhost")
        got = None
    except pika.exceptions.AMQPConnectionError as e:
        # pika reports a close during the handshake as text: "... (530) 'NOT_ALLOWED - ...'"
        text = str(e)
        got = 530 if "(530)" in text and "NOT_ALLOWED" in text and "no-such-vhost" in text else text
    expect("error_530_vhost", got, 530)
    try:
        connect(PUB, credentials=pika.PlainCredentials("guest", "wrong"))
        got = None
    except pika.exceptions.ProbableAuthenticationError as e:
        got = "(403)" in str(e.args) and "wrong" not in str(e.args)
    expect("error_403_login", got, True)


def interop_prepare():
    c = connect(CON)
    ch = c.channel()
    ch.queue_declare(queue="interop-in")
    ch.queue_bind(exchange="interop-grpc", queue="interop-in")
    c.close()
    print("ok interop_prepare", flush=True)


def interop_consume():
    """Consumes what `eventtermq publish` sent to queue interop-in."""
    c = connect(CON)
    ch = c.channel()
    deadline = time.time() + WAIT_S
    while time.time() < deadline:
        method, props, body = ch.basic_get(queue="interop-in", auto_ack=True)
        if method:
            print(f"got body={body.decode()} content_type={props.content_type} "
                  f"headers={sorted((props.headers or {}).items())}", flush=True)
            return
        time.sleep(0.2)
    print("FAIL interop_consume: nothing")
    sys.exit(1)


def interop_publish():
    c = connect(PUB)
    ch = c.channel()
    ch.confirm_delivery()
    props = pika.BasicProperties(content_type="application/json", correlation_id="corr-7",
                                 headers={"source": "pika", "n": 3})
    ch.basic_publish(exchange="interop", routing_key="k", body='{"a": 1}', properties=props)
    c.close()
    print("ok interop_publish", flush=True)


def refused(name, code, text, action, host=None):
    """Runs `action` on a fresh channel of a new connection (to the publisher's node
    unless `host`): the broker must close that channel with `code` and a reply text
    containing `text`."""
    c = connect(host or PUB)
    ch = c.channel()
    try:
        action(ch)
        got = None
    except pika.exceptions.ChannelClosedByBroker as e:
        got = (e.reply_code, e.reply_text)
    c.close()
    if got is None or got[0] != code or text not in got[1]:
        print(f"FAIL {name}: got {got!r}, want {code} with {text!r}")
        sys.exit(1)
    print(f"ok {name}", flush=True)


def counts(queue):
    """(message_count, consumer_count) of a passive declare on the publisher's node."""
    c = connect(PUB)
    ok = c.channel().queue_declare(queue=queue, passive=True).method
    c.close()
    return ok.message_count, ok.consumer_count


def counts_become(name, queue, want):
    deadline = time.time() + WAIT_S
    got = counts(queue)
    while got != want and time.time() < deadline:
        time.sleep(0.2)
        got = counts(queue)
    expect(name, got, want)


def queue_ops():
    """declare-ok counts, queue.delete if-unused / if-empty and queue.purge, with the
    consumer on one node and the checks on another."""
    c = connect(CON)
    ch = c.channel()
    ok = ch.queue_declare(queue="counted").method
    expect("declare_ok_new_queue", (ok.message_count, ok.consumer_count), (0, 0))
    p = connect(PUB)
    pch = p.channel()
    pch.confirm_delivery()
    for i in range(5):
        pch.basic_publish(exchange="", routing_key="counted", body=f"m{i}")
    counts_become("declare_ok_message_count", "counted", (5, 0))
    got = []
    ch.basic_qos(prefetch_count=1)
    ch.basic_consume(queue="counted", on_message_callback=lambda _c, m, _p, b: got.append((m.delivery_tag, b.decode())))
    deadline = time.time() + WAIT_S
    while not got and time.time() < deadline:
        c.process_data_events(time_limit=0.2)
    expect("one_held_unacked", [b for _, b in got], ["m0"])
    # The unacknowledged message is not ready; the consumer counts wherever it is.
    counts_become("declare_ok_consumer_count", "counted", (4, 1))
    refused("delete_if_unused_406", 406, "queue 'counted' in vhost '/' in use",
            lambda x: x.queue_delete(queue="counted", if_unused=True))
    refused("delete_if_empty_406", 406, "queue 'counted' in vhost '/' not empty",
            lambda x: x.queue_delete(queue="counted", if_empty=True))
    purged = pch.queue_purge(queue="counted").method.message_count
    expect("purge_ok_count", purged, 4)
    expect("purged_counts", counts("counted"), (0, 1))
    pch.basic_publish(exchange="", routing_key="counted", body="after")
    ch.basic_ack(delivery_tag=got[0][0])
    deadline = time.time() + WAIT_S
    while len(got) < 2 and time.time() < deadline:
        c.process_data_events(time_limit=0.2)
    # Nothing purged comes back; what was published after the purge does.
    c.process_data_events(time_limit=1)
    expect("after_purge_delivered", [b for _, b in got], ["m0", "after"])
    ch.basic_ack(delivery_tag=got[1][0])
    c.close()
    counts_become("consumer_gone", "counted", (0, 0))
    ok = pch.queue_delete(queue="counted", if_unused=True, if_empty=True).method
    expect("delete_if_unused_if_empty", ok.message_count, 0)
    refused("deleted_404", 404, "no queue 'counted' in vhost '/'",
            lambda x: x.queue_declare(queue="counted", passive=True))
    refused("purge_missing_404", 404, "no queue 'missing' in vhost '/'", lambda x: x.queue_purge(queue="missing"))
    # A plain delete answers how many ready messages went with the queue.
    pch.queue_declare(queue="dropped")
    for i in range(3):
        pch.basic_publish(exchange="", routing_key="dropped", body=f"d{i}")
    counts_become("dropped_ready", "dropped", (3, 0))
    method, _, body = pch.basic_get(queue="dropped", auto_ack=True)
    expect("get_ok_message_count", (body.decode(), method.message_count), ("d0", 2))
    expect("delete_ok_count", pch.queue_delete(queue="dropped").method.message_count, 2)
    p.close()


def exclusive_consumers():
    """An exclusive consumer is refused while the queue has another consumer, and
    refuses every other consumer while it is there, across nodes (403, as RabbitMQ)."""
    def consume(exclusive):
        return lambda x: x.basic_consume(queue="solo", on_message_callback=lambda *a: None, exclusive=exclusive)

    c = connect(CON)
    ch = c.channel()
    ch.queue_declare(queue="solo")
    ch.basic_consume(queue="solo", on_message_callback=lambda *a: None, exclusive=True, consumer_tag="only")
    refused("exclusive_refuses_others_403", 403, "queue 'solo' in vhost '/' in exclusive use", consume(False))
    refused("second_exclusive_403", 403, "in exclusive use", consume(True))
    # basic.get is not a consumer: an exclusive consumer does not refuse it.
    p = connect(PUB)
    method, _, _ = p.channel().basic_get(queue="solo", auto_ack=True)
    expect("basic_get_beside_exclusive", method, None)
    # Once cancelled, others may consume (as soon as the group's node saw it go).
    ch.basic_cancel("only")
    deadline = time.time() + WAIT_S
    accepted = False
    while not accepted and time.time() < deadline:
        try:
            consume(False)(p.channel())
            accepted = True
        except pika.exceptions.ChannelClosedByBroker:
            time.sleep(0.2)
    expect("consume_after_exclusive_cancelled", accepted, True)
    refused("exclusive_refused_beside_others_403", 403, "in exclusive use", consume(True), host=CON)
    p.close()
    c.close()


def get_now(ch, queue):
    """A basic.get with auto-ack: the body, or None when the queue has nothing now."""
    method, _, body = ch.basic_get(queue=queue, auto_ack=True)
    return body.decode() if method else None


def get_all(ch, queue, want):
    """Gets with auto-ack until `want` bodies arrived (bounded)."""
    got = []
    deadline = time.time() + WAIT_S
    while len(got) < want and time.time() < deadline:
        body = get_now(ch, queue)
        if body is None:
            time.sleep(0.1)
        else:
            got.append(body)
    return got


def transactions():
    """tx.select / tx.commit / tx.rollback as RabbitMQ's: a transactional channel's
    publishes and acks wait for the commit; a rollback drops them (a rolled-back ack
    leaves the delivery unacknowledged)."""
    c = connect(CON)
    cch = c.channel()
    cch.queue_declare(queue="txq")
    p = connect(PUB)
    pch = p.channel()
    pch.tx_select()
    for b in ["t1", "t2", "t3"]:
        pch.basic_publish(exchange="", routing_key="txq", body=b)
    time.sleep(1)
    expect("tx_publishes_held", get_now(cch, "txq"), None)
    pch.tx_commit()
    # Stored before commit-ok: there at once.
    expect("tx_commit_publishes", [get_now(cch, "txq") for _ in range(3)], ["t1", "t2", "t3"])
    pch.basic_publish(exchange="", routing_key="txq", body="rolled-back")
    pch.tx_rollback()
    pch.basic_publish(exchange="", routing_key="txq", body="committed")
    pch.tx_commit()
    expect("tx_rollback_drops_publishes", get_all(cch, "txq", 1) + [get_now(cch, "txq")], ["committed", None])
    # An empty commit is fine; a mandatory message no queue takes comes back at commit.
    pch.tx_commit()
    returned = []
    pch.add_on_return_callback(lambda _ch, method, _props, body: returned.append((method.reply_code, body.decode())))
    pch.basic_publish(exchange="", routing_key="no-such-queue", body="unroutable", mandatory=True)
    pch.tx_commit()
    p.process_data_events(time_limit=0.5)
    expect("tx_mandatory_returned_at_commit", returned, [(312, "unroutable")])

    # Acks: a consumer's transactional channel.
    pch.basic_publish(exchange="", routing_key="txq", body="acked")
    pch.tx_commit()
    tch = c.channel()
    tch.tx_select()
    method = None
    deadline = time.time() + WAIT_S
    while method is None and time.time() < deadline:
        method, _, body = tch.basic_get(queue="txq", auto_ack=False)
    tch.basic_ack(delivery_tag=method.delivery_tag)
    tch.tx_rollback()
    # Rolled back: still unacknowledged, the same tag may be acked (or nacked) again.
    tch.basic_nack(delivery_tag=method.delivery_tag, requeue=True)
    time.sleep(1)
    expect("tx_nack_held", get_now(cch, "txq"), None)
    tch.tx_commit()
    method = None
    deadline = time.time() + WAIT_S
    while method is None and time.time() < deadline:
        method, _, body = tch.basic_get(queue="txq", auto_ack=False)
    expect("tx_nack_at_commit", (body.decode() if method else None, method and method.redelivered), ("acked", True))
    tch.basic_ack(delivery_tag=method.delivery_tag)
    tch.tx_commit()
    tch.close()
    # Acknowledged at commit: nothing comes back once its channel is closed.
    time.sleep(1)
    expect("tx_ack_at_commit", get_now(cch, "txq"), None)
    p.close()
    c.close()


def tx_errors():
    """406 as RabbitMQ answers: tx on a confirm channel, confirms on a tx channel,
    commit or rollback without tx.select; a transaction beyond --amqp-tx-messages-max
    (the test's nodes run with 5); a commit whose message cannot be stored."""
    refused("tx_select_on_confirm_406", 406, "cannot switch from confirm to tx mode",
            lambda ch: (ch.confirm_delivery(), ch.tx_select()))
    refused("confirm_select_on_tx_406", 406, "cannot switch from tx to confirm mode",
            lambda ch: (ch.tx_select(), ch.confirm_delivery()))
    refused("tx_commit_without_select_406", 406, "channel is not transactional", lambda ch: ch.tx_commit())
    refused("tx_rollback_without_select_406", 406, "channel is not transactional", lambda ch: ch.tx_rollback())
    c = connect(CON)
    c.channel().queue_declare(queue="txlimit")

    def beyond_limit(ch):
        ch.tx_select()
        for i in range(6):
            ch.basic_publish(exchange="", routing_key="txlimit", body=f"m{i}")
        ch.tx_commit()

    refused("tx_messages_max_406", 406, "at most 5 messages (--amqp-tx-messages-max)", beyond_limit)
    expect("tx_beyond_limit_dropped", get_now(c.channel(), "txlimit"), None)

    # A topic deleted between the publish and the commit: that message cannot be stored.
    ch = c.channel()
    ch.exchange_declare(exchange="tx-gone", exchange_type="fanout")
    ch.queue_declare(queue="tx-gone-q")
    ch.queue_bind(exchange="tx-gone", queue="tx-gone-q")

    def unstorable(tch):
        tch.tx_select()
        tch.basic_publish(exchange="tx-gone", routing_key="", body="x")
        ch.exchange_delete(exchange="tx-gone")
        time.sleep(0.5)  # every node applied the delete
        tch.tx_commit()

    refused("tx_commit_unstorable_406", 406, "partial tx completion: 1 of 1 messages could not be stored", unstorable)
    c.close()


def flow():
    """channel.flow active=false: the channel's consumers get nothing until it is
    active again (then all of it); publishing on that channel goes on."""
    c = connect(CON)
    ch = c.channel()
    ch.queue_declare(queue="flowq")
    got = []
    ch.basic_consume(queue="flowq", on_message_callback=lambda _c, _m, _p, body: got.append(body.decode()),
                     auto_ack=True)
    expect("flow_off_ok", ch.flow(False), False)
    p = connect(PUB)
    pch = p.channel()
    pch.confirm_delivery()
    pch.basic_publish(exchange="", routing_key="flowq", body="f1")
    # Publishing on the stopped channel is not affected.
    ch.confirm_delivery()
    ch.basic_publish(exchange="", routing_key="flowq", body="f2")
    deadline = time.time() + 2
    while time.time() < deadline:
        c.process_data_events(time_limit=0.2)
    expect("flow_off_nothing_delivered", got, [])
    expect("flow_on_ok", ch.flow(True), True)
    deadline = time.time() + WAIT_S
    while len(got) < 2 and time.time() < deadline:
        c.process_data_events(time_limit=0.2)
    expect("flow_on_delivered", sorted(got), ["f1", "f2"])
    p.close()
    c.close()



def dead_letter_queue(ch, exchange, queue):
    ch.exchange_declare(exchange=exchange, exchange_type="fanout")
    ch.queue_declare(queue=queue)
    ch.queue_bind(exchange=exchange, queue=queue)


def dead_letters_in(ch, queue, want):
    """(body, x-first-death-reason, x-first-death-queue) of `want` dead letters."""
    got = []
    deadline = time.time() + WAIT_S
    while len(got) < want and time.time() < deadline:
        method, props, body = ch.basic_get(queue=queue, auto_ack=True)
        if method:
            h = props.headers or {}
            got.append((body.decode(), h.get("x-first-death-reason"), h.get("x-first-death-queue")))
        else:
            time.sleep(0.1)
    return got


def ttl_and_max_length():
    """x-message-ttl: a message that waited longer is not delivered but dead-lettered
    (reason expired) without any consumer, or dropped without a dead-letter exchange;
    x-max-length: the oldest ready messages beyond it are dead-lettered (maxlen)."""
    c = connect(CON)
    ch = c.channel()
    dead_letter_queue(ch, "ttl-dlx", "ttl-dlq")
    ch.queue_declare(queue="ttlq", arguments={"x-message-ttl": 1000, "x-dead-letter-exchange": "ttl-dlx"})
    ch.queue_declare(queue="ttl-drop", arguments={"x-message-ttl": 500})
    p = connect(PUB)
    pch = p.channel()
    pch.confirm_delivery()
    pch.basic_publish(exchange="", routing_key="ttlq", body="old")
    pch.basic_publish(exchange="", routing_key="ttl-drop", body="dropped")
    expect("ttl_dead_lettered_expired", dead_letters_in(ch, "ttl-dlq", 1), [("old", "expired", "ttlq")])
    expect("ttl_not_delivered", get_now(ch, "ttlq"), None)
    time.sleep(1)
    expect("ttl_dropped_without_dlx", get_now(ch, "ttl-drop"), None)
    # Younger than its TTL: delivered.
    pch.basic_publish(exchange="", routing_key="ttlq", body="fresh")
    expect("ttl_fresh_delivered", get_all(ch, "ttlq", 1), ["fresh"])
    expect("ttl_fresh_not_dead", get_now(ch, "ttl-dlq"), None)

    dead_letter_queue(ch, "max-dlx", "max-dlq")
    ch.queue_declare(queue="maxq", arguments={"x-max-length": 2, "x-overflow": "drop-head",
                                              "x-dead-letter-exchange": "max-dlx"})
    for i in range(1, 6):
        pch.basic_publish(exchange="", routing_key="maxq", body=f"m{i}")
    expect("max_length_oldest_dead_lettered", dead_letters_in(ch, "max-dlq", 3),
           [("m1", "maxlen", "maxq"), ("m2", "maxlen", "maxq"), ("m3", "maxlen", "maxq")])
    expect("max_length_newest_kept", get_all(ch, "maxq", 2) + [get_now(ch, "maxq")], ["m4", "m5", None])
    # The delayed-retry pattern: expired messages dead-lettered through the default
    # exchange to another queue (x-dead-letter-routing-key).
    ch.queue_declare(queue="after-delay")
    ch.queue_declare(queue="delay", arguments={"x-message-ttl": 500, "x-dead-letter-exchange": "",
                                               "x-dead-letter-routing-key": "after-delay"})
    pch.basic_publish(exchange="", routing_key="delay", body="later")
    expect("dead_letter_routing_key", dead_letters_in(ch, "after-delay", 1), [("later", "expired", "delay")])
    p.close()
    c.close()
    refused("ttl_type_406", 406, "queue argument 'x-message-ttl': must be an integer",
            lambda ch: ch.queue_declare(queue="bad-ttl", arguments={"x-message-ttl": "1000"}))
    refused("ttl_range_406", 406, "queue argument 'x-message-ttl': -5 is out of range",
            lambda ch: ch.queue_declare(queue="bad-ttl", arguments={"x-message-ttl": -5}))
    refused("max_length_range_406", 406, "queue argument 'x-max-length': 0 is out of range",
            lambda ch: ch.queue_declare(queue="bad-max", arguments={"x-max-length": 0}))
    refused("overflow_reject_publish_406", 406, "'reject-publish' is not supported",
            lambda ch: ch.queue_declare(queue="bad-max", arguments={"x-max-length": 5,
                                                                    "x-overflow": "reject-publish"}))


def replay(ch, queue, offset, want):
    """Consumes `queue` with x-stream-offset `offset` until `want` bodies came, then
    a moment more (to see that nothing else comes); answers the bodies."""
    got = []
    tag = ch.basic_consume(queue=queue, on_message_callback=lambda c, m, _p, body: (
        got.append(body.decode()), c.basic_ack(delivery_tag=m.delivery_tag)), arguments={"x-stream-offset": offset})
    deadline = time.time() + WAIT_S
    while len(got) < want and time.time() < deadline:
        ch.connection.process_data_events(time_limit=0.2)
    ch.connection.process_data_events(time_limit=1)
    ch.basic_cancel(tag)
    return got


def stream_offsets():
    """x-stream-offset replays a queue's messages from a point without taking them
    from the queue: first, a timestamp, an interval, next; a numeric offset: 406."""
    import datetime
    c = connect(CON)
    ch = c.channel()
    ch.queue_declare(queue="replay-q")
    p = connect(PUB)
    pch = p.channel()
    pch.confirm_delivery()
    for b in ["a1", "a2"]:
        pch.basic_publish(exchange="", routing_key="replay-q", body=b)
    time.sleep(1.5)
    middle = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) + datetime.timedelta(seconds=1)
    time.sleep(2.5)
    pch.basic_publish(exchange="", routing_key="replay-q", body="b1")
    expect("stream_offset_first", replay(ch, "replay-q", "first", 3), ["a1", "a2", "b1"])
    expect("stream_offset_timestamp", replay(ch, "replay-q", middle, 1), ["b1"])
    expect("stream_offset_interval", replay(ch, "replay-q", "1h", 3), ["a1", "a2", "b1"])
    # Replays do not take messages from the queue.
    expect("stream_offset_queue_untouched", get_all(ch, "replay-q", 3), ["a1", "a2", "b1"])
    got = []
    tag = ch.basic_consume(queue="replay-q", on_message_callback=lambda _c, _m, _p, body: got.append(body.decode()),
                           auto_ack=True, arguments={"x-stream-offset": "next"})
    pch.basic_publish(exchange="", routing_key="replay-q", body="c1")
    deadline = time.time() + WAIT_S
    while not got and time.time() < deadline:
        c.process_data_events(time_limit=0.2)
    c.process_data_events(time_limit=1)
    ch.basic_cancel(tag)
    expect("stream_offset_next", got, ["c1"])
    p.close()
    c.close()
    refused("stream_offset_numeric_406", 406, "consumer argument 'x-stream-offset': numeric offsets are not supported",
            lambda ch: ch.basic_consume(queue="replay-q", on_message_callback=lambda *a: None,
                                        arguments={"x-stream-offset": 5}))
    refused("stream_offset_bad_406", 406, "'x-stream-offset': 'sometime' is not",
            lambda ch: ch.basic_consume(queue="replay-q", on_message_callback=lambda *a: None,
                                        arguments={"x-stream-offset": "sometime"}))


def batched_acks_bad_tag():
    """One basic.ack per message sent in one burst (the broker sends them to the
    queue's group together), the last one of an unknown tag: the channel is closed
    with 406 naming the tag, the messages acked before it stay acked, the one left
    unacknowledged comes again."""
    n = 50
    c = connect(CON)
    ch = c.channel()
    ch.queue_declare(queue="burst-acks", durable=True)
    p = connect(PUB)
    pch = p.channel()
    pch.confirm_delivery()
    for i in range(n):
        pch.basic_publish(exchange="", routing_key="burst-acks", body=f"b-{i}")
    p.close()
    tags = []
    ch.basic_consume(queue="burst-acks", on_message_callback=lambda _c, m, _p, b: tags.append((m.delivery_tag, b.decode())))
    deadline = time.time() + WAIT_S
    while len(tags) < n and time.time() < deadline:
        c.process_data_events(time_limit=0.2)
    if [b for _, b in tags] != [f"b-{i}" for i in range(n)]:
        print(f"FAIL batched_acks_bad_tag: delivered {tags!r}")
        sys.exit(1)
    for tag, _ in tags[:-1]:
        ch.basic_ack(delivery_tag=tag)
    ch.basic_ack(delivery_tag=999)
    got = None
    try:
        # A synchronous method after the acks: pika raises the channel's close here.
        ch.queue_declare(queue="burst-acks", passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        got = (e.reply_code, e.reply_text)
    if got is None or got[0] != 406 or "unknown delivery tag 999" not in got[1]:
        print(f"FAIL batched_acks_bad_tag: got {got!r}, want 406 naming delivery tag 999")
        sys.exit(1)
    c.close()
    c = connect(CON)
    again = get_all(c.channel(), "burst-acks", 2)
    c.close()
    expect("batched_acks_bad_tag", again, [f"b-{n - 1}"])


CHECKS = {f.__name__: f for f in [hello, work_queues, publish_subscribe, routing, topics, rpc,
                                  confirms_and_mandatory, dead_letters, errors, interop_prepare, interop_consume, interop_publish,
                                  queue_ops, exclusive_consumers, transactions, tx_errors, flow, ttl_and_max_length, stream_offsets,
                                  batched_acks_bad_tag]}

for name in sys.argv[4:]:
    CHECKS[name]()

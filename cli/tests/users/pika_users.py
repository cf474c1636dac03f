"""AMQP logins and permissions against a broker that has users (cli/tests/users.rs).

Usage: pika_users.py HOST AMQP_PORT USER PASSWORD WRONG_PASSWORD
USER has `read` (and nothing else) on vhost `a`, whose queue `g` holds one message
published by the test; vhost `b` exists and USER has no permissions there. Prints one
line per check passed; exits non-zero on the first failure.
"""
import sys

import pika

HOST, PORT, USER, PASSWORD, WRONG = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]


def params(user, password, vhost):
    return pika.ConnectionParameters(
        host=HOST, port=PORT, virtual_host=vhost,
        credentials=pika.PlainCredentials(user, password),
        connection_attempts=1, socket_timeout=10, blocked_connection_timeout=10,
    )


def refused_login(user, password, vhost="a"):
    try:
        pika.BlockingConnection(params(user, password, vhost)).close()
    except (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError,
            pika.exceptions.ProbableAccessDeniedError) as e:
        return str(e)
    except pika.exceptions.ConnectionClosedByBroker as e:
        return f"{e.reply_code} {e.reply_text}"
    raise AssertionError(f"login of {user!r} to {vhost!r} was accepted")


# A wrong password, and guest/guest once users exist: refused (403 ACCESS_REFUSED).
text = refused_login(USER, WRONG)
assert "ACCESS_REFUSED" in text and USER in text and WRONG not in text, text
print("wrong password refused:", text)
text = refused_login("guest", "guest")
assert "ACCESS_REFUSED" in text, text
print("guest refused once users exist")

# The right password: in, on vhost a.
conn = pika.BlockingConnection(params(USER, PASSWORD, "a"))
ch = conn.channel()
method, _props, body = ch.basic_get("g", auto_ack=True)
assert method is not None and body == b"for-amqp", (method, body)
print("read permitted: got", body.decode())

# Publishing needs `write`: the channel is closed with 403 naming user, vhost, permission.
try:
    ch.basic_publish(exchange="t", routing_key="", body=b"denied")
    ch.basic_get("g")  # a round trip: the channel.close arrives before its answer
    raise AssertionError("publish without write permission was accepted")
except pika.exceptions.ChannelClosedByBroker as e:
    assert e.reply_code == 403, (e.reply_code, e.reply_text)
    for word in ["ACCESS_REFUSED", "vhost 'a'", USER, '"a"', "write"]:
        assert word in e.reply_text, (word, e.reply_text)
    print("publish refused:", e.reply_text)

# Declaring needs `configure`.
ch = conn.channel()
try:
    ch.queue_declare("new-queue")
    raise AssertionError("declare without configure permission was accepted")
except pika.exceptions.ChannelClosedByBroker as e:
    assert e.reply_code == 403 and "configure" in e.reply_text, (e.reply_code, e.reply_text)
    print("declare refused:", e.reply_text)
conn.close()

# Vhost b: no permissions there at all.
text = refused_login(USER, PASSWORD, "b")
assert "530" in text and USER in text and '"b"' in text, text
print("vhost b refused:", text)

"""SASL EXTERNAL over AMQPS against a TLS cluster whose client certificates are users
(cli/tests/security.rs).

Usage: pika_external.py HOST AMQPS_PORT CA_FILE DIR ADMIN_PASSWORD
DIR holds the client certificates and keys the test issued: carol.crt/.key (user carol:
write `^t$` and read `^g$` on vhost `a`, none on `b`), mallory.crt/.key (a name that is
no user), carol-expired.crt/.key. Prints one line per check passed; exits non-zero on
the first failure.
"""
import os
import ssl
import sys

import pika

HOST, PORT, CA, DIR, ADMIN_PASSWORD = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]


def params(name, vhost="a", credentials=None):
    ctx = ssl.create_default_context(cafile=CA)
    ctx.load_cert_chain(os.path.join(DIR, name + ".crt"), os.path.join(DIR, name + ".key"))
    return pika.ConnectionParameters(
        host=HOST, port=PORT, virtual_host=vhost,
        credentials=credentials or pika.credentials.ExternalCredentials(),
        ssl_options=pika.SSLOptions(ctx, server_hostname=HOST),
        connection_attempts=1, socket_timeout=10, blocked_connection_timeout=10,
    )


def refused_login(p):
    try:
        pika.BlockingConnection(p).close()
    except (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError,
            pika.exceptions.ProbableAccessDeniedError) as e:
        return str(e)
    except pika.exceptions.ConnectionClosedByBroker as e:
        return f"{e.reply_code} {e.reply_text}"
    raise AssertionError("the login was accepted")


# carol by her certificate alone: in on vhost a, publishes to t and reads it from g.
conn = pika.BlockingConnection(params("carol"))
ch = conn.channel()
ch.confirm_delivery()
ch.basic_publish(exchange="t", routing_key="", body=b"by-certificate")
print("EXTERNAL login as carol; publish confirmed")
for _ in range(200):
    method, _props, body = ch.basic_get("g", auto_ack=True)
    if method is None:
        conn.sleep(0.05)
    elif body == b"by-certificate":
        break
else:
    raise AssertionError("the message published over AMQPS never reached g")
print("read permitted: got", body.decode())

# Her permissions apply: no write on exchange u (her write pattern is ^t$).
try:
    ch.basic_publish(exchange="u", routing_key="", body=b"denied")
    ch.basic_get("g")  # a round trip: the channel.close arrives before its answer
    raise AssertionError("publish without write permission was accepted")
except pika.exceptions.ChannelClosedByBroker as e:
    assert e.reply_code == 403, (e.reply_code, e.reply_text)
    for word in ["carol", '"a"', "write"]:
        assert word in e.reply_text, (word, e.reply_text)
    print("publish to u refused:", e.reply_text)
conn.close()

# Vhost b: no permissions there at all.
text = refused_login(params("carol", vhost="b"))
assert "530" in text and "carol" in text and '"b"' in text, text
print("vhost b refused:", text)

# A certificate naming no user of the cluster.
text = refused_login(params("mallory"))
assert "ACCESS_REFUSED" in text and "EXTERNAL" in text and '"mallory"' in text and "does not exist" in text, text
print("unknown user refused:", text)

# An expired certificate: refused naming its user and when it expired.
text = refused_login(params("carol-expired"))
assert "ACCESS_REFUSED" in text and '"carol"' in text and "expired at" in text, text
print("expired certificate refused:", text)

# carol's certificate with admin's password: refused naming both, never picking one.
text = refused_login(params("carol", credentials=pika.PlainCredentials("admin", ADMIN_PASSWORD)))
assert "ACCESS_REFUSED" in text and '"carol"' in text and '"admin"' in text, text
assert ADMIN_PASSWORD not in text, text
print("another user's password on carol's certificate refused:", text)

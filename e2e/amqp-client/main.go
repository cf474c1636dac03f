// amqp-roundtrip: the e2e scenario `amqp-client` runs this in a pod against the
// client Service's `amqp` port. A real AMQP 0.9.1 client (github.com/rabbitmq/amqp091-go)
// that checks, in order:
//
//  1. exchange.declare of the Topic resource's exchange with its type: declare-ok;
//     with another type: 406 PRECONDITION_FAILED (the resource's type stays);
//  2. queue.declare passive of the ConsumerGroup resource's group: declare-ok;
//  3. a queue of its own bound to that exchange; -count messages published on a
//     confirm channel with properties and a header table (nested table, array,
//     decimal, byte array, timestamp), every one acked by the broker;
//  4. the same messages consumed from its queue and from the resource's group, with
//     body, properties and headers as published (manual acks);
//  5. exchange.declare of -first-exchange (direct), before any Topic resource names
//     it; and, last, queue.delete of the resource's group (the scenario then checks
//     that the operator puts both back to the resources' specs).
//
// Prints one `ok ...` line per step; on the first failure prints `FAIL step: reason`
// and exits 1.
//
// Credentials: -user and -password-file (a mounted Secret key) replace the user
// information of -url (the password URL-escaped as needed). With -expect-refused the
// program only logs in, once, and succeeds when the broker refuses the login with
// 403 ACCESS_REFUSED (a wrong password, or no user of that name).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	neturl "net/url"
	"os"
	"reflect"
	"strconv"
	"strings"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

var (
	url           = flag.String("url", "amqp://guest:guest@emq:16001/", "AMQP URL (the client Service's amqp port)")
	exchange      = flag.String("exchange", "e2e-amqp", "exchange of the Topic resource (its defaultExchangeType is -exchange-type)")
	exchangeType  = flag.String("exchange-type", "fanout", "the Topic resource's defaultExchangeType")
	group         = flag.String("group", "e2e-amqp-group", "queue of the ConsumerGroup resource bound to -exchange")
	queue         = flag.String("queue", "e2e-amqp-roundtrip", "queue this program declares and binds to -exchange")
	firstExchange = flag.String("first-exchange", "e2e-amqp-first", "exchange declared here (direct) before a Topic resource names it")
	count         = flag.Int("count", 200, "messages to publish and consume")
	timeout       = flag.Duration("timeout", 90*time.Second, "time for the whole run")
	user          = flag.String("user", "", "user name to log in as (replaces the user information of -url)")
	passwordFile  = flag.String("password-file", "", "file holding -user's password (trailing whitespace ignored)")
	expectRefused = flag.Bool("expect-refused", false, "only log in, and succeed when the login is refused with 403")
)

// dialURL is -url with -user and the password of -password-file as its user
// information, when they are given.
func dialURL() string {
	if *user == "" {
		return *url
	}
	parsed, err := neturl.Parse(*url)
	if err != nil {
		fail("url", err)
	}
	password := ""
	if *passwordFile != "" {
		data, err := os.ReadFile(*passwordFile)
		if err != nil {
			fail("password-file", err)
		}
		password = strings.TrimRight(string(data), " \t\r\n")
	}
	parsed.User = neturl.UserPassword(*user, password)
	return parsed.String()
}

// refusedLogin is whether err is the broker refusing a login: amqp091-go reports a
// connection closed after start-ok as ErrCredentials (403), or the server's close.
func refusedLogin(err error) bool {
	var amqpErr *amqp.Error
	return errors.Is(err, amqp.ErrCredentials) || (errors.As(err, &amqpErr) && amqpErr.Code == amqp.AccessRefused)
}

func fail(step string, err error) {
	fmt.Printf("FAIL %s: %v\n", step, err)
	os.Exit(1)
}

func ok(format string, a ...any) { fmt.Printf("ok "+format+"\n", a...) }

// The header table of message i; amqp091-go decodes each value back to these types.
func headers(i int) amqp.Table {
	return amqp.Table{
		"x-e2e":   "amqp-roundtrip",
		"n":       int32(i),
		"big":     int64(1) << 40,
		"flag":    true,
		"decimal": amqp.Decimal{Scale: 2, Value: 12345},
		"bytes":   []byte{0, 1, 2, 255},
		"when":    time.Unix(1700000000, 0).UTC(),
		"nested": amqp.Table{
			"list":  []interface{}{int32(1), "two", amqp.Table{"three": int32(3)}},
			"empty": amqp.Table{},
		},
	}
}

func publishing(i int) amqp.Publishing {
	return amqp.Publishing{
		Headers:       headers(i),
		ContentType:   "application/json",
		DeliveryMode:  amqp.Persistent,
		CorrelationId: "corr-" + strconv.Itoa(i),
		MessageId:     "e2e-amqp-" + strconv.Itoa(i),
		ReplyTo:       "e2e-reply",
		Type:          "e2e.roundtrip",
		AppId:         "amqp-roundtrip",
		Timestamp:     time.Unix(1700000000+int64(i), 0).UTC(),
		Body:          []byte(fmt.Sprintf(`{"n": %d}`, i)),
	}
}

// check compares a delivery with what message i was published as.
func check(d amqp.Delivery) (int, error) {
	i, err := strconv.Atoi(strings.TrimPrefix(d.MessageId, "e2e-amqp-"))
	if err != nil {
		return 0, fmt.Errorf("message id %q is not one of ours", d.MessageId)
	}
	p := publishing(i)
	if string(d.Body) != string(p.Body) {
		return i, fmt.Errorf("message %d: body %q, want %q", i, d.Body, p.Body)
	}
	got := []string{d.ContentType, d.CorrelationId, d.ReplyTo, d.Type, d.AppId, strconv.Itoa(int(d.DeliveryMode)), d.Timestamp.UTC().String()}
	want := []string{p.ContentType, p.CorrelationId, p.ReplyTo, p.Type, p.AppId, strconv.Itoa(int(p.DeliveryMode)), p.Timestamp.String()}
	if !reflect.DeepEqual(got, want) {
		return i, fmt.Errorf("message %d: properties %q, want %q", i, got, want)
	}
	if d.Headers["when"] != nil {
		// A timestamp decodes in the local zone; compare instants.
		if t, isTime := d.Headers["when"].(time.Time); isTime {
			d.Headers["when"] = t.UTC()
		}
	}
	if !reflect.DeepEqual(d.Headers, p.Headers) {
		return i, fmt.Errorf("message %d: headers %#v, want %#v", i, d.Headers, p.Headers)
	}
	return i, nil
}

// consumeAll reads -count messages of one run from q and checks every one.
func consumeAll(ctx context.Context, ch *amqp.Channel, q string) error {
	if err := ch.Qos(50, 0, false); err != nil {
		return err
	}
	deliveries, err := ch.ConsumeWithContext(ctx, q, "", false, false, false, false, nil)
	if err != nil {
		return err
	}
	seen := make(map[int]bool)
	for len(seen) < *count {
		select {
		case d, open := <-deliveries:
			if !open {
				return fmt.Errorf("the consumer was closed after %d of %d messages", len(seen), *count)
			}
			i, err := check(d)
			if err != nil {
				return err
			}
			seen[i] = true
			if err := d.Ack(false); err != nil {
				return err
			}
		case <-ctx.Done():
			return fmt.Errorf("%d of %d messages within the time", len(seen), *count)
		}
	}
	return nil
}

func main() {
	flag.Parse()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	var conn *amqp.Connection
	var err error
	target := dialURL()
	for {
		conn, err = amqp.Dial(target)
		// A refused login is an answer, not a broker still starting.
		if err == nil || ctx.Err() != nil || refusedLogin(err) {
			break
		}
		time.Sleep(time.Second)
	}
	if *expectRefused {
		if err == nil {
			conn.Close()
			fail("login", errors.New("the broker took the login, expected 403 ACCESS_REFUSED"))
		}
		if !refusedLogin(err) {
			fail("login", fmt.Errorf("expected 403 ACCESS_REFUSED, got: %w", err))
		}
		ok("login refused: %v", err)
		ok("done")
		return
	}
	if err != nil {
		fail("connect", err)
	}
	defer conn.Close()
	ok("connected to %s (server %v %v)", strings.SplitN(*url, "@", 2)[len(strings.SplitN(*url, "@", 2))-1],
		conn.Properties["product"], conn.Properties["version"])

	ch, err := conn.Channel()
	if err != nil {
		fail("channel", err)
	}
	// 1. The Topic resource's exchange.
	if err := ch.ExchangeDeclare(*exchange, *exchangeType, true, false, false, false, nil); err != nil {
		fail("exchange.declare of the Topic resource's exchange with its type", err)
	}
	ok("exchange.declare %s type %s: declare-ok", *exchange, *exchangeType)
	other := "direct"
	if *exchangeType == "direct" {
		other = "topic"
	}
	conflict, err := conn.Channel()
	if err != nil {
		fail("channel", err)
	}
	err = conflict.ExchangeDeclare(*exchange, other, true, false, false, false, nil)
	var amqpErr *amqp.Error
	if !errors.As(err, &amqpErr) || amqpErr.Code != amqp.PreconditionFailed {
		fail("exchange.declare with another type", fmt.Errorf("got %v, want 406 PRECONDITION_FAILED", err))
	}
	ok("exchange.declare %s type %s: %d %s", *exchange, other, amqpErr.Code, amqpErr.Reason)

	// 2. The ConsumerGroup resource's group is a queue.
	if _, err := ch.QueueDeclarePassive(*group, true, false, false, false, nil); err != nil {
		fail("queue.declare passive of the ConsumerGroup resource's group", err)
	}
	ok("queue.declare passive %s: declare-ok", *group)

	// 3. A queue of our own; publish with confirms.
	if _, err := ch.QueueDeclare(*queue, true, false, false, false, nil); err != nil {
		fail("queue.declare", err)
	}
	if err := ch.QueueBind(*queue, "", *exchange, false, nil); err != nil {
		fail("queue.bind", err)
	}
	if err := ch.Confirm(false); err != nil {
		fail("confirm.select", err)
	}
	started := time.Now()
	confirms := make([]*amqp.DeferredConfirmation, 0, *count)
	for i := 0; i < *count; i++ {
		dc, err := ch.PublishWithDeferredConfirmWithContext(ctx, *exchange, "", true, false, publishing(i))
		if err != nil {
			fail("basic.publish", err)
		}
		confirms = append(confirms, dc)
	}
	for i, dc := range confirms {
		acked, err := dc.WaitContext(ctx)
		if err != nil {
			fail("publisher confirms", fmt.Errorf("message %d: %v", i, err))
		}
		if !acked {
			fail("publisher confirms", fmt.Errorf("message %d was nacked", i))
		}
	}
	ok("published %d messages to %s, every one confirmed (basic.ack) in %v", *count, *exchange, time.Since(started).Round(time.Millisecond))

	// 4. Consumed from our queue and from the resource's group, as published.
	for _, q := range []string{*queue, *group} {
		c, err := conn.Channel()
		if err != nil {
			fail("channel", err)
		}
		if err := consumeAll(ctx, c, q); err != nil {
			fail("consume from "+q, err)
		}
		_ = c.Close()
		ok("consumed %d messages from queue %s: body, properties and headers as published", *count, q)
	}

	// 5. An exchange declared here first; the resource's group deleted over AMQP.
	if err := ch.ExchangeDeclare(*firstExchange, "direct", true, false, false, false, nil); err != nil {
		fail("exchange.declare of an exchange no Topic resource names yet", err)
	}
	ok("exchange.declare %s type direct: declare-ok", *firstExchange)
	if _, err := ch.QueueDelete(*queue, false, false, false); err != nil {
		fail("queue.delete of our own queue", err)
	}
	if _, err := ch.QueueDelete(*group, false, false, false); err != nil {
		fail("queue.delete of the ConsumerGroup resource's group", err)
	}
	ok("queue.delete %s and %s: delete-ok", *queue, *group)
	if err := conn.Close(); err != nil {
		fail("connection.close", err)
	}
	ok("done")
}

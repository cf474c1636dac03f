// natsw2: client for the NATS JetStream reference benchmark in
// bench/reference/nats (see README.md there). It sets up the R3 stream, waits
// for the cluster, and measures one-at-a-time synchronous publishes (W2).
//
// Modes:
//
//	natsw2 -mode wait   -urls u1,u2,u3            wait until every server answers the JetStream API (meta leader known)
//	natsw2 -mode setup  -urls u1,u2,u3            create the stream, wait for a leader + all replicas current, print the leader's name
//	natsw2 -mode leader -urls u1,u2,u3            print the current stream leader's name
//	natsw2 -mode pub    -url u -n 5000 -warmup 200 -size 1024 -label "..."
//	                                              sequential synchronous js.Publish, print one JSON line with p50/p99 (µs)
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

var (
	mode     = flag.String("mode", "", "wait|setup|leader|pub")
	urls     = flag.String("urls", "", "comma-separated server URLs (wait/setup/leader)")
	url      = flag.String("url", "", "server URL to connect to (pub)")
	stream   = flag.String("stream", "BENCH", "stream name")
	subject  = flag.String("subject", "bench", "stream subject")
	replicas = flag.Int("replicas", 3, "stream replicas")
	n        = flag.Int("n", 5000, "measured messages")
	warmup   = flag.Int("warmup", 200, "warm-up messages (not measured)")
	size     = flag.Int("size", 1024, "payload size in bytes")
	label    = flag.String("label", "nats W2", "bench label for the JSON output")
	timeout  = flag.Duration("timeout", 60*time.Second, "overall deadline for wait/setup loops")
	pubTO    = flag.Duration("pubtimeout", 10*time.Second, "per-publish timeout")
)

func die(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "natsw2: "+format+"\n", a...)
	os.Exit(1)
}

func connect(u string) (*nats.Conn, jetstream.JetStream, error) {
	nc, err := nats.Connect(u,
		nats.Name("natsw2"),
		nats.NoReconnect(), // never silently move to another server
		nats.Timeout(2*time.Second),
	)
	if err != nil {
		return nil, nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	return nc, js, nil
}

func splitURLs() []string {
	var out []string
	for _, u := range strings.Split(*urls, ",") {
		if u = strings.TrimSpace(u); u != "" {
			out = append(out, u)
		}
	}
	if len(out) == 0 {
		die("-urls required")
	}
	return out
}

// waitJS: every server must accept a connection and answer $JS.API.INFO
// (which needs a JetStream meta leader in clustered mode).
func waitJS(deadline time.Time) {
	for _, u := range splitURLs() {
		var lastErr error
		for {
			if time.Now().After(deadline) {
				die("timeout waiting for JetStream on %s: %v", u, lastErr)
			}
			nc, js, err := connect(u)
			if err == nil {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				_, err = js.AccountInfo(ctx)
				cancel()
				nc.Close()
				if err == nil {
					break
				}
			}
			lastErr = err
			time.Sleep(250 * time.Millisecond)
		}
	}
}

func streamInfo(js jetstream.JetStream) (*jetstream.StreamInfo, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, *stream)
	if err != nil {
		return nil, err
	}
	return s.Info(ctx)
}

// anyConn connects to the first server that accepts.
func anyConn(deadline time.Time) (*nats.Conn, jetstream.JetStream) {
	var lastErr error
	for {
		for _, u := range splitURLs() {
			nc, js, err := connect(u)
			if err == nil {
				return nc, js
			}
			lastErr = err
		}
		if time.Now().After(deadline) {
			die("cannot connect to any server: %v", lastErr)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func setup(deadline time.Time) {
	nc, js := anyConn(deadline)
	defer nc.Close()
	cfg := jetstream.StreamConfig{
		Name:     *stream,
		Subjects: []string{*subject},
		Replicas: *replicas,
		Storage:  jetstream.FileStorage,
	}
	var lastErr error
	for {
		if time.Now().After(deadline) {
			die("timeout creating stream: %v", lastErr)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := js.CreateStream(ctx, cfg)
		cancel()
		if err == nil || errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			break
		}
		lastErr = err
		time.Sleep(500 * time.Millisecond)
	}
	// Wait for a leader and all replicas current.
	for {
		if time.Now().After(deadline) {
			die("timeout waiting for stream leader/replicas: %v", lastErr)
		}
		si, err := streamInfo(js)
		if err == nil && si.Cluster != nil && si.Cluster.Leader != "" {
			ok := len(si.Cluster.Replicas) == *replicas-1
			for _, p := range si.Cluster.Replicas {
				if !p.Current || p.Offline {
					ok = false
				}
			}
			if ok {
				fmt.Println(si.Cluster.Leader)
				return
			}
			lastErr = fmt.Errorf("leader %s, replicas not all current", si.Cluster.Leader)
		} else if err != nil {
			lastErr = err
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func leader(deadline time.Time) {
	nc, js := anyConn(deadline)
	defer nc.Close()
	si, err := streamInfo(js)
	if err != nil || si.Cluster == nil || si.Cluster.Leader == "" {
		die("no stream leader: %v", err)
	}
	fmt.Println(si.Cluster.Leader)
}

func pct(sorted []time.Duration, p float64) time.Duration {
	// nearest-rank percentile
	k := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	if k < 0 {
		k = 0
	}
	return sorted[k]
}

func us(d time.Duration) float64 { return math.Round(float64(d.Nanoseconds())/10) / 100 }

func pub() {
	if *url == "" {
		die("-url required")
	}
	if *n < 1 || *warmup < 0 || *size < 0 {
		die("need -n >= 1, -warmup >= 0, -size >= 0")
	}
	nc, js, err := connect(*url)
	if err != nil {
		die("connect %s: %v", *url, err)
	}
	defer nc.Close()
	srvBefore := nc.ConnectedServerName()
	payload := make([]byte, *size)
	for i := range payload {
		payload[i] = byte('a' + i%26)
	}
	var lastSeq uint64
	one := func() time.Duration {
		ctx, cancel := context.WithTimeout(context.Background(), *pubTO)
		t0 := time.Now()
		ack, err := js.Publish(ctx, *subject, payload)
		d := time.Since(t0)
		cancel()
		if err != nil {
			die("publish: %v", err)
		}
		if ack.Stream != *stream || ack.Duplicate || (lastSeq != 0 && ack.Sequence != lastSeq+1) {
			die("unexpected ack %+v (last seq %d)", ack, lastSeq)
		}
		lastSeq = ack.Sequence
		return d
	}
	for i := 0; i < *warmup; i++ {
		one()
	}
	lat := make([]time.Duration, *n)
	start := time.Now()
	for i := range lat {
		lat[i] = one()
	}
	elapsed := time.Since(start)
	if nc.ConnectedServerName() != srvBefore || !nc.IsConnected() {
		die("connection moved/lost during run (%s -> %s)", srvBefore, nc.ConnectedServerName())
	}
	sorted := append([]time.Duration(nil), lat...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	var sum time.Duration
	for _, d := range lat {
		sum += d
	}
	// Leader at the end of the run (to detect a leader change mid-run).
	leaderAfter := ""
	if si, err := streamInfo(js); err == nil && si.Cluster != nil {
		leaderAfter = si.Cluster.Leader
	}
	out := struct {
		Bench       string  `json:"bench"`
		P50         float64 `json:"p50_us"`
		P99         float64 `json:"p99_us"`
		Messages    int     `json:"messages"`
		Size        int     `json:"size"`
		Warmup      int     `json:"warmup"`
		Min         float64 `json:"min_us"`
		Mean        float64 `json:"mean_us"`
		P999        float64 `json:"p999_us"`
		Max         float64 `json:"max_us"`
		Rate        float64 `json:"msgs_per_s"`
		Server      string  `json:"server"`
		LeaderAfter string  `json:"leader_after"`
	}{*label, us(pct(sorted, 50)), us(pct(sorted, 99)), *n, *size, *warmup,
		us(sorted[0]), us(sum / time.Duration(len(lat))), us(pct(sorted, 99.9)), us(sorted[len(sorted)-1]),
		math.Round(float64(*n) / elapsed.Seconds()), srvBefore, leaderAfter}
	b, _ := json.Marshal(out)
	fmt.Println(string(b))
}

func main() {
	flag.Parse()
	deadline := time.Now().Add(*timeout)
	switch *mode {
	case "wait":
		waitJS(deadline)
	case "setup":
		setup(deadline)
	case "leader":
		leader(deadline)
	case "pub":
		pub()
	default:
		die("unknown -mode %q", *mode)
	}
}

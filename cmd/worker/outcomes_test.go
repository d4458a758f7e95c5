package main

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/dlf-stop/worker/internal/consumer"
)

func connect(t *testing.T, url string) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatalf("connect %s: %v", url, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// outcomes collects outcome events published after it subscribed.
type outcomes struct {
	ch   chan *nats.Msg
	seen []consumer.Outcome
}

func watchOutcomes(t *testing.T, nc *nats.Conn) *outcomes {
	t.Helper()
	o := &outcomes{ch: make(chan *nats.Msg, 64)}
	sub, err := nc.ChanSubscribe("dlf.stop.outcome.*", o.ch)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return o
}

// wait returns the first outcome match accepts, failing after timeout.
func (o *outcomes) wait(t *testing.T, timeout time.Duration, match func(consumer.Outcome) bool) consumer.Outcome {
	t.Helper()
	deadline := time.After(timeout)
	for {
		for _, e := range o.seen {
			if match(e) {
				return e
			}
		}
		select {
		case m := <-o.ch:
			var e consumer.Outcome
			if err := json.Unmarshal(m.Data, &e); err != nil {
				t.Fatalf("outcome on %s is not JSON: %v: %s", m.Subject, err, m.Data)
			}
			o.seen = append(o.seen, e)
		case <-deadline:
			t.Fatalf("no matching outcome within %s (seen %+v)", timeout, o.seen)
		}
	}
}

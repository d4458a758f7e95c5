package testutil

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

// Watcher collects JSON messages of type T published on a subject after
// it subscribed. T is the event type (consumer.Outcome for outcome
// events); testutil cannot name it, as the consumer's own tests import
// this package.
type Watcher[T any] struct {
	ch   chan *nats.Msg
	seen []T
	// Check, when set, runs on every message as it is read: for rules the
	// subject must follow, say.
	Check func(t testing.TB, subject string, v T)
}

// Watch subscribes to subject and flushes, so nothing published after it
// returns can slip past.
func Watch[T any](t testing.TB, nc *nats.Conn, subject string) *Watcher[T] {
	t.Helper()
	w := &Watcher[T]{ch: make(chan *nats.Msg, 256)}
	sub, err := nc.ChanSubscribe(subject, w.ch)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return w
}

// Wait returns the first message, seen before or arriving now, that match
// accepts, and fails the test when none has come within timeout.
func (w *Watcher[T]) Wait(t testing.TB, timeout time.Duration, match func(T) bool) T {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		for _, v := range w.seen {
			if match(v) {
				return v
			}
		}
		select {
		case m := <-w.ch:
			var v T
			if err := json.Unmarshal(m.Data, &v); err != nil {
				t.Fatalf("message on %s is not JSON: %v: %s", m.Subject, err, m.Data)
			}
			if w.Check != nil {
				w.Check(t, m.Subject, v)
			}
			w.seen = append(w.seen, v)
		case <-deadline.C:
			var zero T
			t.Fatalf("no matching message within %s (seen %+v)", timeout, w.seen)
			return zero
		}
	}
}

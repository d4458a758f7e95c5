package main

import (
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/dlf-stop/worker/internal/consumer"
	"github.com/dlf-stop/worker/internal/testutil"
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

// watchOutcomes collects outcome events published after it subscribed.
func watchOutcomes(t *testing.T, nc *nats.Conn) *testutil.Watcher[consumer.Outcome] {
	t.Helper()
	return testutil.Watch[consumer.Outcome](t, nc, "dlf.stop.outcome.*")
}

package e2e

import (
	"sync"
	"testing"

	"github.com/nats-io/nats.go"
)

// publishCount counts the outcome events the workers publish, as core NATS
// delivers them: the outcome stream drops a repeat of an event within its
// two-minute duplicate window, so a count of stored events alone cannot
// tell a worker that published once from one that relied on the window.
type publishCount struct {
	mu   sync.Mutex
	byID map[string]int
}

func countPublished(t *testing.T, nc *nats.Conn, subject string) *publishCount {
	t.Helper()
	c := &publishCount{byID: map[string]int{}}
	sub, err := nc.Subscribe(subject, func(m *nats.Msg) {
		c.mu.Lock()
		c.byID[m.Header.Get(nats.MsgIdHdr)]++
		c.mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	_ = sub.SetPendingLimits(-1, -1)
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	return c
}

// republished is how many publishes went beyond one per command.
func (c *publishCount) republished() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, k := range c.byID {
		n += k - 1
	}
	return n
}

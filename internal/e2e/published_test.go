package e2e

import (
	"encoding/json"
	"sync"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/dlf-stop/worker/internal/consumer"
)

// publishCount counts the outcome events the workers publish, as core NATS
// delivers them: the outcome stream drops a repeat of an event within its
// two-minute duplicate window, so a count of stored events alone cannot
// tell a worker that published once from one that relied on the window.
//
// A repeat is either the same decision published again (a lost stored-ack,
// or an outcome an earlier delivery decided and could not store: the same
// body, finished_at included) or the command decided again (another
// finished_at): redecided counts those.
type publishCount struct {
	mu        sync.Mutex
	byID      map[string]int
	first     map[string]string // id -> status/cause/finished_at of the first publish
	redecided int
	sample    []string
}

func countPublished(t *testing.T, nc *nats.Conn, subject string) *publishCount {
	t.Helper()
	c := &publishCount{byID: map[string]int{}, first: map[string]string{}}
	sub, err := nc.Subscribe(subject, func(m *nats.Msg) {
		var o consumer.Outcome
		_ = json.Unmarshal(m.Data, &o)
		decision := o.Status + "/" + o.Cause + "/" + o.FinishedAt
		id := m.Header.Get(nats.MsgIdHdr)
		c.mu.Lock()
		c.byID[id]++
		if f, seen := c.first[id]; !seen {
			c.first[id] = decision
		} else if f != decision {
			c.redecided++
			if len(c.sample) < 5 {
				c.sample = append(c.sample, id+": "+f+" then "+decision)
			}
		}
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

// decidedAgain is how many publishes carried another decision than the
// command's first, with a few examples.
func (c *publishCount) decidedAgain() (int, []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.redecided, append([]string(nil), c.sample...)
}

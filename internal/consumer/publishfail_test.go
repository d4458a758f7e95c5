package consumer

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// A dead letter that cannot be stored must not let the command go: it is
// returned (nak with delay) until the dead letter is stored, and only then
// acked. The outcome, republished meanwhile, stays one event.
func TestDeadLetterFailureKeepsTheCommand(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.RetryInitial = 100 * time.Millisecond })
	r := e.startWorker(nil)
	if err := e.js.DeleteStream(context.Background(), "DLF_STOP_DEAD"); err != nil {
		t.Fatal(err)
	}
	bad := []byte(`{"script_name":"..","instance_id":"i"}`)
	e.publish(bad, nil)
	eventually(t, 20*time.Second, func() error {
		if got := testutilCount(r.w.m.publishFail.WithLabelValues("dead_letter")); got < 2 {
			return fmt.Errorf("dead-letter failures so far: %v", got)
		}
		return nil
	})
	s, err := e.js.Stream(context.Background(), "DLF_STOP")
	if err != nil {
		t.Fatal(err)
	}
	if n := s.CachedInfo().State.Msgs; n != 1 {
		t.Fatalf("command left the stream without its dead letter: %d messages", n)
	}
	// The operator fixes the dead-letter stream; the command then ends.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := Setup(ctx, e.js, e.cfg, e.log); err != nil {
		t.Fatal(err)
	}
	c := e.cfg
	c.setDefaults()
	dead := newCollector(t, e.js, c.DeadStream)
	dead.wait(t, 1, 20*time.Second)
	e.stopStreamEmpty(t)
	if n := e.out.len(); n != 1 {
		t.Errorf("%d outcome events, want 1", n)
	}
}

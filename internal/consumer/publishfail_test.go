package consumer

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/dlf-stop/worker/internal/testutil"
)

// A dead letter that cannot be stored must not let the command go: it is
// returned (nak with delay) until the dead letter is stored, and only then
// acked. The outcome is stored once.
func TestDeadLetterFailureKeepsTheCommand(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.RetryInitial = 100 * time.Millisecond })
	r := e.startWorker(nil)
	if err := e.js.DeleteStream(context.Background(), "DLF_STOP_DEAD"); err != nil {
		t.Fatal(err)
	}
	bad := []byte(`{"script_name":"..","instance_id":"i"}`)
	e.publish(bad, nil)
	testutil.Eventually(t, 20*time.Second, func() error {
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
	// Nothing can end meanwhile: the worker says so (found by review).
	if ok, why := r.w.Readiness(); ok || !strings.Contains(why, "cannot be stored") {
		t.Errorf("readiness %v %q while no dead letter can be stored", ok, why)
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
	testutil.Eventually(t, 5*time.Second, func() error {
		if ok, why := r.w.Readiness(); !ok {
			return fmt.Errorf("not ready after the dead letter was stored: %s", why)
		}
		return nil
	})
	if n := e.out.len(); n != 1 {
		t.Errorf("%d outcome events, want 1", n)
	}
	if n := e.pubs.count(); n != 1 {
		t.Errorf("outcome published %d times, want once", n)
	}
}

// An invalid command so large that its dead letter cannot carry the body
// unchanged is dead-lettered with the body cut and marked, not returned
// forever.
func TestOversizedDeadLetterIsTruncatedNotLooped(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.startWorker(nil)
	max := int(e.nc.MaxPayload())
	big := make([]byte, max-300)
	for i := range big {
		big[i] = 'x'
	}
	e.publish(big, nil)
	o := e.single(t)
	if o.Status != StatusRejected {
		t.Fatalf("outcome = %+v", o)
	}
	d := e.dead.wait(t, 1, 10*time.Second)[0]
	if got := d.Headers().Get(HeaderBodyTruncated); got != strconv.Itoa(len(big)) {
		t.Errorf("%s = %q, want %d", HeaderBodyTruncated, got, len(big))
	}
	if len(d.Data()) == 0 || len(d.Data()) >= len(big) || string(d.Data()) != string(big[:len(d.Data())]) {
		t.Errorf("dead letter body is not a prefix of the command (%d bytes)", len(d.Data()))
	}
	e.stopStreamEmpty(t)
}

// The same when the dead-letter stream's own max_msg_size is what the dead
// letter exceeds (start-up accepts any limit that a valid command's dead
// letter fits; found by review: such a command was returned for ever).
func TestDeadLetterOverTheStreamsLimitIsTruncatedNotLooped(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	const limit = 80 << 10
	e.updateStream(t, "DLF_STOP_DEAD", func(c *jetstream.StreamConfig) { c.MaxMsgSize = limit })
	e.startWorker(nil)
	big := make([]byte, 100<<10)
	for i := range big {
		big[i] = 'x'
	}
	e.publish(big, nil)
	if o := e.single(t); o.Status != StatusRejected {
		t.Fatalf("outcome = %+v", o)
	}
	d := e.dead.wait(t, 1, 10*time.Second)[0]
	if got := d.Headers().Get(HeaderBodyTruncated); got != strconv.Itoa(len(big)) {
		t.Errorf("%s = %q, want %d", HeaderBodyTruncated, got, len(big))
	}
	if n := len(d.Data()); n == 0 || n >= limit || string(d.Data()) != string(big[:n]) {
		t.Errorf("dead letter body is not a prefix of the command within the stream's limit (%d bytes)", n)
	}
	e.stopStreamEmpty(t)
}

// DLF answered 204 but the outcome could not be stored: the next delivery
// must store that same stopped outcome, not call DLF again (which would
// answer DLF.6205 and turn a stop into a failure).
func TestDecisionSurvivesAFailedOutcomePublish(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.RetryInitial = 100 * time.Millisecond })
	e.emu.AddRunning(proj, "", "s1", "i-1")
	r := e.startWorker(nil)
	if err := e.js.DeleteStream(context.Background(), "DLF_STOP_OUTCOMES"); err != nil {
		t.Fatal(err)
	}
	e.publish(body(t, map[string]any{"command_id": "keep", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	testutil.Eventually(t, 20*time.Second, func() error {
		if got := testutilCount(r.w.m.publishFail.WithLabelValues("outcome")); got < 2 {
			return fmt.Errorf("outcome failures so far: %v", got)
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := Setup(ctx, e.js, e.cfg, e.log); err != nil {
		t.Fatal(err)
	}
	c := e.cfg
	c.setDefaults()
	out := newCollector(t, e.js, c.OutcomeStream)
	out.wait(t, 1, 20*time.Second)
	o := out.outcomes(t)[0]
	if o.Status != StatusStopped || o.Cause != CauseOK || o.HTTPStatus != 204 {
		t.Fatalf("outcome = %+v", o)
	}
	if n := e.emu.StopCalls(); n != 1 {
		t.Errorf("DLF calls = %d, want 1", n)
	}
	e.stopStreamEmpty(t)
	e.noDeadLetters(t)
}

// A dead-letter stream that stays broken longer than the outcome stream's
// duplicate window must not make the outcome be stored again with every
// redelivery: the state bucket remembers it is stored.
func TestBrokenDeadLetterStreamStoresTheOutcomeOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) {
		c.RetryInitial = 100 * time.Millisecond
		c.RetryMax = 300 * time.Millisecond
	})
	// A short duplicate window stands for two minutes gone by.
	e.updateStream(t, "DLF_STOP_OUTCOMES", func(c *jetstream.StreamConfig) { c.Duplicates = 200 * time.Millisecond })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	r := e.startWorker(nil)
	if err := e.js.DeleteStream(ctx, "DLF_STOP_DEAD"); err != nil {
		t.Fatal(err)
	}
	e.publish([]byte(`{"script_name":"..","instance_id":"i"}`), nil)
	testutil.Eventually(t, 20*time.Second, func() error {
		if got := testutilCount(r.w.m.publishFail.WithLabelValues("dead_letter")); got < 6 {
			return fmt.Errorf("dead-letter failures so far: %v", got)
		}
		return nil
	})
	if _, err := Setup(ctx, e.js, e.cfg, e.log); err != nil {
		t.Fatal(err)
	}
	e.stopStreamEmpty(t)
	if n := e.out.len(); n != 1 {
		t.Errorf("%d outcome events, want 1", n)
	}
	if n := e.pubs.count(); n != 1 {
		t.Errorf("outcome published %d times, want once", n)
	}
}

package consumer

import (
	"fmt"
	"testing"
	"time"

	"golang.org/x/time/rate"

	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/testutil"
)

// A 503's Retry-After sets when the command tries again, even when its own
// backoff would be much shorter (contract section 6). Only the command's
// schedule honours it: unlike a 429's, it pauses no other call.
func TestRetryAfterOfA503SetsTheNextAttempt(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "", "s1", "a")
	e.emu.SetFaultsFor(proj, "s1", "a", emulator.Faults{ErrorRate: 1, ErrorStatus: 503, RetryAfter: 2 * time.Second})
	e.startWorker(func(c *Config) { c.RetryInitial, c.RetryMax = 50*time.Millisecond, 100*time.Millisecond })
	e.publish(body(t, map[string]any{"command_id": "a", "project_id": proj, "script_name": "s1", "instance_id": "a"}), nil)
	// The request log, not the call counter: a call is counted as it
	// arrives and logged once answered, and the two arrival times are
	// what this test compares.
	var at []time.Time
	testutil.Eventually(t, 10*time.Second, func() error {
		at = at[:0]
		for _, rq := range e.emu.Requests() {
			if rq.InstanceID == "a" {
				at = append(at, rq.Time)
			}
		}
		if len(at) < 2 {
			return fmt.Errorf("the request log holds %d calls for a, want a retry", len(at))
		}
		return nil
	})
	e.emu.ClearFaultsFor(proj, "s1", "a")
	if gap := at[1].Sub(at[0]); gap < 1900*time.Millisecond {
		t.Errorf("retried %s after a 503 with Retry-After: 2", gap)
	}
	if o := e.single(t); o.Status != StatusStopped {
		t.Errorf("outcome %s/%s, want stopped", o.Status, o.Cause)
	}
}

// A rate halved by a 429 grows back with every call the gateway let
// through, a refusal of the command (DLF.6205) as much as a 204: either
// shows the limit is no longer hit.
func TestRateGrowsBackOnARefusalToo(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "", "s1", "a")
	e.emu.SetFaultsFor(proj, "s1", "a", emulator.Faults{Throttle: true}) // Retry-After: 1
	r := e.startWorker(func(c *Config) { c.RateLimit, c.RateBurst = 100, 1 })
	limit := func() rate.Limit { return r.w.thr.limiter.Limit() }
	e.publish(body(t, map[string]any{"command_id": "a", "project_id": proj, "script_name": "s1", "instance_id": "a"}), nil)
	testutil.Eventually(t, 10*time.Second, func() error {
		if l := limit(); l != 50 {
			return fmt.Errorf("rate %v, want 50 after the 429", l)
		}
		return nil
	})
	// a's retry, after the 429's pause, gets a 204; b gets DLF.6205.
	e.emu.ClearFaultsFor(proj, "s1", "a")
	e.publish(body(t, map[string]any{"command_id": "b", "project_id": proj, "script_name": "s1", "instance_id": "no-such"}), nil)
	e.out.wait(t, 2, 10*time.Second)
	outs := byID(t, e.out.outcomes(t))
	if outs["a"].Status != StatusStopped || outs["b"].ErrorCode != "DLF.6205" {
		t.Fatalf("outcomes a %s, b %s %s; want a stopped, b refused with DLF.6205", outs["a"].Status, outs["b"].Status, outs["b"].ErrorCode)
	}
	if l := limit(); l != 60 {
		t.Errorf("rate %v after two calls DLF answered, want 60 (50 and a twentieth of 100 for each)", l)
	}
}

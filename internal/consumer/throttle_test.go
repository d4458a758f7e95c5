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

// A 429's pause ends early when a call sent after it (a last attempt,
// which the pause lets through) is answered by DLF: the quota is back,
// whatever the Retry-After said. A call sent before the 429 does not end
// it: its answer may predate the limit.
func TestAnsweredCallAfterA429EndsThePause(t *testing.T) {
	t.Parallel()
	thr := newThrottle(&Config{})
	before := thr.generation()
	thr.throttled(time.Hour)
	thr.succeeded(before)
	if !thr.pausedFor(time.Time{}) {
		t.Fatal("an answer to a call sent before the 429 ended the pause")
	}
	waited := make(chan error, 1)
	go func() { waited <- thr.waitPause(t.Context(), time.Time{}) }()
	thr.succeeded(thr.generation())
	if thr.pausedFor(time.Time{}) {
		t.Fatal("an answer to a call sent after the 429 left the pause on")
	}
	select {
	case err := <-waited:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a call waiting out the pause was not woken when it ended")
	}
}

// The same through the worker: a daily quota's 429 (Retry-After an hour
// here) holds every command until its last attempt; once one last attempt
// is answered, a command published after it stops at once instead of
// waiting for its own give-up time (found by review).
func TestQuotaBackEndsTheWaitOfLaterCommands(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) {
		c.RetryMaxElapsed = 3 * time.Second
		c.RetryInitial = 100 * time.Millisecond
	})
	e.emu.AddRunning(proj, "", "s1", "a")
	e.emu.AddRunning(proj, "", "s1", "b")
	e.emu.SetFaults(emulator.Faults{Throttle: true, RetryAfter: time.Hour})
	e.startWorker(nil)
	e.publish(body(t, map[string]any{"command_id": "a", "project_id": proj, "script_name": "s1", "instance_id": "a"}), nil)
	testutil.Eventually(t, 10*time.Second, func() error {
		if n := e.emu.StopCalls(); n < 1 {
			return fmt.Errorf("no call yet")
		}
		return nil
	})
	e.emu.SetFaults(emulator.Faults{}) // the quota is back; only a call can tell
	e.out.wait(t, 1, 10*time.Second)   // a's last attempt, at its give-up time
	published := time.Now()
	e.publish(body(t, map[string]any{"command_id": "b", "project_id": proj, "script_name": "s1", "instance_id": "b"}), nil)
	e.out.wait(t, 2, 10*time.Second)
	took := time.Since(published)
	outs := byID(t, e.out.outcomes(t))
	allStopped(t, outs)
	if took > 1500*time.Millisecond || outs["b"].Attempts != 1 {
		t.Errorf("b stopped %s after it was published, in %d attempts; want at once: a's answered last attempt showed the quota back",
			took.Round(time.Millisecond), outs["b"].Attempts)
	}
}

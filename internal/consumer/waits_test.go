package consumer

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/command"
	"github.com/dlf-stop/worker/internal/dlf"
	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/testutil"
)

// The tests here are about the waits before a call: the circuit, a 429's
// pause and the concurrency slots. Each wait must give way to the
// command's deadline, to its give-up time and to a shutdown.

// Commands whose time runs out while the circuit is open still get the
// last attempt the contract owes them, and so do the commands first seen
// after their time is up (fetched one at a time while the circuit is
// open): none ends without a call.
func TestCircuitOpenAtGiveUpStillMakesTheLastAttempt(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) {
		c.Concurrency = 1 // the first 401 opens the circuit before any other call
		c.heldFloor = 1   // the worker holds 4 x WORKER_CONCURRENCY
		c.RetryMaxElapsed = time.Second
		c.RetryInitial = 2 * time.Second // the first probe would come after the give-up
		c.RetryMax = 5 * time.Second
		c.CallTimeout = 2 * time.Second
	})
	e.emu.SetFaults(emulator.Faults{AuthFail: true})
	const n = 6 // more than the 4 x WORKER_CONCURRENCY the worker holds
	e.publishMany(t, n, "late")
	e.startWorker(nil)
	e.out.wait(t, n, 20*time.Second)
	for id, o := range byID(t, e.out.outcomes(t)) {
		if o.Status != StatusFailed || o.Cause != CauseRetriesExhausted || o.Attempts < 1 || o.HTTPStatus != 401 {
			t.Errorf("%s: %+v; want failed/retries_exhausted after at least one call", id, o)
		}
		if calls := e.emu.StopCallsFor(proj, "s1", id); calls < 1 {
			t.Errorf("%s: given up without a DLF call", id)
		}
	}
}

// A call that fails before anything is sent (credentials that cannot
// sign) is not a DLF call: attempts counts calls made (contract section
// 4), so a command whose every try failed so ends with none.
func TestUnsignableCallsAreNotAttempts(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) {
		c.RetryMaxElapsed = time.Second
		c.RetryInitial, c.RetryMax = 100*time.Millisecond, 200*time.Millisecond
	})
	e.creds = func() dlf.Credentials { return dlf.Credentials{AK: "ak-without-sk"} }
	e.emu.AddRunning(proj, "", "s1", "i-1")
	r := e.startWorker(nil)
	e.publish(body(t, map[string]any{"command_id": "unsigned", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	o := e.single(t)
	if o.Status != StatusFailed || o.Cause != CauseRetriesExhausted || o.Attempts != 0 {
		t.Fatalf("outcome = %+v; want failed/retries_exhausted with 0 attempts", o)
	}
	if n := e.emu.StopCalls(); n != 0 {
		t.Errorf("DLF saw %d calls", n)
	}
	if n := testutilCount(r.w.m.calls.WithLabelValues("0")); n != 0 {
		t.Errorf("dlf_stop_dlf_calls_total{code=\"0\"} = %v; nothing was sent", n)
	}
}

// A command handed back after a failed call, whose deadline passes before
// its next delivery: that delivery makes no call, and its outcome still
// reports the last answer DLF gave (contract section 4: http_status is the
// last attempt's), not "no call was made".
func TestExpiredAfterRedeliveryKeepsLastAnswer(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) {
		c.RetryInitial, c.RetryMax, c.ShortWaitMax = time.Second, time.Second, 100*time.Millisecond
	})
	e.emu.AddRunning(proj, "", "s1", "i-1")
	e.emu.SetFaultsFor(proj, "s1", "i-1", emulator.Faults{ErrorRate: 1, ErrorStatus: 503})
	r := e.startWorker(nil)
	e.publish(body(t, map[string]any{"command_id": "late", "project_id": proj, "script_name": "s1", "instance_id": "i-1",
		"deadline": time.Now().Add(time.Hour).Format(time.RFC3339Nano)}), nil)
	testutil.Eventually(t, 10*time.Second, func() error {
		if n := testutilCount(r.w.m.returned.WithLabelValues("backoff")); n < 1 {
			return fmt.Errorf("not handed back yet")
		}
		return nil
	})
	r.stop(t)
	e.startWorker(nil, WithClock(func() time.Time { return time.Now().Add(2 * time.Hour) }))
	o := e.single(t)
	if o.Status != StatusExpired || o.Cause != CauseDeadlinePassed || o.Attempts != 1 ||
		o.HTTPStatus != 503 || o.ErrorCode != "EMU.503" || o.ErrorMsg == "" ||
		!strings.Contains(o.Detail, "after 1 in earlier deliveries") || !strings.Contains(o.Detail, "HTTP 503") {
		t.Fatalf("outcome = %+v; want expired with the first delivery's 503", o)
	}
	if calls := e.emu.StopCallsFor(proj, "s1", "i-1"); calls != 1 {
		t.Errorf("DLF saw %d calls, want 1", calls)
	}
}

// A 429 pauses every call of the worker; a command whose deadline passes
// during the pause is expired, never sent.
func TestDeadlinePassingInA429PauseIsNotSent(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.Concurrency = 4 })
	e.emu.AddRunning(proj, "", "s1", "slow")
	e.emu.AddRunning(proj, "", "s1", "urgent")
	e.emu.SetFaultsFor(proj, "s1", "slow", emulator.Faults{Throttle: true, RetryAfter: 3 * time.Second})
	r := e.startWorker(nil)
	e.publish(body(t, map[string]any{"command_id": "slow", "project_id": proj, "script_name": "s1", "instance_id": "slow"}), nil)
	r.waitFor429(t)
	deadline := time.Now().Add(time.Second)
	e.publish(body(t, map[string]any{"command_id": "urgent", "project_id": proj, "script_name": "s1", "instance_id": "urgent",
		"deadline": deadline.Format(time.RFC3339Nano)}), nil)
	e.out.wait(t, 1, 10*time.Second)
	o := byID(t, e.out.outcomes(t))["urgent"]
	if o.Status != StatusExpired || o.Cause != CauseDeadlinePassed || o.Attempts != 0 || !strings.Contains(o.Detail, "before the first call") {
		t.Fatalf("urgent: %+v; want expired before the first call", o)
	}
	if calls := e.emu.StopCallsFor(proj, "s1", "urgent"); calls != 0 {
		t.Errorf("urgent was sent %d times after its deadline", calls)
	}
	if e.emu.Stopped(proj, "s1", "urgent") {
		t.Error("the expired command stopped its instance")
	}
	e.emu.ClearFaultsFor(proj, "s1", "slow")
	e.out.wait(t, 2, 20*time.Second)
}

// waitFor429 waits until the worker has taken in a 429. The emulator counts
// a call as it arrives, before its fault is chosen and long before the
// worker has paused for the answer, so its count is not enough.
func (r *running) waitFor429(t *testing.T) {
	t.Helper()
	testutil.Eventually(t, 10*time.Second, func() error {
		if testutilCount(r.w.m.calls.WithLabelValues("429")) == 0 {
			return errors.New("no 429 taken in yet")
		}
		return nil
	})
}

// A Retry-After longer than the time a command has left does not hold the
// command's last attempt back: it ends within DLF_TIMEOUT of
// RETRY_MAX_ELAPSED, not when the pause is over.
func TestLongRetryAfterDoesNotOutlastTheGiveUp(t *testing.T) {
	t.Parallel()
	for name, shortWaitMax := range map[string]time.Duration{
		"last wait in-process": 0, // the default, longer than RETRY_MAX_ELAPSED here
		// Handed back to JetStream to end at the give-up time, the wait
		// comes back just after it, still the last attempt (found by
		// review: it waited out the whole Retry-After).
		"last wait handed back": 500 * time.Millisecond,
	} {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t, func(c *Config) {
				c.RetryMaxElapsed = 2 * time.Second
				c.RetryInitial = 100 * time.Millisecond
				c.CallTimeout = 2 * time.Second
				c.ShortWaitMax = shortWaitMax
			})
			e.emu.AddRunning(proj, "", "s1", "i-1")
			e.emu.SetFaultsFor(proj, "s1", "i-1", emulator.Faults{Throttle: true, RetryAfter: 30 * time.Second})
			e.startWorker(nil)
			e.publish(body(t, map[string]any{"command_id": "c", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
			o := e.single(t)
			if o.Status != StatusFailed || o.Cause != CauseRetriesExhausted || o.HTTPStatus != 429 || o.Attempts < 2 {
				t.Fatalf("outcome = %+v; want retries_exhausted after a last attempt", o)
			}
			if o.DurationMS > 2000+2000+500 {
				t.Errorf("ended %d ms after it was stored; want within RETRY_MAX_ELAPSED + DLF_TIMEOUT", o.DurationMS)
			}
		})
	}
}

// At a soft stop, commands waiting for a call slot are returned at once;
// only the call already on the wire goes on.
func TestShutdownSendsNoCallForCommandsWaitingForASlot(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.Concurrency = 1 })
	e.emu.SetFaults(emulator.Faults{Latency: time.Second})
	e.publishMany(t, 3, "q")
	r := e.startWorker(nil)
	testutil.Eventually(t, 10*time.Second, func() error {
		if n := e.emu.StopCalls(); n != 1 {
			return fmt.Errorf("%d calls", n)
		}
		return nil
	})
	r.stop(t)
	if n := e.emu.StopCalls(); n != 1 {
		t.Errorf("%d DLF calls; the commands waiting for the slot were sent after the stop", n)
	}
	e.out.wait(t, 1, 5*time.Second) // the one that was in flight
	e.stopStreamHolds(t, 2)         // and the two returned
}

// panicky wraps a Stopper and panics on the calls for which panicAt
// returns true.
type panicky struct {
	Stopper
	calls   atomic.Int64
	panicAt func(call int64) bool
}

func (p *panicky) Stop(ctx context.Context, r dlf.StopRequest) (*dlf.Response, error) {
	if p.panicAt(p.calls.Add(1)) {
		panic("injected client panic")
	}
	return p.Stopper.Stop(ctx, r)
}

func withPanicky(p *panicky) Option {
	return func(w *Worker) { p.Stopper = w.dlf; w.dlf = p }
}

// A panic inside the DLF client gives its call slot back: with one slot,
// a lost one would stop every later call.
func TestPanicInTheClientKeepsNoSlot(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.Concurrency = 1; c.RetryInitial = 50 * time.Millisecond })
	p := &panicky{panicAt: func(n int64) bool { return n == 1 }}
	e.publishMany(t, 2, "p")
	e.startWorker(nil, withPanicky(p))
	e.out.wait(t, 2, 20*time.Second)
	allStopped(t, byID(t, e.out.outcomes(t)))
}

// A panic in the circuit's probe call gives the probe turn back: an open
// circuit that never probed again would pause the worker for good.
func TestPanicInTheProbeLetsTheCircuitProbeAgain(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) {
		c.Concurrency = 1
		c.RetryInitial = 50 * time.Millisecond
		c.RetryMax = 200 * time.Millisecond
	})
	e.emu.SetFaults(emulator.Faults{AuthFail: true})
	// Call 1 gets the 401 that opens the circuit; call 2 is the first probe.
	p := &panicky{panicAt: func(n int64) bool { return n == 2 }}
	e.publishMany(t, 1, "probe")
	r := e.startWorker(nil, withPanicky(p))
	testutil.Eventually(t, 10*time.Second, func() error {
		if p.calls.Load() < 2 {
			return fmt.Errorf("%d calls", p.calls.Load())
		}
		return nil
	})
	e.emu.SetFaults(emulator.Faults{})
	o := e.single(t)
	if o.Status != StatusStopped {
		t.Fatalf("outcome = %+v", o)
	}
	testutil.Eventually(t, 5*time.Second, func() error {
		if r.w.circ.Open() {
			return errors.New("circuit still open")
		}
		return nil
	})
}

// A state bucket that refuses direct gets cannot be read by the worker:
// it says so at start rather than returning every command for ever.
func TestStateBucketWithoutDirectGetsStopsTheStart(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	// The environment's set-up created the bucket as the worker would.
	e.updateStream(t, "KV_dlf_stop_state", func(c *jetstream.StreamConfig) { c.AllowDirect = false })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := Setup(ctx, e.js, e.cfg, e.log)
	if !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), "dlf_stop_state") || !strings.Contains(err.Error(), "allow_direct") {
		t.Fatalf("Setup = %v; want a mismatch naming the bucket and allow_direct", err)
	}
}

// A bucket that stops answering reads while the worker runs (direct gets
// turned off here) returns every command: /readyz says so until a read
// goes through again (found by review: it said ready meanwhile).
func TestUnreadableStateBucketMakesTheWorkerUnready(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.ShortWaitMax = 200 * time.Millisecond })
	e.emu.AddRunning(proj, "", "s1", "i-1")
	r := e.startWorker(nil)
	r.waitStarted(t)
	e.updateStream(t, "KV_dlf_stop_state", func(c *jetstream.StreamConfig) { c.AllowDirect = false })
	e.publish(body(t, map[string]any{"project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	testutil.Eventually(t, 10*time.Second, func() error {
		if ok, why := r.w.Readiness(); ok || !strings.Contains(why, "cannot be read") {
			return fmt.Errorf("readiness = %v %q with the bucket unreadable; want not ready, saying why", ok, why)
		}
		return nil
	})
	e.updateStream(t, "KV_dlf_stop_state", func(c *jetstream.StreamConfig) { c.AllowDirect = true })
	if o := e.single(t); o.Status != StatusStopped {
		t.Fatalf("outcome = %+v", o)
	}
	testutil.Eventually(t, 5*time.Second, func() error {
		if ok, why := r.w.Readiness(); !ok {
			return fmt.Errorf("not ready after the bucket could be read again: %s", why)
		}
		return nil
	})
}

// A server whose max_payload is below what a document may grow to would
// refuse some commands' records for good: the worker says so at start.
func TestSmallMaxPayloadStopsTheStart(t *testing.T) {
	t.Parallel()
	ns := testutil.RunServer(t, &server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(),
		MaxPayload: 512 << 10})
	_, js := testutil.ConnectJS(t, ns.ClientURL())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := Setup(ctx, js, Config{}, zap.NewNop())
	if !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), "max_payload") {
		t.Fatalf("Setup = %v; want a mismatch naming max_payload", err)
	}
}

// A state bucket whose messages are limited below what a command's
// records can take would refuse some of them for good, and such a command
// would wait for its call for ever: the worker says so at start.
func TestStateBucketWithSmallMessagesStopsTheStart(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.updateStream(t, "KV_dlf_stop_state", func(c *jetstream.StreamConfig) { c.MaxMsgSize = 400 })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := Setup(ctx, e.js, e.cfg, e.log)
	if !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), "dlf_stop_state") || !strings.Contains(err.Error(), "max_msg_size") {
		t.Fatalf("Setup = %v; want a mismatch naming the bucket and max_msg_size", err)
	}
}

// The circuit lets a command whose time is up through for its last
// attempt even while open and long before the next probe, and still
// lets a cancelled wait go without a call.
func TestCircuitLetsTheLastAttemptThrough(t *testing.T) {
	t.Parallel()
	cfg := Config{CircuitThreshold: 5, RetryInitial: time.Hour, RetryMax: time.Hour}
	c := newCircuit(&cfg, zap.NewNop(), nil)
	c.release(false, c.generation(), dlf.Verdict{HTTPStatus: 401}, false, dlf.StopRequest{})
	if !c.Open() {
		t.Fatal("a 401 did not open the circuit")
	}
	start := time.Now()
	probe, ok := c.acquire(context.Background(), start.Add(100*time.Millisecond))
	if !ok || probe {
		t.Fatalf("acquire at the give-up time = probe %v, ok %v; want the last attempt (false, true)", probe, ok)
	}
	if waited := time.Since(start); waited < 100*time.Millisecond || waited > 5*time.Second {
		t.Errorf("waited %s for a give-up 100ms away", waited)
	}
	if probe, ok := c.acquire(context.Background(), time.Now().Add(-time.Second)); !ok || probe {
		t.Errorf("acquire past the give-up time = %v, %v; want the last attempt at once", probe, ok)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, ok := c.acquire(ctx, time.Now().Add(time.Hour)); ok {
		t.Error("a cancelled wait was let through")
	}
}

// Commands first seen after their time was up (a backlog that aged in the
// stream) get their one call, but after a 429's pause like every other
// call, not all at once into the throttled gateway.
func TestLateCommandsWaitOutA429Pause(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) {
		c.Concurrency = 1
		c.RetryMaxElapsed = time.Millisecond // every command is older when it is fetched
	})
	e.emu.SetFaults(emulator.Faults{Throttle: true, RetryAfter: 3 * time.Second})
	e.publishMany(t, 3, "aged")
	r := e.startWorker(nil)
	r.waitFor429(t)
	e.emu.SetFaults(emulator.Faults{})
	e.out.wait(t, 3, 20*time.Second)
	reqs := e.emu.Requests()
	sort.Slice(reqs, func(a, b int) bool { return reqs[a].Time.Before(reqs[b].Time) })
	if len(reqs) != 3 || reqs[0].Status != 429 {
		t.Fatalf("requests = %+v; want one call each, the first answered 429", reqs)
	}
	for _, rq := range reqs[1:] {
		if gap := rq.Time.Sub(reqs[0].Time); gap < 2500*time.Millisecond {
			t.Errorf("a call %s after the 429 with Retry-After 3s", gap.Round(time.Millisecond))
		}
	}
	stopped := 0
	for _, o := range byID(t, e.out.outcomes(t)) {
		if o.Status == StatusStopped {
			stopped++
		}
	}
	if stopped != 2 {
		t.Errorf("%d stopped, want the 2 that waited out the pause", stopped)
	}
}

// A command whose time ran out while it waited in the stream (an earlier
// delivery handed it back, as a worker does with what it holds when the
// circuit opens) gets its one call as a probe, like a command first seen
// late: not at once while the circuit is open. It used to skip the
// circuit, so in an outage longer than RETRY_MAX_ELAPSED a worker with
// nothing else to do fetched such commands one by one and dead-lettered
// each after a call DLF was sure to refuse (a review: 20 of 20 in 6 s,
// the circuit open throughout).
//
// The same when the earlier delivery marked its call "sent" and died: the
// mark counts as its call, but not as calls a delivery recorded before
// handing the command back, which alone give the last attempt its pass
// just after the give-up time (found by review).
func TestRedeliveredLateCommandsWaitForTheProbe(t *testing.T) {
	t.Parallel()
	for _, marked := range []bool{false, true} {
		t.Run(fmt.Sprintf("marked=%v", marked), func(t *testing.T) { redeliveredLateCommandWaitsForTheProbe(t, marked) })
	}
}

func redeliveredLateCommandWaitsForTheProbe(t *testing.T, marked bool) {
	e := newEnv(t, func(c *Config) {
		c.Concurrency = 1
		c.RetryMaxElapsed = time.Millisecond // every command is older when it is fetched
		c.RetryInitial = 50 * time.Millisecond
	})
	e.emu.SetFaults(emulator.Faults{AuthFail: true})
	e.publishMany(t, 1, "aged")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cons, err := e.js.Consumer(ctx, "DLF_STOP", "dlf-stop-worker")
	if err != nil {
		t.Fatal(err)
	}
	// The earlier delivery, handing the command back for a while.
	b, err := cons.Fetch(1, jetstream.FetchMaxWait(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	for m := range b.Messages() {
		if marked {
			md, err := m.Metadata()
			if err != nil {
				t.Fatal(err)
			}
			inst := command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "aged-0"}.InstanceKey()
			if err := e.state(t).markSent(ctx, "aged-0", 1, md.Sequence.Stream, inst); err != nil {
				t.Fatal(err)
			}
		}
		if err := m.NakWithDelay(4 * time.Second); err != nil {
			t.Fatal(err)
		}
	}

	r := e.startWorker(nil)
	e.publishMany(t, 1, "opener") // its 401 opens the circuit
	r.waitCircuitOpen(t)
	// No probe from now on: the next one is an hour away.
	r.w.circ.mu.Lock()
	r.w.circ.nextTry = time.Now().Add(time.Hour)
	r.w.circ.mu.Unlock()
	e.out.wait(t, 1, 10*time.Second) // the opener's one call, failed
	testutil.WaitFor(t, 10*time.Second, "the opener done", func() bool { return gaugeValue(r.w.m.held) == 0 })
	calls := e.emu.StopCalls()
	if calls != 1 {
		t.Fatalf("%d DLF calls before the aged command came back; want the opener's only", calls)
	}
	testutil.WaitFor(t, 15*time.Second, "the aged command delivered again", func() bool { return gaugeValue(r.w.m.held) == 1 })
	testutil.Consistently(t, time.Second, func() error {
		if n := e.emu.StopCalls(); n != calls {
			return fmt.Errorf("%d DLF calls with the circuit open and no probe due", n-calls)
		}
		return nil
	})
}

// A command waiting for the rate limiter's next token is expired when its
// deadline passes, not before.
func TestRateLimitWaitExpiresAtTheDeadline(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.RateLimit = 0.5; c.RateBurst = 1; c.Concurrency = 4 })
	e.emu.AddRunning(proj, "", "s1", "first")
	e.emu.AddRunning(proj, "", "s1", "second")
	e.startWorker(nil)
	e.publish(body(t, map[string]any{"command_id": "first", "project_id": proj, "script_name": "s1", "instance_id": "first"}), nil)
	e.out.wait(t, 1, 10*time.Second) // took the one token; the next comes 2 s later
	deadline := time.Now().Add(time.Second)
	e.publish(body(t, map[string]any{"command_id": "second", "project_id": proj, "script_name": "s1", "instance_id": "second",
		"deadline": deadline.Format(time.RFC3339Nano)}), nil)
	e.out.wait(t, 2, 10*time.Second)
	o := byID(t, e.out.outcomes(t))["second"]
	if o.Status != StatusExpired || o.Attempts != 0 {
		t.Fatalf("second: %+v; want expired without a call", o)
	}
	if _, fin := checkTimes(t, o); fin.Before(deadline) {
		t.Errorf("expired at %s, before its deadline %s", fin.Format(time.RFC3339Nano), deadline.Format(time.RFC3339Nano))
	}
	if n := e.emu.StopCallsFor(proj, "s1", "second"); n != 0 {
		t.Errorf("second was sent %d times", n)
	}
}

// firstAnswerLate starts a worker whose calls for instance "first" reach
// the emulator 300ms late, where first answers with fault; it publishes
// the command for first and, once that call is on its way, the command for
// second. Both instances are running. With a rate limit of one call a
// second, second then waits for its token, due 1s after first took its
// own, when the answer to first reaches the worker.
func (e *env) firstAnswerLate(t *testing.T, fault emulator.Faults) *running {
	t.Helper()
	e.emu.SetFaultsFor(proj, "s1", "first", fault)
	return e.secondWhileFirstIsHeld(t, "first", "second", func() { <-time.After(300 * time.Millisecond) })
}

// secondWhileFirstIsHeld starts a worker whose stop calls to instance
// first run hold before they reach the emulator, publishes a command for
// first and, once its call has arrived, one for second (command ids are
// the instances').
func (e *env) secondWhileFirstIsHeld(t *testing.T, first, second string, hold func()) *running {
	t.Helper()
	e.emu.AddRunning(proj, "", "s1", first)
	e.emu.AddRunning(proj, "", "s1", second)
	arrived := make(chan struct{})
	var once sync.Once
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.Contains(r.URL.Path, "/instances/"+first+"/") {
			once.Do(func() { close(arrived) })
			hold()
		}
		e.emu.ServeHTTP(w, r)
	}))
	t.Cleanup(front.Close)
	r := e.startWorkerAt(front.URL, nil)
	e.publish(body(t, map[string]any{"command_id": first, "project_id": proj, "script_name": "s1", "instance_id": first}), nil)
	select {
	case <-arrived:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s was not sent", first)
	}
	e.publish(body(t, map[string]any{"command_id": second, "project_id": proj, "script_name": "s1", "instance_id": second}), nil)
	return r
}

// A 429 that arrives while a command waits for the rate limiter's token
// holds that command back too: its pause wins over the token.
func TestA429WhileWaitingForARateTokenHoldsTheCall(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.RateLimit = 1; c.RateBurst = 1; c.Concurrency = 4 })
	// first takes the one token at t0; its 429 (Retry-After 2s) reaches
	// the worker while second waits for the next token, due at t0+1s.
	r := e.firstAnswerLate(t, emulator.Faults{Throttle: true, RetryAfter: 2 * time.Second})
	r.waitFor429(t)
	e.emu.ClearFaultsFor(proj, "s1", "first")
	e.out.wait(t, 2, 20*time.Second)
	var first429, second time.Time
	for _, rq := range e.emu.Requests() {
		switch {
		case rq.InstanceID == "first" && rq.Status == 429:
			first429 = rq.Time
		case rq.InstanceID == "second":
			second = rq.Time
		}
	}
	// The emulator answers a 429 as it arrives; the worker pauses for 2s
	// from when it gets it. 100ms of slack for a loaded machine.
	if pauseEnd := first429.Add(2 * time.Second); second.Before(pauseEnd.Add(-100 * time.Millisecond)) {
		t.Errorf("second was sent %s before the 429's pause ended", pauseEnd.Sub(second).Round(time.Millisecond))
	}
}

// A command whose call panics after SIGTERM goes back at once, like every
// other undecided command at shutdown, not after the panic's backoff.
func TestPanicAfterSoftStopReturnsTheCommandAtOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.RetryInitial = 30 * time.Second; c.RetryMax = time.Minute })
	inFlight, release := make(chan struct{}), make(chan struct{})
	p := &panicky{panicAt: func(n int64) bool {
		if n != 1 {
			return false
		}
		close(inFlight)
		<-release
		return true
	}}
	e.publishMany(t, 1, "sig")
	r := e.startWorker(nil, withPanicky(p))
	<-inFlight
	r.cancel() // SIGTERM, while the call is on the wire
	close(release)
	r.stop(t)
	start := time.Now()
	e.startWorker(nil)
	o := e.single(t)
	if o.Status != StatusStopped {
		t.Fatalf("outcome = %+v", o)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("another worker got the command after %s; the panic's 30 s backoff applied at shutdown", took.Round(time.Millisecond))
	}
}

package consumer

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/dlf"
	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/testutil"
)

// An open circuit fetches nothing new (contract section 6): commands
// published after it opened wait in the stream, where a healthy replica
// may take them, instead of on a worker that will not call.
func TestOpenCircuitFetchesNothingNew(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.RetryInitial, c.RetryMax = 3*time.Second, 6*time.Second }) // no probe meanwhile
	e.emu.SetFaults(emulator.Faults{AuthFail: true})
	r := e.startWorker(nil)
	e.publishMany(t, 1, "first")
	r.waitCircuitOpen(t)
	e.publishMany(t, 10, "after")
	testutil.Consistently(t, time.Second, func() error {
		if n := gaugeValue(r.w.m.held); n != 1 {
			return fmt.Errorf("the worker holds %v commands, want only the first: it fetched with the circuit open", n)
		}
		return nil
	})
	// They waited in the stream, not lost: all stop once DLF is back.
	e.emu.SetFaults(emulator.Faults{})
	e.out.wait(t, 11, 30*time.Second)
	allStopped(t, byID(t, e.out.outcomes(t)))
}

// Commands that arrive on the pull on the wire as the circuit opens are
// handed back, each to come again after a short delay; none lands where
// nothing holds it, to come back only after the ack wait.
func TestCommandsArrivingAsTheCircuitOpensAreHandedBack(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) {
		c.AckWait = 30 * time.Second
		c.RetryInitial, c.RetryMax = 500*time.Millisecond, time.Second
	})
	e.emu.SetFaults(emulator.Faults{AuthFail: true})
	r := e.startWorker(func(c *Config) { c.Concurrency = 64 })
	e.publishMany(t, 100, "c") // one by one, across the opening at the first call
	r.waitCircuitOpen(t)
	e.emu.SetFaults(emulator.Faults{})
	// Well within the ack wait: a command stranded in a cancelled pull
	// would take 30 s.
	e.out.wait(t, 100, 20*time.Second)
	allStopped(t, byID(t, e.out.outcomes(t)))
}

// With the circuit open and nothing held, the probe fetch is the only
// fetch. A consumer deleted then must be bound again, or no probe ever
// comes and the worker stays paused after DLF recovered.
func TestConsumerDeletedWhileOpenAndIdleIsBoundAgain(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) {
		c.RetryMaxElapsed = 1500 * time.Millisecond
		c.RetryInitial, c.RetryMax = 100*time.Millisecond, 300*time.Millisecond
	})
	e.emu.SetFaults(emulator.Faults{AuthFail: true})
	r := e.startWorker(nil)
	e.publishMany(t, 2, "old")
	e.out.wait(t, 2, 20*time.Second) // retries_exhausted with the circuit open
	var opened time.Time
	testutil.Eventually(t, 10*time.Second, func() error {
		if !r.w.circ.Open() || gaugeValue(r.w.m.held) != 0 {
			return errors.New("want the circuit open and nothing held")
		}
		opened = time.Now()
		return nil
	})
	// A pull on the wire when the circuit opened, which lives on until it
	// expires, would see the deletion and bind again by itself; to test
	// the probe fetch alone, the deletion waits until it has expired.
	testutil.Eventually(t, 2*pullWait, func() error {
		if time.Since(opened) < pullWait+500*time.Millisecond {
			return errors.New("a pull from before the opening could still be alive")
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.js.DeleteConsumer(ctx, "DLF_STOP", "dlf-stop-worker"); err != nil {
		t.Fatal(err)
	}
	e.emu.SetFaults(emulator.Faults{})
	e.publishMany(t, 2, "new")
	e.out.wait(t, 4, 20*time.Second)
	for id, o := range byID(t, e.out.outcomes(t)) {
		if want := StatusStopped; id[:3] == "new" && o.Status != want {
			t.Errorf("%s: %s/%s, want %s", id, o.Status, o.Cause, want)
		}
	}
}

// The circuit closes on the first probe that DLF itself answers for its
// command (contract section 6: "the first probe that succeeds"). A 429 or
// a 408 from the gateway, or a failure before any answer, shows nothing
// of the sort: the circuit stays open and the next probe follows.
func TestOnlyAnAnswerFromDLFClosesTheCircuit(t *testing.T) {
	t.Parallel()
	cfg := Config{CircuitThreshold: 5, RetryInitial: time.Millisecond, RetryMax: time.Millisecond}
	c := newCircuit(&cfg, zap.NewNop(), nil)
	c.release(false, c.generation(), dlf.Verdict{HTTPStatus: 401, Systemic: true}, false, dlf.StopRequest{})
	if !c.Open() {
		t.Fatal("a 401 did not open the circuit")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	probeWith := func(v dlf.Verdict) {
		t.Helper()
		probe, ok := c.acquire(ctx, time.Time{})
		if !probe || !ok {
			t.Fatalf("acquire = probe %v, ok %v; want the probe turn", probe, ok)
		}
		c.release(true, c.generation(), v, false, dlf.StopRequest{})
	}
	for _, v := range []dlf.Verdict{
		{HTTPStatus: 429, ErrorCode: "APIG.0308"},
		{HTTPStatus: 408},
		{}, // failed before any answer, not for DLF's sake
	} {
		probeWith(v)
		if !c.Open() {
			t.Fatalf("a probe answered %d %q closed the circuit", v.HTTPStatus, v.ErrorCode)
		}
	}
	probeWith(dlf.Verdict{HTTPStatus: 400, ErrorCode: "DLF.6205"})
	if c.Open() {
		t.Fatal("DLF answered the probe (DLF.6205), yet the circuit stays open")
	}
	// Closed, a 429 neither counts towards opening nor clears the count.
	for i := 0; i < 5; i++ {
		c.release(false, c.generation(), dlf.Verdict{HTTPStatus: 503}, false, target(i))
		c.release(false, c.generation(), dlf.Verdict{HTTPStatus: 429}, false, target(i))
	}
	if !c.Open() {
		t.Error("five 503s in a row but for 429s between them did not open the circuit")
	}
}

// A call sent before the circuit opened may answer after it: its 204 or
// DLF.6205 may predate the failures that opened the circuit, and must not
// close it (found by review: every held command was released into a DLF
// that still failed, and /readyz flapped). A command's last attempt, made
// while the circuit is open, is as fresh as a probe and closes it.
func TestACallSentBeforeTheOpeningDoesNotCloseIt(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		opening []dlf.Verdict
	}{
		{"401", []dlf.Verdict{{HTTPStatus: 401, Systemic: true}}},
		{"five 503", []dlf.Verdict{{HTTPStatus: 503}, {HTTPStatus: 503}, {HTTPStatus: 503}, {HTTPStatus: 503}, {HTTPStatus: 503}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Config{CircuitThreshold: 5, RetryInitial: time.Hour, RetryMax: time.Hour}
			c := newCircuit(&cfg, zap.NewNop(), nil)
			ctx := context.Background()
			slow, ok := c.acquire(ctx, time.Time{})
			if slow || !ok {
				t.Fatal("a call on a closed circuit was not let through as a plain call")
			}
			slowGen := c.generation() // noted as it is sent
			for i, v := range tc.opening {
				c.release(false, c.generation(), v, false, target(i))
			}
			if !c.Open() {
				t.Fatal("the circuit did not open")
			}
			for _, v := range []dlf.Verdict{{HTTPStatus: 204, Class: dlf.ClassStopped}, {HTTPStatus: 400, ErrorCode: "DLF.6205"}} {
				c.release(false, slowGen, v, false, dlf.StopRequest{})
				if !c.Open() {
					t.Fatalf("a call sent before the opening, answered %d %s, closed the circuit", v.HTTPStatus, v.ErrorCode)
				}
			}
			// A last attempt: let through while open, its time up.
			last, ok := c.acquire(ctx, time.Now().Add(-time.Second))
			if last || !ok {
				t.Fatalf("acquire = probe %v, ok %v for a last attempt; want a plain call", last, ok)
			}
			c.release(false, c.generation(), dlf.Verdict{HTTPStatus: 204, Class: dlf.ClassStopped}, false, dlf.StopRequest{})
			if c.Open() {
				t.Fatal("a last attempt made while the circuit was open got a 204, yet it stays open")
			}
		})
	}
}

// Neither way does an answer count for a circuit that opened or closed
// after its call was sent (found by review of the first version, which
// checked only non-probe successes): a probe sent before the circuit
// closed and opened again does not close the new opening with its 204,
// and a 401 to a call sent before a probe's 204 closed the circuit does
// not open it again. A probe whose answer is stale is followed by another.
func TestStaleAnswersDoNotChangeTheCircuit(t *testing.T) {
	t.Parallel()
	cfg := Config{CircuitThreshold: 5, RetryInitial: time.Millisecond, RetryMax: time.Millisecond}
	c := newCircuit(&cfg, zap.NewNop(), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	unauthorized := dlf.Verdict{HTTPStatus: 401, Systemic: true}
	ok := dlf.Verdict{HTTPStatus: 204, Class: dlf.ClassStopped}
	probe := func() uint64 {
		t.Helper()
		if p, ok := c.acquire(ctx, time.Time{}); !p || !ok {
			t.Fatalf("acquire = probe %v, ok %v; want the probe turn", p, ok)
		}
		return c.generation()
	}

	c.release(false, c.generation(), unauthorized, false, dlf.StopRequest{})
	oldProbe := probe() // on the wire while what follows happens
	lastAttempt := c.generation()
	c.release(false, lastAttempt, ok, false, dlf.StopRequest{}) // a command's last attempt closes it
	if c.Open() {
		t.Fatal("a last attempt's 204 did not close the circuit")
	}
	c.release(false, c.generation(), unauthorized, false, dlf.StopRequest{}) // a new call's 401 opens it again
	if !c.Open() {
		t.Fatal("a 401 did not open the circuit again")
	}
	c.release(true, oldProbe, ok, false, dlf.StopRequest{})
	if !c.Open() {
		t.Fatal("a probe sent before the circuit closed and opened again closed the new opening with its 204")
	}
	c.release(true, probe(), ok, false, dlf.StopRequest{}) // a probe of this opening, taken at once
	if c.Open() {
		t.Fatal("a probe of the current opening got a 204, yet the circuit stays open")
	}
	c.release(false, lastAttempt, unauthorized, false, dlf.StopRequest{}) // sent before that probe's 204
	if c.Open() {
		t.Fatal("a 401 to a call sent before the probe's 204 opened the circuit again")
	}
}

// The same through the worker: a command whose call is on the wire when
// another's 401 opens the circuit gets its 204 afterwards, and the circuit
// stays open (no probe is due for a minute). The opener's last attempt,
// made with the circuit open when its 5 s are up, gets a 204 and closes it.
func TestWorkerKeepsTheCircuitOpenAfterALateAnswer(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) {
		c.RetryInitial, c.RetryMax = time.Minute, time.Minute
		c.RetryMaxElapsed = 5 * time.Second
	})
	e.emu.SetFaultsFor(proj, "s1", "opener", emulator.Faults{AuthFail: true})
	answer := make(chan struct{})
	r := e.secondWhileFirstIsHeld(t, "slow", "opener", func() { <-answer })
	r.waitCircuitOpen(t)
	close(answer)
	o := e.single(t)
	if o.CommandID != "slow" || o.Status != StatusStopped {
		t.Fatalf("outcome %+v, want slow stopped", o)
	}
	// The circuit hears the answer before the outcome is published.
	if !r.w.circ.Open() {
		t.Fatal("the 204 of a call sent before the 401 closed the circuit")
	}
	e.emu.ClearFaultsFor(proj, "s1", "opener")
	e.out.wait(t, 2, 20*time.Second)
	if o := byID(t, e.out.outcomes(t))["opener"]; o.Status != StatusStopped || o.Attempts != 2 {
		t.Fatalf("opener: %+v, want stopped at its last attempt", o)
	}
	if r.w.circ.Open() {
		t.Error("the last attempt got a 204 with the circuit open, yet it stays open")
	}
}

// New credentials may be what ends a 401: they let the next probe go at
// once, however far the probe backoff has grown. A probe on the wire is
// still waited for, and a closed circuit is left as it is.
func TestCredentialsChangedLetTheProbeGoAtOnce(t *testing.T) {
	t.Parallel()
	cfg := Config{CircuitThreshold: 5, RetryInitial: time.Hour, RetryMax: time.Hour}
	c := newCircuit(&cfg, zap.NewNop(), nil)
	c.credentialsChanged() // closed: nothing to do
	if c.Open() {
		t.Fatal("a credentials change opened the circuit")
	}
	c.release(false, c.generation(), dlf.Verdict{HTTPStatus: 401, Systemic: true}, false, dlf.StopRequest{})
	acquire := func(within time.Duration) (probe, ok bool) {
		ctx, cancel := context.WithTimeout(context.Background(), within)
		defer cancel()
		return c.acquire(ctx, time.Time{})
	}
	if probe, ok := acquire(100 * time.Millisecond); probe || ok {
		t.Fatalf("acquire = probe %v, ok %v with the first probe an hour away; want to wait", probe, ok)
	}

	got := make(chan bool, 1)
	go func() {
		probe, ok := acquire(5 * time.Second)
		got <- probe && ok
	}()
	c.credentialsChanged()
	if !<-got {
		t.Fatal("a waiting command did not get the probe turn after the credentials changed")
	}
	// That probe is on the wire: a second change lets nothing else by
	// until it answers; the probe signed with the old credentials fails,
	// and the next one goes at once, not after the backoff.
	c.credentialsChanged()
	if probe, ok := acquire(100 * time.Millisecond); probe || ok {
		t.Fatalf("acquire = probe %v, ok %v while a probe is on the wire; want to wait", probe, ok)
	}
	c.release(true, c.generation(), dlf.Verdict{HTTPStatus: 401, Systemic: true}, false, dlf.StopRequest{})
	if probe, ok := acquire(time.Second); !probe || !ok {
		t.Fatalf("acquire = probe %v, ok %v after a probe that was on the wire when the credentials changed; want the probe turn", probe, ok)
	}
	// Without a change, a failed probe is followed after the backoff.
	c.release(true, c.generation(), dlf.Verdict{HTTPStatus: 401, Systemic: true}, false, dlf.StopRequest{})
	if probe, ok := acquire(100 * time.Millisecond); probe || ok {
		t.Fatalf("acquire = probe %v, ok %v right after a failed probe; want to wait for the backoff", probe, ok)
	}
}

// waitCircuitOpen waits until the worker's circuit has opened.
func (r *running) waitCircuitOpen(t *testing.T) {
	t.Helper()
	testutil.Eventually(t, 10*time.Second, func() error {
		if !r.w.circ.Open() {
			return errors.New("the circuit has not opened")
		}
		return nil
	})
}

// target names the i-th of several instances a test's calls are for.
func target(i int) dlf.StopRequest {
	return dlf.StopRequest{ProjectID: proj, ScriptName: "s1", InstanceID: fmt.Sprintf("i-%d", i)}
}

// One instance adds threshold-2 failures at most to a run (contract
// section 6: calls failing the same way "across commands"). Its retries,
// however many, do not open the circuit, nor do they with one stray
// failure elsewhere; two instances failing again and again do, and an
// answer from DLF between failures starts the count again. A call refused
// before anything was sent cannot be one instance's trouble and always
// counts; credentials that cannot be used open it at once, as a 401 does.
func TestRetriesForOneInstanceDoNotOpenTheCircuit(t *testing.T) {
	t.Parallel()
	cfg := Config{CircuitThreshold: 5, RetryInitial: time.Hour, RetryMax: time.Hour}
	hang := dlf.Verdict{Systemic: true, NotAnswered: true}
	c := newCircuit(&cfg, zap.NewNop(), nil)
	for i := 0; i < 20; i++ {
		c.release(false, c.generation(), dlf.Verdict{HTTPStatus: 503}, false, target(0))
		c.release(false, c.generation(), hang, false, target(0))
	}
	if c.Open() {
		t.Fatal("forty failures of one instance's stop opened the circuit")
	}
	c.release(false, c.generation(), dlf.Verdict{HTTPStatus: 502, NotAnswered: true}, false, target(1))
	if c.Open() {
		t.Fatal("one instance's failures and one stray failure elsewhere opened the circuit")
	}
	c.release(false, c.generation(), dlf.Verdict{HTTPStatus: 503}, false, target(1))
	if !c.Open() {
		t.Fatal("a second instance failing again did not open the circuit")
	}

	c = newCircuit(&cfg, zap.NewNop(), nil)
	for i := 0; i < 4; i++ {
		c.release(false, c.generation(), dlf.Verdict{HTTPStatus: 500}, false, target(i))
	}
	c.release(false, c.generation(), dlf.Verdict{HTTPStatus: 204, Class: dlf.ClassStopped}, false, target(9))
	for i := 4; i < 8; i++ {
		c.release(false, c.generation(), dlf.Verdict{HTTPStatus: 500}, false, target(i))
	}
	if c.Open() {
		t.Fatal("four failures, an answer, then four more opened the circuit: the answer did not start the count again")
	}
	c.release(false, c.generation(), dlf.Verdict{HTTPStatus: 500}, false, target(4))
	if !c.Open() {
		t.Fatal("five failures in a row across four instances did not open the circuit")
	}

	// An outage with two commands in flight opens it (found by review of
	// a rule that wanted five instances).
	c = newCircuit(&cfg, zap.NewNop(), nil)
	for i := 0; i < 5; i++ {
		c.release(false, c.generation(), dlf.Verdict{HTTPStatus: 503}, false, target(i%2))
	}
	if !c.Open() {
		t.Fatal("five failures in a row across two instances did not open the circuit")
	}
	// Refused before it was sent, and unusable credentials: one instance
	// is enough (found by review).
	c = newCircuit(&cfg, zap.NewNop(), nil)
	for i := 0; i < 5; i++ {
		c.release(false, c.generation(), dlf.Verdict{Systemic: true}, false, target(0))
	}
	if !c.Open() {
		t.Fatal("five connections refused for one instance did not open the circuit")
	}
	c = newCircuit(&cfg, zap.NewNop(), nil)
	c.release(false, c.generation(), dlf.Verdict{Systemic: true, NotSent: true}, false, target(0))
	if !c.Open() {
		t.Fatal("credentials that cannot be used did not open the circuit")
	}
}

// The same through the worker, in an outage with three commands in
// flight: they retry, every call fails, and the circuit opens.
func TestOutageWithFewCommandsOpensTheCircuit(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.emu.SetFaults(emulator.Faults{ErrorRate: 1, ErrorStatus: 503})
	r := e.startWorker(nil)
	e.publishMany(t, 3, "few")
	r.waitCircuitOpen(t)
	if ready, _ := r.w.Readiness(); ready {
		t.Error("ready with the circuit open")
	}
	e.emu.SetFaults(emulator.Faults{})
	e.out.wait(t, 3, 30*time.Second)
	allStopped(t, byID(t, e.out.outcomes(t)))
}

// The same through the worker: an instance whose stop DLF keeps failing
// (a 503 for it alone, or a stop that hangs) is retried on its own, while
// the circuit stays closed, the worker ready, and a healthy command
// published meanwhile stops at once (found by review: the fifth retry
// opened the circuit, and every other command waited until the failing
// one gave up, ten minutes by default).
func TestOneFailingInstanceLeavesTheOthersAlone(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		fault emulator.Faults
	}{
		{"503", emulator.Faults{ErrorRate: 1, ErrorStatus: 503}},
		{"hang", emulator.Faults{Hang: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, func(c *Config) { c.CallTimeout = 200 * time.Millisecond })
			e.emu.AddRunning(proj, "", "s1", "bad")
			e.emu.SetFaultsFor(proj, "s1", "bad", tc.fault)
			r := e.startWorker(nil)
			e.publish(body(t, map[string]any{"command_id": "bad", "project_id": proj, "script_name": "s1", "instance_id": "bad"}), nil)
			testutil.Eventually(t, 15*time.Second, func() error {
				if n := e.emu.StopCallsFor(proj, "s1", "bad"); n < 8 {
					return fmt.Errorf("%d calls for the failing instance, want 8", n)
				}
				return nil
			})
			if r.w.circ.Open() || gaugeValue(r.w.m.circuitOpen) != 0 {
				t.Fatal("one instance's failing stop opened the circuit")
			}
			if ready, why := r.w.Readiness(); !ready {
				t.Fatalf("not ready while one instance's stop fails: %s", why)
			}
			published := time.Now()
			e.publishMany(t, 3, "healthy")
			e.out.wait(t, 3, 5*time.Second)
			allStopped(t, byID(t, e.out.outcomes(t)))
			if d := time.Since(published); d > 3*time.Second {
				t.Errorf("healthy commands took %s behind one failing instance", d.Round(time.Millisecond))
			}
		})
	}
}

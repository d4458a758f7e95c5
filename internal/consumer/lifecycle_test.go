package consumer

import (
	"fmt"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/testutil"
)

// publishMany stores n valid commands for running instances i-0..i-(n-1).
func (e *env) publishMany(t *testing.T, n int, prefix string) {
	t.Helper()
	for i := 0; i < n; i++ {
		id := fmt.Sprintf("%s-%d", prefix, i)
		e.emu.AddRunning(proj, "", "s1", id)
		e.publish(body(t, map[string]any{"command_id": id, "project_id": proj, "script_name": "s1", "instance_id": id}), nil)
	}
}

// byID indexes outcomes and fails on a second outcome for one command.
func byID(t *testing.T, outs []Outcome) map[string]Outcome {
	t.Helper()
	m := make(map[string]Outcome, len(outs))
	for _, o := range outs {
		if prev, dup := m[o.CommandID]; dup {
			t.Errorf("two outcomes for %s: %+v and %+v", o.CommandID, prev, o)
		}
		m[o.CommandID] = o
	}
	return m
}

func TestSlowCommandsDoNotDelayHealthyOnes(t *testing.T) {
	e := newEnv(t, func(c *Config) {
		c.Concurrency = 4
		c.CallTimeout = 10 * time.Second
		c.RetryMaxElapsed = time.Minute
	})
	// Two commands hang for a long time, one keeps failing and retrying.
	for _, id := range []string{"slow-1", "slow-2", "failing"} {
		e.emu.AddRunning(proj, "", "s1", id)
	}
	e.emu.SetFaultsFor(proj, "s1", "slow-1", emulator.Faults{Latency: 8 * time.Second})
	e.emu.SetFaultsFor(proj, "s1", "slow-2", emulator.Faults{Latency: 8 * time.Second})
	e.emu.SetFaultsFor(proj, "s1", "failing", emulator.Faults{ErrorRate: 1, ErrorStatus: 503})
	e.startWorker(nil)
	for _, id := range []string{"slow-1", "slow-2", "failing"} {
		e.publish(body(t, map[string]any{"command_id": id, "project_id": proj, "script_name": "s1", "instance_id": id}), nil)
	}
	start := time.Now()
	e.publishMany(t, 100, "ok")
	e.out.wait(t, 100, 6*time.Second)
	if took := time.Since(start); took > 6*time.Second {
		t.Fatalf("100 healthy commands took %s behind slow ones", took)
	}
	for id, o := range byID(t, e.out.outcomes(t)) {
		if o.Status != StatusStopped {
			t.Errorf("%s: %+v", id, o)
		}
		if id == "slow-1" || id == "slow-2" || id == "failing" {
			t.Errorf("slow command %s finished among the healthy ones", id)
		}
	}
}

func TestGracefulShutdownFinishesInFlightAndReturnsTheRest(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.Concurrency = 4; c.ShutdownTimeout = 10 * time.Second })
	e.emu.SetFaults(emulator.Faults{Latency: 700 * time.Millisecond})
	const n = 40
	e.publishMany(t, n, "g")
	opt := goleak.IgnoreCurrent()
	r := e.startWorker(nil)
	testutil.Eventually(t, 10*time.Second, func() error {
		if got := e.emu.StopCalls(); got < 4 {
			return fmt.Errorf("%d calls in flight", got)
		}
		return nil
	})
	stopStart := time.Now()
	r.stop(t)
	if took := time.Since(stopStart); took > 5*time.Second {
		t.Errorf("graceful stop took %s", took)
	}
	// Every call that reached DLF ended with a stored outcome.
	calls := e.emu.StopCalls()
	e.out.wait(t, int(calls), 5*time.Second)
	goleak.VerifyNone(t, opt)

	// The rest was returned with a nak, so a new worker takes it at once,
	// well before the 30s ack wait.
	e.emu.SetFaults(emulator.Faults{})
	returnedAt := time.Now()
	e.startWorker(nil)
	e.out.wait(t, n, 10*time.Second)
	if took := time.Since(returnedAt); took > 10*time.Second {
		t.Errorf("returned commands took %s to be redelivered", took)
	}
	for id, o := range byID(t, e.out.outcomes(t)) {
		if o.Status != StatusStopped {
			t.Errorf("%s: %+v", id, o)
		}
	}
	if got := len(byID(t, e.out.outcomes(t))); got != n {
		t.Errorf("%d distinct outcomes, want %d", got, n)
	}
}

func TestShutdownTimeoutReturnsHungCalls(t *testing.T) {
	e := newEnv(t, func(c *Config) {
		c.Concurrency = 4
		c.CallTimeout = 20 * time.Second
		c.ShutdownTimeout = 500 * time.Millisecond
	})
	e.emu.SetFaults(emulator.Faults{Hang: true})
	e.publishMany(t, 6, "h")
	r := e.startWorker(nil)
	testutil.Eventually(t, 10*time.Second, func() error {
		if got := e.emu.StopCalls(); got < 4 {
			return fmt.Errorf("%d calls hanging", got)
		}
		return nil
	})
	stopStart := time.Now()
	r.stop(t)
	if took := time.Since(stopStart); took > 3*time.Second {
		t.Errorf("stop took %s with SHUTDOWN_TIMEOUT 500ms", took)
	}
	if n := e.out.len(); n != 0 {
		t.Errorf("%d outcomes for hung calls", n)
	}
	e.emu.SetFaults(emulator.Faults{})
	e.startWorker(nil)
	e.out.wait(t, 6, 10*time.Second) // well before the 30s ack wait: they were returned
}

// A worker that dies without draining (its connection cut mid-batch)
// leaves its commands to the ack wait; a restarted worker and a second
// replica on the same durable consumer then decide every one of them and
// share the load.
func TestCrashedWorkerLosesNothingAndReplicasShare(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.AckWait = 2 * time.Second; c.Concurrency = 8 })
	e.emu.SetFaults(emulator.Faults{Latency: 20 * time.Millisecond})
	const n = 300
	e.publishMany(t, n, "k")
	a := e.startWorker(func(c *Config) { c.WorkerID = "a" })
	testutil.Eventually(t, 10*time.Second, func() error {
		if got := e.out.len(); got < 20 {
			return fmt.Errorf("%d outcomes", got)
		}
		return nil
	})
	a.nc.Close() // the crash: no drain, no nak, in-flight work cut off
	a.stop(t)
	e.startWorker(func(c *Config) { c.WorkerID = "b" })
	e.startWorker(func(c *Config) { c.WorkerID = "c" })
	e.out.wait(t, n, 60*time.Second)
	got := byID(t, e.out.outcomes(t))
	perWorker := map[string]int{}
	for i := 0; i < n; i++ {
		id := "k-" + strconv.Itoa(i)
		o, ok := got[id]
		if !ok {
			t.Errorf("no outcome for %s", id)
			continue
		}
		perWorker[o.WorkerID]++
	}
	t.Logf("outcomes per worker: %v", perWorker)
	if perWorker["b"] == 0 || perWorker["c"] == 0 {
		t.Errorf("replicas did not share the load: %v", perWorker)
	}
}

func TestNATSServerRestartMidBatch(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.AckWait = 3 * time.Second; c.Concurrency = 8 })
	e.emu.SetFaults(emulator.Faults{Latency: 10 * time.Millisecond})
	const n = 300
	e.publishMany(t, n, "r")
	e.startWorker(nil)
	testutil.Eventually(t, 10*time.Second, func() error {
		if got := e.out.len(); got < 30 {
			return fmt.Errorf("%d outcomes", got)
		}
		return nil
	})
	port := e.srv.Addr().(interface{ String() string }).String()
	_ = port
	p := e.srv.ClientURL()
	e.srv.Shutdown()
	e.srv.WaitForShutdown()
	e.startServer(portOf(t, p))
	e.out.wait(t, n, 60*time.Second)
	got := byID(t, e.out.outcomes(t))
	for i := 0; i < n; i++ {
		if _, ok := got["r-"+strconv.Itoa(i)]; !ok {
			t.Errorf("no outcome for r-%d", i)
		}
	}
}

func portOf(t *testing.T, url string) int {
	t.Helper()
	for i := len(url) - 1; i >= 0; i-- {
		if url[i] == ':' {
			p, err := strconv.Atoi(url[i+1:])
			if err != nil {
				t.Fatal(err)
			}
			return p
		}
	}
	t.Fatalf("no port in %q", url)
	return 0
}

// A panic while a command is processed returns the command instead of
// killing the worker or leaking its slot: the redelivery decides it, and
// the worker still shuts down cleanly.
func TestPanicReturnsTheCommand(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.RetryInitial = 100 * time.Millisecond })
	e.emu.AddRunning(proj, "", "s1", "i-panic")
	var panicked atomic.Bool
	clock := func() time.Time {
		// The first reading of the clock is when the first decision is
		// made, after DLF answered 204.
		if panicked.CompareAndSwap(false, true) {
			panic("test: clock broke")
		}
		return time.Now()
	}
	opt := goleak.IgnoreCurrent()
	r := e.startWorker(func(c *Config) { c.Concurrency = 1 }, WithClock(clock))
	e.publish(body(t, map[string]any{"command_id": "c-panic", "project_id": proj, "script_name": "s1", "instance_id": "i-panic"}), nil)
	outs := e.out.wait(t, 1, 10*time.Second)
	o := e.out.outcomes(t)[0]
	if len(outs) != 1 || o.Status != StatusStopped || o.Cause != CauseAlreadyStopped {
		t.Fatalf("outcome after the panic: %+v", o)
	}
	if got := testutilCount(r.w.m.panics); got != 1 {
		t.Errorf("panics counted: %v, want 1", got)
	}
	stopStart := time.Now()
	r.stop(t)
	if took := time.Since(stopStart); took > 3*time.Second {
		t.Errorf("stop took %s after a panic: a held slot leaked", took)
	}
	if held := gaugeValue(r.w.m.held); held != 0 {
		t.Errorf("held gauge %v after stop, want 0", held)
	}
	goleak.VerifyNone(t, opt)
}

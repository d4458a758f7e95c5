package consumer

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

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
	t.Parallel()
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
	// Not parallel: the goroutine check below must see this test's alone.
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
	allStopped(t, byID(t, e.out.outcomes(t)))
	if got := len(byID(t, e.out.outcomes(t))); got != n {
		t.Errorf("%d distinct outcomes, want %d", got, n)
	}
}

// startHung starts a worker whose DLF calls hang, on n commands, and
// returns once concurrency of them hang on the wire; the others wait for
// a slot.
func startHung(t *testing.T, concurrency, n int, prefix string, shutdown time.Duration, opts ...Option) (*env, *running) {
	t.Helper()
	e := newEnv(t, func(c *Config) {
		c.Concurrency = concurrency
		c.CallTimeout = 20 * time.Second
		c.ShutdownTimeout = shutdown
	})
	e.emu.SetFaults(emulator.Faults{Hang: true})
	e.publishMany(t, n, prefix)
	r := e.startWorker(nil, opts...)
	testutil.Eventually(t, 10*time.Second, func() error {
		if got := e.emu.StopCalls(); got < int64(concurrency) {
			return fmt.Errorf("%d calls hanging", got)
		}
		return nil
	})
	return e, r
}

func TestShutdownTimeoutReturnsHungCalls(t *testing.T) {
	t.Parallel()
	e, r := startHung(t, 4, 6, "h", 500*time.Millisecond)
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

// Commands the server sends to a worker's pull just before the worker
// stops are handed back, not dropped: the worker lets its pull run out
// rather than cutting it. Here the worker's link delays what the server
// sends by a second, so at the stop all of them are still on the way.
// Cut short, the pull's subscription would be gone when they arrive, and
// the server, which counts them delivered, would offer them again only
// after the 30 s ack wait.
func TestStopHandsBackWhatThePullOnTheWireBrings(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.AckWait = 30 * time.Second })
	r, p := e.startWorkerBehindProxy(t)
	info := func() *jetstream.ConsumerInfo { return e.consumerInfo(t) }
	testutil.Eventually(t, 10*time.Second, func() error {
		if !r.w.Ready() || info().NumWaiting == 0 {
			return fmt.Errorf("the worker has no pull waiting yet")
		}
		return nil
	})
	p.slow.Store(int64(time.Second))
	const n = 12 // fewer than the pull asks for (the free held slots)
	e.publishMany(t, n, "w")
	testutil.Eventually(t, 500*time.Millisecond, func() error {
		if got := info().NumAckPending; got != n {
			return fmt.Errorf("%d of %d commands sent to the worker", got, n)
		}
		return nil
	})
	stopAt := time.Now()
	r.stop(t)
	if got := e.out.len(); got != 0 {
		t.Fatalf("%d outcomes from the stopping worker, want none", got)
	}
	startAt := time.Now()
	e.startWorker(nil)
	e.out.wait(t, n, 10*time.Second) // well before the 30 s ack wait
	t.Logf("stop took %s, the commands' outcomes %s after the next worker started", startAt.Sub(stopAt), time.Since(startAt))
	allStopped(t, byID(t, e.out.outcomes(t)))
}

// slowPulls is the worker's real consumer, except that each fetch ends
// 50 ms after nats.go closed it. It counts the naks sent at shutdown while
// a pull was still open: each of those could be redelivered into that
// pull and wait out a whole ack wait. (It shows that naks wait for the
// end of the pull as the worker sees it; that nats.go's UNSUB goes out
// right after that end is its own matter, see closePulls.)
type slowPulls struct {
	jetstream.Consumer
	open     atomic.Int32
	stopping atomic.Bool
	naks     atomic.Int32
	early    atomic.Int32
}

func (c *slowPulls) Fetch(n int, opts ...jetstream.FetchOpt) (jetstream.MessageBatch, error) {
	b, err := c.Consumer.Fetch(n, opts...)
	if err != nil {
		return nil, err
	}
	c.open.Add(1)
	out := &slowBatch{MessageBatch: b, msgs: make(chan jetstream.Msg)}
	go func() {
		for m := range b.Messages() {
			out.msgs <- &watchedMsg{Msg: m, pulls: c}
		}
		<-time.After(50 * time.Millisecond)
		c.open.Add(-1)
		close(out.msgs)
	}()
	return out, nil
}

type slowBatch struct {
	jetstream.MessageBatch
	msgs chan jetstream.Msg
}

func (b *slowBatch) Messages() <-chan jetstream.Msg { return b.msgs }

type watchedMsg struct {
	jetstream.Msg
	pulls *slowPulls
}

func (m *watchedMsg) Nak() error {
	m.pulls.nak()
	return m.Msg.Nak()
}

func (m *watchedMsg) NakWithDelay(d time.Duration) error {
	m.pulls.nak()
	return m.Msg.NakWithDelay(d)
}

func (c *slowPulls) nak() {
	if !c.stopping.Load() {
		return
	}
	c.naks.Add(1)
	if c.open.Load() > 0 {
		c.early.Add(1)
	}
}

// Commands returned at shutdown are naked only once the worker's pulls
// are closed. CI once caught a nak that overtook the pull's UNSUB: the
// command was redelivered into the dead pull and came back only after the
// 30s ack wait (TestShutdownTimeoutReturnsHungCalls timed out on it).
func TestShutdownReturnsCommandsOnlyAfterThePullsClosed(t *testing.T) {
	t.Parallel()
	pulls := &slowPulls{}
	e, r := startHung(t, 2, 6, "p", 200*time.Millisecond, func(w *Worker) { pulls.Consumer, w.cons = w.cons, pulls })
	// Every command in the worker's hands first: one still on its way in
	// the pull at the stop is handed back inside it, by design (see
	// handBack), which is not what this test counts.
	testutil.Eventually(t, 10*time.Second, func() error {
		if got := gaugeValue(r.w.m.held); got != 6 {
			return fmt.Errorf("%v commands held", got)
		}
		return nil
	})
	pulls.stopping.Store(true)
	r.stop(t)
	if n := pulls.naks.Load(); n != 6 {
		t.Errorf("%d commands returned at shutdown, want 6", n)
	}
	if n := pulls.early.Load(); n > 0 {
		t.Errorf("%d commands returned while a pull was still open", n)
	}
	e.emu.SetFaults(emulator.Faults{})
	e.startWorker(nil)
	e.out.wait(t, 6, 10*time.Second) // well before the 30s ack wait
}

// A worker that dies without draining (its connection cut mid-batch)
// leaves its commands to the ack wait; a restarted worker and a second
// replica on the same durable consumer then decide every one of them and
// share the load.
func TestCrashedWorkerLosesNothingAndReplicasShare(t *testing.T) {
	t.Parallel()
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
	// And they are right: the commands cut off in the crash with their
	// stop done end already_stopped by the crashed delivery's mark, not
	// failed and dead-lettered (found by review: only their presence was
	// checked).
	allStopped(t, got)
	e.noDeadLetters(t)
	e.stopStreamEmpty(t)
}

func TestNATSServerRestartMidBatch(t *testing.T) {
	// Not parallel: a port this test frees and listens on again could be
	// taken meanwhile by a listener of a test running beside it.
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
	// Not parallel: the goroutine check below must see this test's alone.
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
	testutil.Eventually(t, 5*time.Second, func() error { // counted just after the return
		if got := testutilCount(r.w.m.returned.WithLabelValues("panic")); got != 1 {
			return fmt.Errorf("returned for a panic counted %v, want 1", got)
		}
		return nil
	})
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

// A command whose processing panics on every delivery (a bug, here a
// broken clock) is returned with a growing delay, not in a tight loop,
// and given up once RETRY_MAX_ELAPSED has passed: failed,
// retries_exhausted, dead-lettered with its bytes, acked.
// A panic after a command took the circuit's probe turn and a call slot,
// before its call (in the mark, a take-back, the rate wait), gives both
// back: the turn kept, the circuit would never probe again and the worker
// stay paused after DLF recovered; the slot kept, one call fewer for good
// (here the only one).
func TestPanicBeforeTheProbeCallGivesTheTurnBack(t *testing.T) {
	t.Parallel()
	var panicked atomic.Bool
	e := newEnv(t, func(c *Config) {
		c.Concurrency = 1
		c.RetryInitial, c.RetryMax = 50*time.Millisecond, 200*time.Millisecond
		c.beforeCall = func(probe bool) {
			if probe && panicked.CompareAndSwap(false, true) {
				panic("test: broken before the probe's call")
			}
		}
	})
	e.emu.SetFaults(emulator.Faults{AuthFail: true})
	e.publishMany(t, 3, "c")
	r := e.startWorker(nil)
	r.waitCircuitOpen(t)
	testutil.WaitFor(t, 10*time.Second, "the panic", panicked.Load)
	e.emu.SetFaults(emulator.Faults{})
	e.out.wait(t, 3, 20*time.Second)
	for id, o := range byID(t, e.out.outcomes(t)) {
		if o.Status != StatusStopped {
			t.Errorf("%s: %s/%s, want stopped once DLF recovered", id, o.Status, o.Cause)
		}
	}
	if got := testutilCount(r.w.m.panics); got != 1 {
		t.Errorf("panics counted: %v, want 1", got)
	}
}

func TestPanicOnEveryDeliveryIsGivenUp(t *testing.T) {
	t.Parallel()
	e := newEnv(t, quickGiveUp)
	e.emu.AddRunning(proj, "", "s1", "i-poison")
	broken := WithClock(func() time.Time { panic("test: clock broke") })
	r := e.startWorker(nil, broken)
	// The deadline makes the worker read the clock before any call.
	b := body(t, map[string]any{"command_id": "c-poison", "project_id": proj, "script_name": "s1",
		"instance_id": "i-poison", "deadline": "2999-01-01T00:00:00Z"})
	e.publish(b, nil)
	o := e.single(t)
	if o.CommandID != "c-poison" || o.Status != StatusFailed || o.Cause != CauseRetriesExhausted ||
		!strings.Contains(o.Detail, "internal error") || o.Attempts != 0 {
		t.Fatalf("outcome = %+v", o)
	}
	e.checkGivenUp(t, r, b)
}

// Giving up stores the outcome, the dead letter and the decision record;
// a bucket refusing the record holds the command while the record is
// written again, and heartbeats must keep its lease meanwhile (found by
// review: they had stopped with the panic, so the ack wait handed the
// command to another delivery, which panicked again).
func TestPanicGivenUpWhileTheBucketRefusesKeepsItsLease(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { quickGiveUp(c); c.AckWait = 2 * time.Second })
	broken := WithClock(func() time.Time { panic("test: clock broke") })
	r := e.startWorker(nil, broken)
	r.waitStarted(t)
	e.updateStream(t, "KV_dlf_stop_state", func(c *jetstream.StreamConfig) { c.MaxMsgSize = markFits })
	b := body(t, map[string]any{"command_id": "c-poison", "project_id": proj, "script_name": "s1",
		"instance_id": "i-poison", "deadline": "2999-01-01T00:00:00Z"})
	e.publish(b, nil)
	e.out.wait(t, 1, 10*time.Second)
	refused := func(n float64) func() error {
		return func() error {
			if got := testutilCount(r.w.m.publishFail.WithLabelValues("state")); got < n {
				return fmt.Errorf("%v refused decision writes", got)
			}
			return nil
		}
	}
	deliveries := func() uint64 { return e.consumerInfo(t).Delivered.Consumer }
	testutil.Eventually(t, 10*time.Second, refused(1))
	before := deliveries()
	// The record is written again every RETRY_MAX_INTERVAL (100 ms) at
	// most: 40 refusals outlast two ack waits.
	testutil.Eventually(t, 30*time.Second, refused(40))
	if after := deliveries(); after != before {
		t.Errorf("%d deliveries more while the decision was held: its lease was lost", after-before)
	}
	e.updateStream(t, "KV_dlf_stop_state", func(c *jetstream.StreamConfig) { c.MaxMsgSize = -1 })
	e.stopStreamEmpty(t)
	if n := len(e.out.outcomes(t)); n != 1 {
		t.Errorf("%d outcomes, want 1", n)
	}
}

// The same when the panic comes before the command is even read (here: a
// logger that breaks on its script name): it is named by its envelope.
func TestPanicBeforeTheCommandIsReadIsGivenUp(t *testing.T) {
	t.Parallel()
	e := newEnv(t, quickGiveUp)
	e.log = zap.New(panicOnField{Core: e.log.Core(), key: "script_name", val: "poison"})
	r := e.startWorker(nil)
	b := body(t, map[string]any{"command_id": "c-body", "project_id": proj, "script_name": "poison", "instance_id": "i-1"})
	e.publish(b, nats.Header{nats.MsgIdHdr: []string{"m-envelope"}})
	o := e.single(t)
	if o.CommandID != "m-envelope" || o.Status != StatusFailed || o.Cause != CauseRetriesExhausted {
		t.Fatalf("outcome = %+v", o)
	}
	e.checkGivenUp(t, r, b)
}

// A panic before the command is read comes on the fetching goroutine,
// which closes the pulls once it returns; what follows the panic (which
// at shutdown waits for them to close) must run elsewhere, or the worker
// never stops.
func TestPanicBeforeTheCommandIsReadAtShutdownStillStops(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	// The worker is told to stop while it handles the command, right
	// before the panic: a command fetched after the stop is handed back
	// unread.
	stop := make(chan func(), 1)
	var once sync.Once
	e.log = zap.New(panicOnField{Core: e.log.Core(), key: "script_name", val: "poison",
		before: func() { once.Do(func() { (<-stop)() }) }})
	e.publish(body(t, map[string]any{"command_id": "c-poison", "project_id": proj, "script_name": "poison", "instance_id": "i-1"}), nil)
	r := e.startWorker(nil)
	stop <- r.cancel
	select {
	case err := <-r.done:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("worker did not stop after a panic in prepare at shutdown")
	}
	if got := testutilCount(r.w.m.panics); got != 1 {
		t.Errorf("panics = %v, want 1", got)
	}
	r.once.Do(func() {}) // stopped here; the cleanup has nothing left to do
	r.nc.Close()
}

// quickGiveUp makes a command's time run out after a second.
func quickGiveUp(c *Config) {
	c.RetryInitial, c.RetryMax, c.RetryMaxElapsed = 20*time.Millisecond, 100*time.Millisecond, time.Second
}

// checkGivenUp checks what giving up a panicking command leaves: its bytes
// dead-lettered, no DLF call, the command acked, and a bounded number of
// deliveries (a fixed 20 ms delay would make about fifty in the second).
func (e *env) checkGivenUp(t *testing.T, r *running, original []byte) {
	t.Helper()
	dead := e.dead.wait(t, 1, 5*time.Second)
	if !bytes.Equal(dead[0].Data(), original) {
		t.Errorf("dead letter body = %s", dead[0].Data())
	}
	if got := dead[0].Headers().Get(HeaderCause); got != CauseRetriesExhausted {
		t.Errorf("dead letter cause = %q", got)
	}
	e.stopStreamEmpty(t)
	if n := e.emu.StopCalls(); n != 0 {
		t.Errorf("DLF calls = %d, want 0", n)
	}
	if got := testutilCount(r.w.m.panics); got < 2 || got > 20 {
		t.Errorf("panics = %v, want 2..20", got)
	}
	if got := testutilCount(r.w.m.commands.WithLabelValues(StatusFailed, CauseRetriesExhausted)); got != 1 {
		t.Errorf("failed/retries_exhausted counted %v times, want 1", got)
	}
}

// panicOnField is a logger core that panics when given a field with a
// certain value, to make processing panic where a test wants it.
type panicOnField struct {
	zapcore.Core
	key, val string
	before   func() // if set, runs before each panic
}

func (c panicOnField) With(fs []zapcore.Field) zapcore.Core {
	for _, f := range fs {
		if f.Key == c.key && f.String == c.val {
			if c.before != nil {
				c.before()
			}
			panic("test: logger broke")
		}
	}
	return panicOnField{Core: c.Core.With(fs), key: c.key, val: c.val, before: c.before}
}

// The consumer is deleted while every held slot is busy, so no pull is
// open to hear of it. When slots free up the next pull is answered at once
// with "no responders"; the worker must back off and create the consumer
// again, not pull in a tight loop for ever while the commands wait.
func TestConsumerDeletedWhileSlotsAreFullIsBoundAgain(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.Concurrency, c.heldFloor = 1, 1 })
	e.emu.SetFaults(emulator.Faults{Latency: 500 * time.Millisecond})
	const n = 7 // the four held (4 × WORKER_CONCURRENCY) and three more
	e.publishMany(t, n, "del")
	r := e.startWorker(nil)
	testutil.Eventually(t, 10*time.Second, func() error {
		if got := gaugeValue(r.w.m.held); got != 4 {
			return fmt.Errorf("%v commands held", got)
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.js.DeleteConsumer(ctx, "DLF_STOP", "dlf-stop-worker"); err != nil {
		t.Fatal(err)
	}
	// The held commands' acks fail with their consumer; the consumer made
	// again delivers them anew, and the state bucket knows them decided.
	e.out.wait(t, n, 30*time.Second)
	allStopped(t, byID(t, e.out.outcomes(t)))
	e.stopStreamEmpty(t)
}

// A worker told to stop is not ready from then on, and says why, although
// the pull on the wire runs out for up to a second after (see pull).
func TestStoppingWorkerIsNotReady(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	r := e.startWorker(nil)
	r.waitStarted(t)
	r.cancel()
	testutil.Eventually(t, 5*time.Second, func() error {
		if ok, why := r.w.Readiness(); ok || why != "shutting down" {
			return fmt.Errorf("readiness = %v %q after the stop; want not ready, shutting down", ok, why)
		}
		return nil
	})
	r.stop(t)
}

// A link that loses the server without a reset (here nothing the worker
// sends reaches it any more) leaves the connection up until the pings
// notice, 20 to 30 s later. The pulls that get no answer at all say so
// on /readyz meanwhile, and readiness comes back with the answers.
func TestSilentLinkMakesTheWorkerUnready(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	r, p := e.startWorkerBehindProxy(t)
	ready := func() error {
		if ok, why := r.w.Readiness(); !ok {
			return fmt.Errorf("not ready: %s", why)
		}
		return nil
	}
	testutil.Eventually(t, 10*time.Second, ready)
	p.deaf.Store(true)
	testutil.Eventually(t, 5*time.Second, func() error {
		if ok, why := r.w.Readiness(); ok || !strings.Contains(why, "does not answer pull requests") {
			return fmt.Errorf("readiness = %v %q with the link silent; want not ready, saying why", ok, why)
		}
		return nil
	})
	if !r.nc.IsConnected() {
		t.Fatal("the connection was given up already: the test shows nothing of the pulls")
	}
	p.deaf.Store(false)
	testutil.Eventually(t, 10*time.Second, ready)
}

// startWorkerBehindProxy starts a worker whose NATS connection goes
// through a proxy the test can slow down or make deaf.
func (e *env) startWorkerBehindProxy(t *testing.T) (*running, *cuttingProxy) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cuttingProxy{ln: ln, target: e.srv.Addr().String()}
	go p.serve()
	t.Cleanup(func() { ln.Close(); p.cut() })
	e.workerNATS = "nats://" + ln.Addr().String()
	r := e.startWorker(nil)
	e.workerNATS = ""
	return r, p
}

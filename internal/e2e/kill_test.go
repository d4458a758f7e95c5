package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/consumer"
	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/testutil"
)

// TestWorkerKilledRepeatedly pins the promise "every stop command JetStream
// accepted ends in exactly one outcome event": a worker process is
// SIGKILLed every two seconds while it works through 2,000 commands, and a
// fresh one takes over at once. Nothing may be lost and no command may get
// a second outcome event.
func TestWorkerKilledRepeatedly(t *testing.T) {
	const (
		commands    = 2000
		killEvery   = 2 * time.Second
		ackWait     = 3 * time.Second
		overall     = 3 * time.Minute
		drainWithin = 30 * time.Second
		// The worker does 32 calls of 20 ms at once, so 2,000 commands
		// published up front are done in under two seconds, before the
		// first kill. They are published at 250 a second instead (8 s),
		// so the kills land while commands keep arriving and in flight.
		publishBatch = 5
		publishTick  = 20 * time.Millisecond
		project      = "p"
		script       = "s"
	)

	guard := newSecretsGuard(t, guardAKSK)
	srv := guard.server(t)
	_, js := guard.connect(t, srv)
	emu, emuURL := emulator.StartForTest(t, emulator.WithRequestLogSize(0), guard.emulatorOption())
	emu.SetFaults(emulator.Faults{Latency: 20 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), overall)
	defer cancel()

	// The worker uses an existing consumer as it is: created here with a
	// short ack wait, commands held by a killed worker come back in 3 s.
	if _, err := consumer.Setup(ctx, js, consumer.Config{AckWait: ackWait}, zap.NewNop()); err != nil {
		t.Fatal(err)
	}

	outcomes := watchOutcomes(ctx, t, js, "DLF_STOP_OUTCOMES", commands)
	outcomePubs := countPublished(t, js.Conn(), "dlf.stop.outcome.*")
	dead := watchDead(ctx, t, js, "DLF_STOP_DEAD")

	ids := make([]string, commands)
	bodies := make([][]byte, commands)
	for i := range ids {
		ids[i] = fmt.Sprintf("kill-%04d", i)
		inst := fmt.Sprintf("i-%04d", i)
		emu.AddRunning(project, "", script, inst)
		bodies[i] = []byte(`{"command_id":"` + ids[i] + `","script_name":"` + script + `","instance_id":"` + inst + `"}`)
	}

	env := guard.workerEnv(map[string]string{
		"NATS_URL":                   srv.ClientURL(),
		"DLF_ENDPOINT":               emuURL,
		"HUAWEICLOUD_SDK_PROJECT_ID": project,
		"WORKER_CONCURRENCY":         "32",
		"RETRY_INITIAL_INTERVAL":     "100ms",
		"RETRY_MAX_INTERVAL":         "1s",
	})
	spawn := func() *reapable {
		e := make(map[string]string, len(env)+1)
		for k, v := range env {
			e[k] = v
		}
		e["HTTP_ADDR"] = anyPort
		return spawnWorker(t, e)
	}

	start := time.Now()
	var (
		kills   int
		crashed int
		workers []*reapable
	)
	w := spawn()
	workers = append(workers, w)
	sent := publishPaced(ctx, t, js, "dlf.stop.request", bodies, publishBatch, publishTick)
	tick := time.NewTicker(killEvery)
	defer tick.Stop()
loop:
	for {
		select {
		case <-outcomes.complete:
			break loop
		case err := <-sent:
			if err != nil {
				t.Fatal(err)
			}
			sent = nil
		case <-ctx.Done():
			t.Fatalf("after %s and %d kills only %d of %d commands have an outcome; last worker's log: %s",
				time.Since(start).Round(time.Millisecond), kills, outcomes.distinct(), commands, tail(w.c.lines(), 10))
		case err := <-w.c.done:
			// Exited on its own: that is a crash, not one of our kills.
			w.reaped = true
			crashed++
			t.Errorf("worker exited by itself (%v); log: %s", err, tail(w.c.lines(), 10))
			w = spawn()
			workers = append(workers, w)
		case <-tick.C:
			if err := w.killAndWait(); err != nil {
				t.Fatal(err)
			}
			kills++
			w = spawn()
			workers = append(workers, w)
		}
	}
	elapsed := time.Since(start)

	// Every command has an outcome. The last worker keeps running until
	// the work queue is empty: a command left there was decided but not
	// acked, and its redelivery is where a second outcome or a stray dead
	// letter would come from.
	unacked := waitDrained(ctx, t, js, "DLF_STOP", drainWithin)
	if unacked != 0 {
		t.Errorf("%d commands still in DLF_STOP %s after every command had an outcome", unacked, drainWithin)
	}
	if err := w.killAndWait(); err != nil {
		t.Fatal(err)
	}

	// Read both streams to their end before counting.
	readWatchedToEnd(ctx, t, js, outcomes, dead)

	s := outcomes.snapshot()
	lostIDs := s.missing(ids)
	lost := len(lostIDs)
	duplicates := s.total - len(s.byID)
	var notStopped []string
	for id, sts := range s.byID {
		for _, st := range sts {
			if st.Status != consumer.StatusStopped {
				notStopped = append(notStopped, fmt.Sprintf("%s=%s/%s/%s", id, st.Status, st.Cause, st.ErrorCode))
			}
		}
	}
	sort.Strings(notStopped)
	var dupIDs []string
	for id, sts := range s.byID {
		if len(sts) > 1 {
			dupIDs = append(dupIDs, id)
		}
	}
	sort.Strings(dupIDs)
	var dlfNotStopped []string
	for i, id := range ids {
		if !emu.Stopped(project, script, fmt.Sprintf("i-%04d", i)) {
			dlfNotStopped = append(dlfNotStopped, id)
		}
	}
	d := dead.snapshot()
	var deadOfStopped []string
	for id, hs := range d.byID {
		for _, h := range hs {
			if sts := s.byID[id]; len(sts) > 0 && sts[0].Status == consumer.StatusStopped {
				deadOfStopped = append(deadOfStopped, fmt.Sprintf("%s(%s/%s/%s)", id, h.status, h.cause, h.code))
			}
		}
	}
	sort.Strings(deadOfStopped)
	calls := emu.StopCalls()
	// Instances DLF was asked to stop more than once, with the stored
	// outcome: where the extra calls went and what they decided.
	var multi []string
	for i, id := range ids {
		n := emu.StopCallsFor(project, script, fmt.Sprintf("i-%04d", i))
		if n <= 1 {
			continue
		}
		desc := "none"
		if sts := s.byID[id]; len(sts) > 0 {
			desc = fmt.Sprintf("%s/%s/%s attempts=%d", sts[0].Status, sts[0].Cause, sts[0].ErrorCode, sts[0].Attempts)
		}
		multi = append(multi, fmt.Sprintf("%s(calls=%d %s)", id, n, desc))
	}

	republished := outcomePubs.republished()
	redecided, redecidedEx := outcomePubs.decidedAgain()
	// Deliveries the state bucket answered "decided" (a kill between the
	// decision record and the ack): reported to show whether this run
	// reached that path at all; the window is short, and
	// TestDecidedCommandIsNotRepeated (internal/consumer) pins it.
	summary := warnSummary(workers)
	ackedDecided := summary["command already decided; acked without a call or a new outcome"]
	t.Logf("kills=%d commands=%d outcomes=%d lost=%d duplicates=%d republished=%d redecided=%d acked_decided=%d stopped=%d failed=%d rejected=%d expired=%d "+
		"dead_letters=%d dlf_calls=%d extra_calls=%d unacked=%d crashes=%d elapsed=%s",
		kills, commands, len(s.byID), lost, duplicates, republished, redecided, ackedDecided, s.status[consumer.StatusStopped], s.status[consumer.StatusFailed],
		s.status[consumer.StatusRejected], s.status[consumer.StatusExpired],
		d.total, calls, calls-commands, unacked, crashed, elapsed.Round(time.Millisecond))
	if len(multi) > 0 {
		t.Logf("instances called more than once: %d, e.g. %s", len(multi), sample(multi))
	}
	if len(deadOfStopped) > 0 {
		t.Logf("dead letters of commands whose stored outcome is stopped: %d, e.g. %s", len(deadOfStopped), sample(deadOfStopped))
	}
	if len(d.causes) > 0 {
		t.Logf("dead letters by status/cause/error_code: %v", d.causes)
	}
	t.Logf("worker log lines by message across %d processes: %v", len(workers), summary)

	if lost != 0 {
		t.Errorf("%d commands have no outcome event, e.g. %s", lost, sample(lostIDs))
	}
	if duplicates != 0 {
		t.Errorf("%d outcome events beyond one per command, e.g. %s", duplicates, sample(dupIDs))
	}
	// A kill can catch at most every command the worker held between its
	// outcome and its decision record; the redelivery decides those again
	// (and the duplicate window drops the repeat). More means decided
	// commands were decided again without a kill to explain it.
	if redecided > kills*32 {
		t.Errorf("%d outcome publishes decided a command again, more than %d kills of 32 held commands explain, e.g. %s",
			redecided, kills, sample(redecidedEx))
	}
	// The same bound for every publish beyond one per command, the same
	// decision sent again included: the duplicate window hides those from
	// the stored count, so a worker that published each outcome twice
	// passed (found by review). A worker holds up to 512 commands, but
	// those between an outcome and its record at the moment of a kill are
	// far fewer: 32 call slots, 20 ms calls and one store round trip
	// (observed: 0 to 8 per run).
	if republished > kills*32 {
		t.Errorf("%d outcome publishes beyond one per command, more than %d kills of 32 held commands explain",
			republished, kills)
	}
	if kills < 3 {
		t.Errorf("only %d kills: the run finished before the worker was killed often enough to test anything", kills)
	}
	if len(notStopped) > 0 {
		t.Errorf("%d outcome events are not stopped although every instance was running, e.g. %s",
			len(notStopped), sample(notStopped))
	}
	if len(dlfNotStopped) > 0 {
		t.Errorf("%d instances not stopped in DLF, e.g. %s", len(dlfNotStopped), sample(dlfNotStopped))
	}
	// duplicates counts stored events, what audit consumers see: a repeat
	// within two minutes is dropped by the outcome stream's duplicate
	// window. republished counts what the workers sent (bounded above): a
	// worker killed after storing an outcome and before recording the
	// decision decides the command again on its redelivery, and relies on
	// that window.
	if d.total != 0 {
		t.Errorf("%d dead letters although every instance was running, e.g. %v", d.total, d.causes)
	}
	logs := make([][]string, len(workers))
	for i, w := range workers {
		logs[i] = w.c.lines()
	}
	guard.check(t, js, "kill", logs)
}

// publishPaced publishes bodies to subject, batch of them every tick, each
// with a stored-ack, and reports on the returned channel once: nil when
// JetStream stored every one, else the first error.
func publishPaced(ctx context.Context, t *testing.T, js jetstream.JetStream, subject string,
	bodies [][]byte, batch int, every time.Duration) <-chan error {
	t.Helper()
	done := make(chan error, 1)
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(every)
		defer tick.Stop()
		for i := 0; i < len(bodies); {
			for end := min(i+batch, len(bodies)); i < end; i++ {
				if _, err := js.Publish(ctx, subject, bodies[i]); err != nil {
					done <- fmt.Errorf("publish command %d: %w", i, err)
					return
				}
			}
			select {
			case <-tick.C:
			case <-ctx.Done():
				done <- fmt.Errorf("published %d of %d commands: %w", i, len(bodies), ctx.Err())
				return
			}
		}
		done <- nil
	}()
	return done
}

// reapable is a worker child that this test kills and waits for exactly
// once, so its exit status is collected before cleanup runs.
type reapable struct {
	c      *child
	reaped bool
}

// spawnWorker starts a worker and registers a cleanup, which runs before
// startWorker's own, that kills the process and collects its exit.
func spawnWorker(t *testing.T, env map[string]string) *reapable {
	t.Helper()
	r := &reapable{c: startWorker(t, env)}
	t.Cleanup(func() {
		if err := r.killAndWait(); err != nil {
			t.Error(err)
		}
	})
	return r
}

// killAndWait sends SIGKILL and waits until the process is gone.
func (r *reapable) killAndWait() error {
	if r.reaped {
		return nil
	}
	if err := r.c.cmd.Process.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("kill worker %d: %w", r.c.cmd.Process.Pid, err)
	}
	select {
	case <-r.c.done:
		r.reaped = true
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("worker %d still running 10s after SIGKILL", r.c.cmd.Process.Pid)
	}
}

// outcomeRecord is the part of an outcome event the test looks at.
type outcomeRecord struct {
	CommandID string `json:"command_id"`
	Status    string `json:"status"`
	Cause     string `json:"cause"`
	ErrorCode string `json:"error_code"`
	Attempts  int    `json:"attempts"`
}

// outcomeWatch counts outcome events as an ordered consumer reads them.
type outcomeWatch struct {
	base     uint64 // events already in the stream when the watch began, not read
	mu       sync.Mutex
	want     int
	byID     map[string][]outcomeRecord
	status   map[string]int
	n        int
	complete chan struct{} // closed when want distinct ids have an outcome
}

type outcomeSnapshot struct {
	byID   map[string][]outcomeRecord
	status map[string]int
	total  int
}

func watchOutcomes(ctx context.Context, t *testing.T, js jetstream.JetStream, stream string, want int) *outcomeWatch {
	t.Helper()
	return watchOutcomesFrom(ctx, t, js, stream, want, 0)
}

// watchOutcomesFrom watches the events stored after the first base ones
// (the stream has limits retention and no deletes: its sequence is its
// count).
func watchOutcomesFrom(ctx context.Context, t *testing.T, js jetstream.JetStream, stream string, want int, base uint64) *outcomeWatch {
	t.Helper()
	w := &outcomeWatch{base: base, want: want, byID: map[string][]outcomeRecord{}, status: map[string]int{},
		complete: make(chan struct{})}
	cons, err := js.OrderedConsumer(ctx, stream, fromSeq(base))
	if err != nil {
		t.Fatalf("ordered consumer on %s: %v", stream, err)
	}
	cc, err := cons.Consume(func(m jetstream.Msg) {
		var o outcomeRecord
		if err := json.Unmarshal(m.Data(), &o); err != nil || o.CommandID == "" {
			o = outcomeRecord{CommandID: "<unreadable:" + m.Subject() + ">", Status: "unreadable"}
		}
		w.mu.Lock()
		defer w.mu.Unlock()
		w.n++
		w.status[o.Status]++
		w.byID[o.CommandID] = append(w.byID[o.CommandID], o)
		if len(w.byID) == w.want {
			close(w.complete)
		}
	})
	if err != nil {
		t.Fatalf("consume %s: %v", stream, err)
	}
	t.Cleanup(cc.Stop)
	return w
}

func (w *outcomeWatch) distinct() int { w.mu.Lock(); defer w.mu.Unlock(); return len(w.byID) }
func (w *outcomeWatch) total() int    { w.mu.Lock(); defer w.mu.Unlock(); return w.n }

func (w *outcomeWatch) snapshot() outcomeSnapshot {
	w.mu.Lock()
	defer w.mu.Unlock()
	s := outcomeSnapshot{byID: make(map[string][]outcomeRecord, len(w.byID)), status: map[string]int{}, total: w.n}
	for k, v := range w.byID {
		s.byID[k] = append([]outcomeRecord(nil), v...)
	}
	for k, v := range w.status {
		s.status[k] = v
	}
	return s
}

// deadRecord is what a dead letter's headers say about its command.
type deadRecord struct{ status, cause, code string }

type deadWatch struct {
	base   uint64 // dead letters already in the stream when the watch began, not read
	mu     sync.Mutex
	byID   map[string][]deadRecord
	causes map[string]int
	n      int
}

type deadSnapshot struct {
	byID   map[string][]deadRecord
	causes map[string]int
	total  int
}

func watchDead(ctx context.Context, t *testing.T, js jetstream.JetStream, stream string) *deadWatch {
	t.Helper()
	return watchDeadFrom(ctx, t, js, stream, 0)
}

// watchDeadFrom is watchOutcomesFrom for dead letters.
func watchDeadFrom(ctx context.Context, t *testing.T, js jetstream.JetStream, stream string, base uint64) *deadWatch {
	t.Helper()
	w := &deadWatch{base: base, byID: map[string][]deadRecord{}, causes: map[string]int{}}
	cons, err := js.OrderedConsumer(ctx, stream, fromSeq(base))
	if err != nil {
		t.Fatalf("ordered consumer on %s: %v", stream, err)
	}
	cc, err := cons.Consume(func(m jetstream.Msg) {
		h := m.Headers()
		r := deadRecord{status: h.Get(consumer.HeaderStatus), cause: h.Get(consumer.HeaderCause),
			code: h.Get(consumer.HeaderErrorCode)}
		id := h.Get(jetstream.MsgIDHeader)
		w.mu.Lock()
		defer w.mu.Unlock()
		w.n++
		w.byID[id] = append(w.byID[id], r)
		w.causes[r.status+"/"+r.cause+"/"+r.code]++
	})
	if err != nil {
		t.Fatalf("consume %s: %v", stream, err)
	}
	t.Cleanup(cc.Stop)
	return w
}

func (w *deadWatch) total() int { w.mu.Lock(); defer w.mu.Unlock(); return w.n }

func (w *deadWatch) snapshot() deadSnapshot {
	w.mu.Lock()
	defer w.mu.Unlock()
	s := deadSnapshot{byID: make(map[string][]deadRecord, len(w.byID)), causes: map[string]int{}, total: w.n}
	for k, v := range w.byID {
		s.byID[k] = append([]deadRecord(nil), v...)
	}
	for k, v := range w.causes {
		s.causes[k] = v
	}
	return s
}

// missing returns the ids that have no outcome event, in the order given.
func (s outcomeSnapshot) missing(ids []string) []string {
	var out []string
	for _, id := range ids {
		if len(s.byID[id]) == 0 {
			out = append(out, id)
		}
	}
	return out
}

// waitDrained polls until stream holds no message or within has passed, and
// returns how many it still holds; whether a remainder is an error is the
// caller's to say.
func waitDrained(ctx context.Context, t *testing.T, js jetstream.JetStream, stream string, within time.Duration) uint64 {
	t.Helper()
	st, err := js.Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	poll := time.NewTicker(50 * time.Millisecond)
	defer poll.Stop()
	for {
		info, err := st.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if info.State.Msgs == 0 {
			return 0
		}
		select {
		case <-poll.C:
		case <-deadline.C:
			return info.State.Msgs
		}
	}
}

// readWatchedToEnd waits until the watchers have read every message the
// outcome and dead-letter streams hold now, so that counts taken after it
// are final.
func readWatchedToEnd(ctx context.Context, t *testing.T, js jetstream.JetStream, outcomes *outcomeWatch, dead *deadWatch) {
	t.Helper()
	outN := streamMsgs(ctx, t, js, "DLF_STOP_OUTCOMES")
	deadN := streamMsgs(ctx, t, js, "DLF_STOP_DEAD")
	testutil.Eventually(t, 10*time.Second, func() error {
		if got := outcomes.base + uint64(outcomes.total()); got != outN {
			return fmt.Errorf("read %d of %d outcome events", got, outN)
		}
		if got := dead.base + uint64(dead.total()); got != deadN {
			return fmt.Errorf("read %d of %d dead letters", got, deadN)
		}
		return nil
	})
}

// fromSeq reads a stream from after its first base messages.
func fromSeq(base uint64) jetstream.OrderedConsumerConfig {
	if base == 0 {
		return jetstream.OrderedConsumerConfig{}
	}
	return jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: base + 1}
}

func streamMsgs(ctx context.Context, t *testing.T, js jetstream.JetStream, name string) uint64 {
	t.Helper()
	s, err := js.Stream(ctx, name)
	if err != nil {
		t.Fatalf("look up stream %s: %v", name, err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatalf("stream %s info: %v", name, err)
	}
	return info.State.Msgs
}

// warnSummary counts the workers' log lines by message, for the report.
func warnSummary(ws []*reapable) map[string]int {
	out := map[string]int{}
	for _, w := range ws {
		for _, line := range w.c.lines() {
			var l struct {
				Msg string `json:"msg"`
			}
			if json.Unmarshal([]byte(line), &l) != nil || l.Msg == "" {
				l.Msg = "<non-json> " + line
				if len(l.Msg) > 120 {
					l.Msg = l.Msg[:120]
				}
			}
			out[l.Msg]++
		}
	}
	return out
}

func tail(lines []string, n int) string {
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func sample(s []string) string {
	if len(s) > 5 {
		return strings.Join(s[:5], ", ") + ", ..."
	}
	return strings.Join(s, ", ")
}

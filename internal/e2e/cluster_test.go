package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/dlf-stop/worker/internal/consumer"
	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/testutil"
)

// Names the worker uses by default (contract section 2).
const (
	faultStopStream    = "DLF_STOP"
	faultOutcomeStream = "DLF_STOP_OUTCOMES"
	faultDeadStream    = "DLF_STOP_DEAD"
	faultConsumer      = "dlf-stop-worker"
	faultAccount       = "$G" // the global account of a server without accounts
)

// TestBrokerFaultsCluster runs three in-process workers against a
// three-node JetStream cluster with replicated streams. While 3,000
// commands are worked through, the node leading the consumer is restarted
// on its store, then the consumer leader and the command stream's leader
// are stepped down. Nothing may be lost, no command may get a second
// outcome, and every stored outcome must be "stopped" (every instance was
// running). The longest pause between outcomes is measured on the outcome
// stream's own store timestamps, so no observer connection can distort it.
func TestBrokerFaultsCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("cluster fault test skipped in -short mode")
	}
	const (
		nServers  = 3
		nWorkers  = 3
		nCommands = 3000
		project   = "proj-e2e"
		script    = "etl_daily"
		runFor    = 90 * time.Second // every outcome within this, faults included
	)
	asyncErrs := &faultAsyncErrs{}
	cl := startFaultCluster(t, nServers)
	cl.waitMetaLeader(30 * time.Second)

	guard := newSecretsGuard(t, guardAKSK)
	emu, emuURL := emulator.StartForTest(t, emulator.WithRequestLogSize(0), guard.emulatorOption())
	emu.SetFaults(emulator.Faults{Latency: 5 * time.Millisecond})

	client := connectFault(t, cl.urls(0), "observer", asyncErrs)
	js, err := jetstream.New(client)
	if err != nil {
		t.Fatal(err)
	}
	cfg := consumer.Config{
		Replicas:        3,
		AckWait:         5 * time.Second, // lost acks come back fast
		Concurrency:     16,
		CallTimeout:     2 * time.Second,
		RetryInitial:    50 * time.Millisecond,
		RetryMax:        500 * time.Millisecond,
		RetryMaxElapsed: 5 * time.Minute, // a fault must not become retries_exhausted
		ShutdownTimeout: 5 * time.Second,
	}
	// Three replicas can be placed only once the meta leader knows every
	// peer; until then Setup fails and is tried again.
	testutil.Eventually(t, 30*time.Second, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := consumer.Setup(ctx, js, cfg, zap.NewNop())
		return err
	})

	ids := make([]string, nCommands)
	for i := range ids {
		ids[i] = fmt.Sprintf("cmd-%05d", i)
		emu.AddRunning(project, "", script, fmt.Sprintf("inst-%05d", i))
	}
	publishFaultCommands(t, js, ids, project, script)
	// A connection on a restarted node misses some publishes: a floor.
	outcomePubs := countPublished(t, js.Conn(), "dlf.stop.outcome.*")

	// Debug level: the history of any suspect command is printed below.
	core, logs := observer.New(zapcore.DebugLevel)
	log := zap.New(core)
	start := time.Now()
	tl := &faultTimeline{start: start}
	for i := 0; i < nWorkers; i++ {
		c := cfg
		c.WorkerID = "w" + strconv.Itoa(i+1)
		// Worker i starts on node i, so whichever node leads the consumer
		// and is restarted, one worker loses its connection as well.
		startFaultWorker(t, cl.urls(i), emuURL, guard.credentials(), c, log.With(zap.String("worker", c.WorkerID)), asyncErrs)
	}
	tl.add("%d workers started", nWorkers)
	deadline := start.Add(runFor)
	sampler := sampleFaultProgress(t, js, start)

	// Fault 1, after a third: restart the node leading the consumer.
	if !faultWaitStored(js, nCommands/3, deadline) {
		t.Fatalf("fewer than %d outcomes by the deadline", nCommands/3)
	}
	victim := cl.consumerLeader()
	if victim < 0 {
		victim = nServers - 1
	}
	streams := faultStreamNames(t, js)
	restartAt := time.Now()
	atRestart := faultStreamMsgs(js, faultOutcomeStream)
	tl.add("restart %s (consumer leader, w%d's server) at %d outcomes", cl.name(victim), victim+1, atRestart)
	cl.restart(victim)
	tl.add("%s accepts connections again", cl.name(victim))
	cl.waitCurrent(victim, streams, 30*time.Second)
	tl.add("%s caught up: meta group and streams %v current", cl.name(victim), streams)

	// Fault 2, after two thirds: step down the consumer leader, then the
	// command stream's leader.
	if !faultWaitStored(js, 2*nCommands/3, deadline) {
		t.Fatalf("fewer than %d outcomes by the deadline", 2*nCommands/3)
	}
	stepDownAt := time.Now()
	atStepDown := faultStreamMsgs(js, faultOutcomeStream)
	tl.add("consumer leader step-down at %d outcomes", atStepDown)
	was, now := faultMoveLeader(t, client, "$JS.API.CONSUMER.LEADER.STEPDOWN."+faultStopStream+"."+faultConsumer, cl.consumerLeader)
	tl.add("consumer leader moved from %s to %s", cl.name(was), cl.name(now))
	was, now = faultMoveLeader(t, client, "$JS.API.STREAM.LEADER.STEPDOWN."+faultStopStream,
		func() int { return cl.streamLeader(faultStopStream) })
	tl.add("stream %s leader moved from %s to %s", faultStopStream, cl.name(was), cl.name(now))

	// Faults that land after the last outcome would test nothing.
	if atRestart >= nCommands || atStepDown >= nCommands {
		t.Errorf("faults came after the work: restart at %d, step-down at %d of %d outcomes", atRestart, atStepDown, nCommands)
	}
	complete := faultWaitStored(js, nCommands, deadline)
	elapsed := time.Since(start)
	progress := sampler.stop()
	tl.add("%d outcomes stored", faultStreamMsgs(js, faultOutcomeStream))
	if !complete {
		t.Errorf("not every command had an outcome within %s", runFor)
	}
	// A command left in the work queue was never acked. A lost ack comes
	// back after the ack wait and must then be settled as well.
	var left int64
	if !faultPoll(time.Now().Add(30*time.Second), func() bool {
		left = faultStreamMsgs(js, faultStopStream)
		return left == 0
	}) {
		t.Errorf("%d commands still in %s 30s after the last outcome: never acked", left, faultStopStream)
	}
	tl.add("%s empty", faultStopStream)

	dlfView := func(o consumer.Outcome) string {
		return fmt.Sprintf("DLF got %d stop calls for %s and has it stopped: %v", emu.StopCallsFor(o.ProjectID, o.ScriptName, o.InstanceID),
			o.InstanceID, emu.Stopped(o.ProjectID, o.ScriptName, o.InstanceID))
	}
	r := tallyFaultOutcomes(t, ids, faultReadAll(t, js, faultOutcomeStream), faultReadAll(t, js, faultDeadStream), dlfView)
	stall, stallFrom := faultLongestGap(r.stamps, time.Time{}, time.Time{})
	t.Logf("timeline:\n%s", tl)
	t.Logf("longest stall %s, from +%s; by phase: before faults %s, after the restart %s, after the step-downs %s",
		stall.Round(time.Millisecond), stallFrom.Sub(start).Round(time.Millisecond),
		faultGapIn(r.stamps, time.Time{}, restartAt), faultGapIn(r.stamps, restartAt, stepDownAt),
		faultGapIn(r.stamps, stepDownAt, time.Time{}))
	// Reported as the issue asks, and bounded loosely: a pull lost with a
	// restarted node is replaced within the 5 s pull wait, and a stall of
	// an ack wait (30 s) or more means commands waited to be redelivered.
	if stall >= 15*time.Second {
		t.Errorf("longest stall %s: more than 15 s without an outcome", stall.Round(time.Millisecond))
	}
	if stall >= 5*time.Second || t.Failed() {
		t.Logf("progress once a second (outcomes stored; consumer: pending, ack pending, pull requests waiting, redelivered, leader):\n%s", progress)
	}
	t.Logf("outcomes by status/cause: %v", r.byStatus)
	if len(r.deadBy) > 0 {
		t.Logf("dead letters by status/cause/code: %v", r.deadBy)
	}
	if n := asyncErrs.n.Load(); n > 0 {
		t.Logf("NATS async errors on test connections: %d, first: %v", n, asyncErrs.first.Load())
	}
	faultLogReport(t, logs, r.suspects, start, 6)
	// The workers log in-process, at debug level, to the observer.
	// Rendered as the binary's JSON encoder writes them: with %v, a byte
	// slice came out as decimal numbers, which no search form matches
	// (found by review).
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	var lines []string
	for _, e := range logs.All() {
		b, err := enc.EncodeEntry(e.Entry, e.Context)
		if err != nil {
			t.Fatalf("render a log entry: %v", err)
		}
		lines = append(lines, b.String())
		b.Free()
	}
	guard.search(t, js, "cluster", [][]string{lines}, false)

	// A publish whose stored-ack was lost in a leader change is sent
	// again (by nats.go, or by the redelivery that stores the outcome its
	// state record holds), and the outcome stream's duplicate window keeps
	// one; duplicates above counts what audit consumers see. Bounded by
	// what the workers hold at once, the commands a fault can catch
	// between an outcome and its ack (observed: 11 to 316), so that a
	// worker publishing every outcome twice fails (found by review).
	republished := outcomePubs.republished()
	if republished > nWorkers*512 {
		t.Errorf("%d outcome publishes beyond one per command, more than the %d workers hold at once", republished, nWorkers)
	}
	// The worker whose server restarts loses the connection between some
	// outcomes and their decision records, and the redeliveries of those
	// decide them again, within the duplicate window: the stream keeps the
	// first outcome and the redelivery follows it. They are the commands
	// of one worker between outcome and record at that moment, so at most
	// what a worker holds (512). Observed: 0 to 62 in the runs of
	// 2026-11-27, mostly 0 with 512 held, but 380 once in 58 runs that
	// evening (a rough restart: bucket reads timing out for 5 s), every
	// one of them following the stored outcome. A bound of 120 told a
	// removed already-decided check (181) from that scatter; it no longer
	// can, and the bound is now the structural one.
	redecided, redecidedEx := outcomePubs.decidedAgain()
	if redecided > 512 {
		t.Errorf("%d outcome publishes decided a command again, more than one worker has between outcome and record, e.g. %s", redecided, sample(redecidedEx))
	}
	fmt.Printf("servers=%d workers=%d commands=%d outcomes=%d lost=%d duplicates=%d republished=%d redecided=%d stopped=%d dead_letters=%d longest_stall=%s elapsed=%s dlf_calls=%d\n",
		nServers, nWorkers, nCommands, r.outcomes, r.lost, r.duplicates, republished, redecided, r.stopped, r.dead,
		stall.Round(time.Millisecond), elapsed.Round(time.Millisecond), emu.StopCalls())
}

// faultTally is what the outcome and dead-letter streams hold at the end.
type faultTally struct {
	outcomes, lost, duplicates, stopped, dead int
	byStatus                                  map[string]int // "status/cause" -> outcomes
	deadBy                                    map[string]int // "status/cause/code" -> dead letters
	suspects                                  map[string]int // command id -> priority, lower first
	stamps                                    []time.Time    // when each outcome was stored
}

// tallyFaultOutcomes counts outcomes per command and fails the test for a
// lost command, a second outcome, an unknown id, or a status other than
// stopped.
func tallyFaultOutcomes(t *testing.T, ids []string, outcomes, dead []jetstream.Msg, dlfView func(consumer.Outcome) string) faultTally {
	t.Helper()
	r := faultTally{outcomes: len(outcomes), dead: len(dead), byStatus: map[string]int{},
		deadBy: map[string]int{}, suspects: map[string]int{}}
	perID := make(map[string]int, len(ids))
	for _, m := range outcomes {
		var o consumer.Outcome
		if err := json.Unmarshal(m.Data(), &o); err != nil {
			t.Errorf("outcome is not JSON: %v: %s", err, m.Data())
			continue
		}
		perID[o.CommandID]++
		r.byStatus[o.Status+"/"+o.Cause]++
		switch {
		case o.Status != consumer.StatusStopped:
			r.suspects[o.CommandID] = 0
			t.Errorf("stored outcome of %s is %s/%s (http %d %s, attempts %d, %s) although its instance was running; %s",
				o.CommandID, o.Status, o.Cause, o.HTTPStatus, o.ErrorCode, o.Attempts, o.WorkerID, dlfView(o))
		case o.Cause != consumer.CauseOK:
			r.stopped++
			r.suspects[o.CommandID] = 2 // e.g. already_stopped: worth a look, not an error
		default:
			r.stopped++
		}
		if md, err := m.Metadata(); err == nil {
			r.stamps = append(r.stamps, md.Timestamp)
		}
	}
	for _, m := range dead {
		h := m.Headers()
		id := h.Get(jetstream.MsgIDHeader)
		if p, ok := r.suspects[id]; !ok || p > 1 {
			r.suspects[id] = 1
		}
		r.deadBy[h.Get(consumer.HeaderStatus)+"/"+h.Get(consumer.HeaderCause)+"/"+h.Get(consumer.HeaderErrorCode)]++
	}
	var lostIDs []string
	for _, id := range ids {
		switch n := perID[id]; {
		case n == 0:
			r.lost++
			lostIDs = append(lostIDs, id)
		case n > 1:
			r.duplicates += n - 1
		}
		delete(perID, id)
	}
	for id := range perID {
		t.Errorf("outcome for a command never published: %q", id)
	}
	if r.lost != 0 {
		t.Errorf("lost %d commands (no outcome), e.g. %v", r.lost, lostIDs[:min(len(lostIDs), 10)])
	}
	if r.duplicates != 0 {
		t.Errorf("%d duplicate outcomes", r.duplicates)
	}
	// A second outcome within two minutes is dropped by the outcome
	// stream's duplicate window, so the count above cannot see one; a
	// repeated command decided anew would still leave a dead letter.
	if r.dead != 0 {
		t.Errorf("%d dead letters although every instance was running: %v", r.dead, r.deadBy)
	}
	return r
}

package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/dlf-stop/worker/internal/consumer"
	"github.com/dlf-stop/worker/internal/dlf"
	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/embedded"
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

	emu, emuURL := emulator.StartForTest(t, emulator.WithRequestLogSize(0))
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
	eventually(t, 30*time.Second, func() error {
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
		startFaultWorker(t, cl.urls(i), emuURL, c, log.With(zap.String("worker", c.WorkerID)), asyncErrs)
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
	tl.add("restart %s (consumer leader, w%d's server) at %d outcomes", cl.name(victim), victim+1,
		faultStreamMsgs(js, faultOutcomeStream))
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
	tl.add("consumer leader step-down at %d outcomes", faultStreamMsgs(js, faultOutcomeStream))
	was, now := faultMoveLeader(t, client, "$JS.API.CONSUMER.LEADER.STEPDOWN."+faultStopStream+"."+faultConsumer, cl.consumerLeader)
	tl.add("consumer leader moved from %s to %s", cl.name(was), cl.name(now))
	was, now = faultMoveLeader(t, client, "$JS.API.STREAM.LEADER.STEPDOWN."+faultStopStream,
		func() int { return cl.streamLeader(faultStopStream) })
	tl.add("stream %s leader moved from %s to %s", faultStopStream, cl.name(was), cl.name(now))

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

	fmt.Printf("servers=%d workers=%d commands=%d outcomes=%d lost=%d duplicates=%d stopped=%d dead_letters=%d longest_stall=%s elapsed=%s dlf_calls=%d\n",
		nServers, nWorkers, nCommands, r.outcomes, r.lost, r.duplicates, r.stopped, r.dead,
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
	return r
}

// faultCluster is a JetStream cluster of embedded servers on loopback.
// Each node keeps its options, so it restarts with the same name, ports
// and store directory, as a broker pod restarts on its volume.
// Only the test goroutine and its cleanup use it.
type faultCluster struct {
	t     *testing.T
	opts  []embedded.Options
	nodes []*server.Server
}

func startFaultCluster(t *testing.T, n int) *faultCluster {
	t.Helper()
	ports := faultFreePorts(t, 2*n) // routes name every node, so all are chosen first
	c := &faultCluster{t: t, opts: make([]embedded.Options, n), nodes: make([]*server.Server, n)}
	for i := range c.opts {
		var routes []string
		for j := 0; j < n; j++ {
			if j != i {
				routes = append(routes, "nats-route://127.0.0.1:"+strconv.Itoa(ports[n+j]))
			}
		}
		c.opts[i] = embedded.Options{Port: ports[i], StoreDir: t.TempDir(), ServerName: "n" + strconv.Itoa(i+1),
			ClusterName: "dlf-e2e", ClusterPort: ports[n+i], Routes: routes}
	}
	t.Cleanup(c.shutdown)
	for i := range c.opts {
		s, err := embedded.Start(c.opts[i])
		if err != nil {
			t.Fatalf("start %s: %v", c.opts[i].ServerName, err)
		}
		c.nodes[i] = s
	}
	return c
}

// faultFreePorts holds n listeners open at once, so the ports differ, and
// releases them for the servers.
func faultFreePorts(t *testing.T, n int) []int {
	t.Helper()
	ports := make([]int, n)
	ls := make([]net.Listener, n)
	for i := range ls {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls[i], ports[i] = l, l.Addr().(*net.TCPAddr).Port
	}
	for _, l := range ls {
		_ = l.Close()
	}
	return ports
}

// urls lists every node, node first first: a connection that does not
// randomize the list starts on that node and fails over in order.
func (c *faultCluster) urls(first int) string {
	u := make([]string, len(c.opts))
	for i := range c.opts {
		u[i] = "nats://127.0.0.1:" + strconv.Itoa(c.opts[(first+i)%len(c.opts)].Port)
	}
	return strings.Join(u, ",")
}

func (c *faultCluster) name(i int) string {
	if i < 0 || i >= len(c.opts) {
		return "none"
	}
	return c.opts[i].ServerName
}

func (c *faultCluster) shutdown() {
	for _, s := range c.nodes {
		if s != nil {
			s.Shutdown()
		}
	}
	for _, s := range c.nodes {
		if s != nil {
			s.WaitForShutdown()
		}
	}
}

// restart shuts node i down, waits until it is gone, and starts it again.
func (c *faultCluster) restart(i int) {
	c.t.Helper()
	c.nodes[i].Shutdown()
	c.nodes[i].WaitForShutdown()
	s, err := embedded.Start(c.opts[i])
	if err != nil {
		c.nodes[i] = nil
		c.t.Fatalf("restart %s: %v", c.opts[i].ServerName, err)
	}
	c.nodes[i] = s
}

// waitMetaLeader waits for exactly one meta leader with every node current.
func (c *faultCluster) waitMetaLeader(within time.Duration) {
	c.t.Helper()
	eventually(c.t, within, func() error {
		leaders := 0
		for i := range c.opts {
			s := c.nodes[i]
			if s.JetStreamIsLeader() {
				leaders++
			}
			if !s.JetStreamIsCurrent() {
				return fmt.Errorf("%s: meta group not current", s.Name())
			}
		}
		if leaders != 1 {
			return fmt.Errorf("%d meta leaders", leaders)
		}
		return nil
	})
}

// waitCurrent waits until node i has rejoined: its meta group and every
// stream current.
func (c *faultCluster) waitCurrent(i int, streams []string, within time.Duration) {
	c.t.Helper()
	eventually(c.t, within, func() error {
		s := c.nodes[i]
		if !s.JetStreamIsCurrent() {
			return fmt.Errorf("%s: meta group not current", s.Name())
		}
		for _, st := range streams {
			if !s.JetStreamIsStreamCurrent(faultAccount, st) {
				return fmt.Errorf("%s: stream %s not current", s.Name(), st)
			}
		}
		return nil
	})
}

// consumerLeader returns the index of the node leading the worker's
// consumer, or -1.
func (c *faultCluster) consumerLeader() int {
	for i := range c.opts {
		if c.nodes[i].JetStreamIsConsumerLeader(faultAccount, faultStopStream, faultConsumer) {
			return i
		}
	}
	return -1
}

func (c *faultCluster) streamLeader(stream string) int {
	for i := range c.opts {
		if c.nodes[i].JetStreamIsStreamLeader(faultAccount, stream) {
			return i
		}
	}
	return -1
}

// faultAsyncErrs counts asynchronous NATS errors (writes to a server that
// went away) instead of letting the default handler print them.
type faultAsyncErrs struct {
	n     atomic.Int64
	first atomic.Value
}

func (e *faultAsyncErrs) handle(_ *nats.Conn, _ *nats.Subscription, err error) {
	if e.n.Add(1) == 1 {
		e.first.Store(err.Error())
	}
}

// connectFault connects to the first of urls, failing over to the others
// in order and reconnecting forever; it is closed at cleanup.
func connectFault(t *testing.T, urls, name string, errs *faultAsyncErrs) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(urls, nats.Name(name), nats.DontRandomize(), nats.MaxReconnects(-1),
		nats.ReconnectWait(50*time.Millisecond), nats.ReconnectJitter(10*time.Millisecond, 10*time.Millisecond),
		nats.ErrorHandler(errs.handle))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// startFaultWorker runs an in-process worker with its own connection, as a
// separate replica would. Cleanups run last-in first-out, so at teardown
// the worker's context is cancelled and Run has returned before its
// connection is closed, and both before the servers stop.
func startFaultWorker(t *testing.T, urls, emuURL string, cfg consumer.Config, log *zap.Logger, errs *faultAsyncErrs) {
	t.Helper()
	nc := connectFault(t, urls, cfg.WorkerID, errs)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cons, err := consumer.Setup(ctx, js, cfg, log)
	if err != nil {
		t.Fatalf("%s: setup: %v", cfg.WorkerID, err)
	}
	client, err := dlf.NewClient(dlf.Config{Endpoint: emuURL, Timeout: cfg.CallTimeout, MaxConns: cfg.Concurrency})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.CloseIdleConnections)
	m, err := consumer.NewMetrics(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	w, err := consumer.New(js, cons, client, cfg, log, m)
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(runCtx) }()
	t.Cleanup(func() {
		stop()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("%s: Run: %v", cfg.WorkerID, err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("%s: Run did not return within 30s of cancel", cfg.WorkerID)
		}
	})
}

// publishFaultCommands stores one command per id, with Nats-Msg-Id = id,
// and fails unless JetStream acknowledged every one.
func publishFaultCommands(t *testing.T, js jetstream.JetStream, ids []string, project, script string) {
	t.Helper()
	futures := make([]jetstream.PubAckFuture, 0, len(ids))
	for i, id := range ids {
		body := fmt.Sprintf(`{"command_id":%q,"project_id":%q,"script_name":%q,"instance_id":"inst-%05d","reason":"e2e broker faults"}`,
			id, project, script, i)
		for {
			f, err := js.PublishAsync("dlf.stop.request", []byte(body), jetstream.WithMsgID(id))
			if err == nil {
				futures = append(futures, f)
				break
			}
			if !errors.Is(err, jetstream.ErrTooManyStalledMsgs) {
				t.Fatalf("publish %s: %v", id, err)
			}
			<-js.PublishAsyncComplete()
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-time.After(60 * time.Second):
		t.Fatalf("commands not acknowledged within 60s (%d pending)", js.PublishAsyncPending())
	}
	for _, f := range futures {
		select {
		case <-f.Ok():
		case err := <-f.Err():
			t.Fatalf("publish %s: %v", f.Msg().Header.Get(jetstream.MsgIDHeader), err)
		}
	}
}

// faultStreamMsgs returns how many messages a stream holds, or -1 when it
// cannot be asked (a leader election is under way).
func faultStreamMsgs(js jetstream.JetStream, stream string) int64 {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return -1
	}
	return int64(s.CachedInfo().State.Msgs)
}

func faultStreamNames(t *testing.T, js jetstream.JetStream) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var names []string
	l := js.StreamNames(ctx)
	for n := range l.Name() {
		names = append(names, n)
	}
	if err := l.Err(); err != nil {
		t.Fatalf("list streams: %v", err)
	}
	sort.Strings(names)
	return names
}

// faultPoll calls fn every 50ms until it reports true (true) or the
// deadline passes (false).
func faultPoll(deadline time.Time, fn func() bool) bool {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if fn() {
			return true
		}
		if !time.Now().Before(deadline) {
			return false
		}
		<-tick.C
	}
}

// faultWaitStored polls until the outcome stream holds n messages; it
// reports false when the deadline passed first.
func faultWaitStored(js jetstream.JetStream, n int, deadline time.Time) bool {
	return faultPoll(deadline, func() bool {
		return faultStreamMsgs(js, faultOutcomeStream) >= int64(n)
	})
}

// faultMoveLeader asks JetStream to step a stream or consumer leader down
// (retrying while the request cannot be served) and waits until another
// node leads. leader returns the leading node's index or -1.
func faultMoveLeader(t *testing.T, nc *nats.Conn, subject string, leader func() int) (was, now int) {
	t.Helper()
	was = leader()
	eventually(t, 30*time.Second, func() error {
		resp, err := nc.Request(subject, nil, 5*time.Second)
		if err != nil {
			return fmt.Errorf("%s: %w", subject, err)
		}
		var r struct {
			Success bool `json:"success"`
			Error   *struct {
				Code        int    `json:"code"`
				Description string `json:"description"`
			} `json:"error"`
		}
		switch err := json.Unmarshal(resp.Data, &r); {
		case err != nil:
			return fmt.Errorf("%s: %w: %s", subject, err, resp.Data)
		case r.Error != nil:
			return fmt.Errorf("%s: %d %s", subject, r.Error.Code, r.Error.Description)
		case !r.Success:
			return fmt.Errorf("%s: not successful: %s", subject, resp.Data)
		}
		return nil
	})
	eventually(t, 30*time.Second, func() error {
		if now = leader(); now < 0 || now == was {
			return fmt.Errorf("after %s the leader is node %d", subject, now)
		}
		return nil
	})
	return was, now
}

// faultReadAll reads every message of a stream with an ordered consumer.
func faultReadAll(t *testing.T, js jetstream.JetStream, stream string) []jetstream.Msg {
	t.Helper()
	want := faultStreamMsgs(js, stream)
	if want < 0 {
		t.Fatalf("stream %s: no info", stream)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	oc, err := js.OrderedConsumer(ctx, stream, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatalf("ordered consumer on %s: %v", stream, err)
	}
	var msgs []jetstream.Msg
	for int64(len(msgs)) < want {
		if ctx.Err() != nil {
			t.Fatalf("stream %s: read %d of %d messages within 30s", stream, len(msgs), want)
		}
		batch, err := oc.Fetch(1000, jetstream.FetchMaxWait(2*time.Second))
		if err != nil {
			continue
		}
		for m := range batch.Messages() {
			msgs = append(msgs, m)
		}
	}
	return msgs
}

// faultLongestGap returns the largest gap between consecutive store
// times that begins within [from, to) (a zero bound is open), and when it
// began.
func faultLongestGap(ts []time.Time, from, to time.Time) (time.Duration, time.Time) {
	sort.Slice(ts, func(i, j int) bool { return ts[i].Before(ts[j]) })
	var gap time.Duration
	var at time.Time
	for i := 1; i < len(ts); i++ {
		if (!from.IsZero() && ts[i-1].Before(from)) || (!to.IsZero() && !ts[i-1].Before(to)) {
			continue
		}
		if d := ts[i].Sub(ts[i-1]); d > gap {
			gap, at = d, ts[i-1]
		}
	}
	return gap, at
}

func faultGapIn(ts []time.Time, from, to time.Time) time.Duration {
	gap, _ := faultLongestGap(ts, from, to)
	return gap.Round(time.Millisecond)
}

// faultTimeline records what the test did, relative to the workers' start.
type faultTimeline struct {
	start  time.Time
	events []string
}

func (tl *faultTimeline) add(format string, args ...any) {
	tl.events = append(tl.events, fmt.Sprintf("  +%-9s ", time.Since(tl.start).Round(time.Millisecond))+fmt.Sprintf(format, args...))
}

func (tl *faultTimeline) String() string { return strings.Join(tl.events, "\n") }

// faultSampler polls the outcome stream and the consumer once a second:
// the evidence for where a stall came from.
type faultSampler struct {
	cancel context.CancelFunc
	done   chan string
	once   sync.Once
	result string
}

func sampleFaultProgress(t *testing.T, js jetstream.JetStream, start time.Time) *faultSampler {
	ctx, cancel := context.WithCancel(context.Background())
	p := &faultSampler{cancel: cancel, done: make(chan string, 1)}
	t.Cleanup(func() { p.stop() })
	go func() {
		var lines []string
		var last string
		repeats := 0
		flush := func() {
			if repeats > 0 {
				lines = append(lines, fmt.Sprintf("  (same for %d more seconds)", repeats))
				repeats = 0
			}
		}
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				flush()
				p.done <- strings.Join(lines, "\n")
				return
			case <-tick.C:
			}
			state := fmt.Sprintf("outcomes=%d", faultStreamMsgs(js, faultOutcomeStream))
			cctx, ccancel := context.WithTimeout(ctx, time.Second)
			c, err := js.Consumer(cctx, faultStopStream, faultConsumer)
			ccancel()
			if err != nil {
				state += " consumer: " + err.Error()
			} else {
				i := c.CachedInfo()
				leader := "?"
				if i.Cluster != nil {
					leader = i.Cluster.Leader
				}
				state += fmt.Sprintf(" pending=%d ack_pending=%d waiting=%d redelivered=%d leader=%s",
					i.NumPending, i.NumAckPending, i.NumWaiting, i.NumRedelivered, leader)
			}
			if state == last {
				repeats++
				continue
			}
			flush()
			last = state
			lines = append(lines, fmt.Sprintf("  +%-4s %s", time.Since(start).Round(time.Second), state))
		}
	}()
	return p
}

// stop ends the sampling and returns what was seen; it may be called again.
func (p *faultSampler) stop() string {
	p.once.Do(func() {
		p.cancel()
		p.result = <-p.done
	})
	return p.result
}

// faultLogReport logs the workers' warnings grouped by message with the
// first of each, then, for up to max suspect commands (lowest priority
// value first), every worker log line about it.
func faultLogReport(t *testing.T, logs *observer.ObservedLogs, suspects map[string]int, start time.Time, max int) {
	t.Helper()
	ids := make([]string, 0, len(suspects))
	for id := range suspects {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool {
		if suspects[ids[i]] != suspects[ids[j]] {
			return suspects[ids[i]] < suspects[ids[j]]
		}
		return ids[i] < ids[j]
	})
	total := len(ids)
	ids = ids[:min(total, max)]
	show := map[string]bool{}
	for _, id := range ids {
		show[id] = true
	}
	warnings := map[string]int{}
	var order []string
	history := map[string][]string{}
	for _, e := range logs.All() {
		ctx := e.ContextMap()
		line := fmt.Sprintf("+%-9s %-5s %v %q", e.Time.Sub(start).Round(time.Millisecond), e.Level, ctx["worker"], e.Message)
		for _, k := range []string{"delivery", "attempt", "attempts", "status", "cause", "http_status", "error_code", "kind", "reason", "error"} {
			if v, ok := ctx[k]; ok {
				line += fmt.Sprintf(" %s=%v", k, v)
			}
		}
		if e.Level >= zapcore.WarnLevel {
			key := e.Level.String() + " " + e.Message
			if warnings[key] == 0 {
				order = append(order, key+"; first: "+line)
			}
			warnings[key]++
		}
		if id, _ := ctx["command_id"].(string); show[id] {
			history[id] = append(history[id], "    "+line)
		}
	}
	for _, first := range order {
		key, _, _ := strings.Cut(first, "; first: ")
		t.Logf("worker log x%d %s", warnings[key], first)
	}
	if total > len(ids) {
		t.Logf("%d suspect commands (non-stopped outcome, dead letter, or a cause other than ok); the first %d:", total, len(ids))
	}
	for _, id := range ids {
		t.Logf("history of %s:\n%s", id, strings.Join(history[id], "\n"))
	}
}

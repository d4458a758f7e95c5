package e2e

import (
	"bufio"
	"context"
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/consumer"
	"github.com/dlf-stop/worker/internal/dlf/emulator"
)

// These tests pin contract section 6, "Systemic failure", on the real
// binary: when DLF is down, failing with 5xx or refusing the credentials,
// the worker parks its commands (no outcome, no dead letter), reports 503
// on /readyz, and once DLF answers again it works the backlog off without
// losing a command. A 429 pauses the worker for Retry-After instead of
// failing commands.

const (
	dlffProject = "p"
	dlffScript  = "s"
	// dlffAckWait is the consumer's ack wait: short, so a command the
	// worker fails to heartbeat while it holds it would come back (and
	// show up as a duplicate call) within the test.
	dlffAckWait = 5 * time.Second
)

// TestDLFOutageAndRecovery: DLF refuses connections for 20 s, then
// answers 503 for 10 s, then recovers, while 1,000 commands wait.
func TestDLFOutageAndRecovery(t *testing.T) {
	const commands = 1000
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	emu, emuURL := emulator.StartForTest(t, emulator.WithRequestLogSize(100_000))
	rig := startDLFFaultRig(ctx, t, emu, emuURL)
	rig.runFaultScenario("outage", "outage", commands, []dlffPhase{
		{name: "down", last: 20 * time.Second, faults: emulator.Faults{Down: true}},
		{name: "503", last: 10 * time.Second, faults: emulator.Faults{ErrorRate: 1, ErrorStatus: http.StatusServiceUnavailable}},
	})
}

// TestDLFUnauthorized: DLF answers 401 APIG.0301 to everything for 10 s
// (revoked credentials, fixed by an operator), then recovers, while 500
// commands wait. A 401 opens the circuit at once.
func TestDLFUnauthorized(t *testing.T) {
	const commands = 500
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	emu, emuURL := emulator.StartForTest(t, emulator.WithRequestLogSize(100_000))
	rig := startDLFFaultRig(ctx, t, emu, emuURL)
	rig.runFaultScenario("unauthorized", "unauth", commands, []dlffPhase{
		{name: "401", last: 10 * time.Second, faults: emulator.Faults{AuthFail: true}},
	})
}

// TestThrottling: DLF works (20 ms a call), then after the 60th call
// answers every stop 429 APIG.0308 with Retry-After: 1 for 5 s, then
// works again. No command may fail; the worker must slow down.
func TestThrottling(t *testing.T) {
	const (
		commands      = 200
		throttleAfter = 60 // stop requests answered normally before throttling starts
		throttleFor   = 5 * time.Second
		latency       = 20 * time.Millisecond
		retryAfter    = time.Second
	)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// The emulator is served through a wrapper that switches throttling
	// on at an exact request, so there is a measurable rate before it.
	// Cleanups run last-registered first: the emulator closes (releasing
	// any request in its latency wait) before the server waits for them.
	emu := emulator.New(emulator.WithRequestLogSize(100_000))
	emu.SetFaults(emulator.Faults{Latency: latency})
	throttled := make(chan time.Time, 1)
	var seen atomic.Int64
	var once sync.Once
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if seen.Add(1) > throttleAfter {
			once.Do(func() {
				emu.SetFaults(emulator.Faults{Throttle: true, RetryAfter: retryAfter})
				throttled <- time.Now()
			})
		}
		emu.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() {
		if err := emu.Close(); err != nil {
			t.Errorf("close DLF emulator: %v", err)
		}
	})

	rig := startDLFFaultRig(ctx, t, emu, srv.URL)
	ids, bodies := dlffCommands(emu, "throttle", commands)
	outcomes := watchOutcomes(ctx, t, rig.js, "DLF_STOP_OUTCOMES", commands)
	dead := watchDead(ctx, t, rig.js, "DLF_STOP_DEAD")
	published := publishPaced(ctx, t, rig.js, "dlf.stop.request", bodies, len(bodies), time.Millisecond)

	var throttleOn, throttleOff time.Time
	var end <-chan time.Time
	for throttleOff.IsZero() {
		select {
		case throttleOn = <-throttled:
			tm := time.NewTimer(throttleFor)
			defer tm.Stop()
			end = tm.C
		case <-end:
			emu.SetFaults(emulator.Faults{Latency: latency})
			throttleOff = time.Now()
		case err := <-published:
			if err != nil {
				t.Fatal(err)
			}
			published = nil
		case <-outcomes.complete:
			if throttleOn.IsZero() {
				t.Fatalf("all %d commands decided before DLF was asked %d times: nothing was throttled", commands, throttleAfter)
			}
			t.Fatalf("all %d commands decided while DLF still answered 429: %v", commands, outcomes.snapshot().status)
		case err := <-rig.w.c.done:
			rig.w.reaped = true
			t.Fatalf("worker exited (%v); log: %s", err, tail(rig.w.c.lines(), 10))
		case <-ctx.Done():
			t.Fatalf("throttling never began: DLF got %d requests", seen.Load())
		}
	}
	done := rig.awaitOutcomes(outcomes, commands, 30*time.Second)
	tl := rig.tally(outcomes, dead, ids)

	reqs := emu.Requests()
	slices.SortFunc(reqs, func(a, b emulator.Request) int { return a.Time.Compare(b.Time) })
	var (
		n429, n400, before, during int
		first429                   time.Time
		last429                    time.Time
		inside                     int // arrived inside the Retry-After of an earlier 429
	)
	for _, r := range reqs {
		if r.Status == http.StatusTooManyRequests && first429.IsZero() {
			first429 = r.Time
		}
	}
	if first429.IsZero() {
		t.Fatalf("DLF never answered 429 although throttling was on from %s to %s", throttleOn, throttleOff)
	}
	// A request counts as inside a Retry-After when it arrived more than
	// retrySlack after the latest 429 and before that 429's Retry-After
	// ended: one arriving within retrySlack was most likely on its way
	// before the 429 got back to the worker, which pauses every call on a
	// 429. Requests while throttled are grouped into bursts: runs with
	// less than burstGap between neighbours.
	const (
		retrySlack = 50 * time.Millisecond
		burstGap   = 200 * time.Millisecond
	)
	var bursts []int
	var prev time.Time
	for _, r := range reqs {
		switch {
		case r.Time.Before(first429):
			before++
		case r.Time.Before(throttleOff):
			during++
			if len(bursts) == 0 || r.Time.Sub(prev) >= burstGap {
				bursts = append(bursts, 0)
			}
			bursts[len(bursts)-1]++
			prev = r.Time
		}
		if !last429.IsZero() {
			if gap := r.Time.Sub(last429); gap > retrySlack && gap < retryAfter {
				inside++
			}
		}
		switch r.Status {
		case http.StatusTooManyRequests:
			n429++
			last429 = r.Time
		case http.StatusBadRequest:
			n400++
		}
	}
	rateBefore := float64(before) / reqs[0].Time.Sub(first429).Abs().Seconds()
	if before == 0 {
		rateBefore = 0
	}
	rateAfter := float64(during) / throttleOff.Sub(first429).Seconds()
	metrics, _ := rig.metrics()

	t.Logf("throttling commands=%d stopped=%d failed=%d requests_429=%d rate_before_first_429=%s/s rate_after_first_429=%s/s "+
		"requests_before_first_429=%d requests_while_throttled=%d bursts_while_throttled=%d max_burst=%d sent_inside_retry_after=%d "+
		"calls_per_command=%.2f calls_to_stopped_instances=%d throttled_for=%s done_after_throttle=%s lost=%d dead_letters=%d worker_calls=%s",
		commands, tl.status[consumer.StatusStopped], tl.status[consumer.StatusFailed], n429,
		dlffRate(rateBefore), dlffRate(rateAfter), before, during, len(bursts), slices.Max(append(bursts, 0)), inside,
		float64(emu.StopCalls())/commands, n400, throttleOff.Sub(throttleOn).Round(time.Millisecond),
		done.Sub(throttleOff).Round(time.Millisecond), tl.lost, tl.dead, metrics.calls())
	rig.logSummary()
	tl.check(t, commands)
	if rateAfter >= rateBefore && rateBefore > 0 {
		t.Errorf("the worker did not slow down after a 429: %.1f/s before, %.1f/s after", rateBefore, rateAfter)
	}
}

func dlffRate(r float64) string {
	if math.IsNaN(r) || math.IsInf(r, 0) {
		return "n/a"
	}
	return strconv.FormatFloat(r, 'f', 1, 64)
}

// dlffPhase is one stretch of emulator behaviour.
type dlffPhase struct {
	name   string
	last   time.Duration
	faults emulator.Faults
}

// dlffRig is one embedded JetStream, one emulator and one worker process.
type dlffRig struct {
	t        *testing.T
	ctx      context.Context
	js       jetstream.JetStream
	emu      *emulator.Emulator
	w        *reapable
	httpAddr string
	client   *http.Client
}

// startDLFFaultRig starts JetStream, creates the streams and the consumer
// (short ack wait), starts the worker against emuURL and waits until its
// /readyz says 200.
func startDLFFaultRig(ctx context.Context, t *testing.T, emu *emulator.Emulator, emuURL string) *dlffRig {
	t.Helper()
	srv, _, js := startJetStream(t)
	if _, err := consumer.Setup(ctx, js, consumer.Config{AckWait: dlffAckWait}, zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	r := &dlffRig{t: t, ctx: ctx, js: js, emu: emu, httpAddr: freeAddr(t),
		client: &http.Client{Timeout: 2 * time.Second}}
	t.Cleanup(r.client.CloseIdleConnections)
	r.w = spawnWorker(t, map[string]string{
		"NATS_URL":                   srv.ClientURL(),
		"DLF_ENDPOINT":               emuURL,
		"HUAWEICLOUD_SDK_PROJECT_ID": dlffProject,
		"HTTP_ADDR":                  r.httpAddr,
		"LOG_LEVEL":                  "info",
		"RETRY_INITIAL_INTERVAL":     "200ms",
		"RETRY_MAX_INTERVAL":         "2s",
	})
	eventually(t, 20*time.Second, func() error {
		code, err := r.readyz(ctx)
		if err != nil {
			return err
		}
		if code != http.StatusOK {
			return fmt.Errorf("/readyz answered %d; worker log: %s", code, tail(r.w.c.lines(), 5))
		}
		return nil
	})
	return r
}

// dlffCommands makes n running instances and one stop command for each.
func dlffCommands(emu *emulator.Emulator, prefix string, n int) (ids []string, bodies [][]byte) {
	ids = make([]string, n)
	bodies = make([][]byte, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("%s-%04d", prefix, i)
		inst := fmt.Sprintf("%s-i-%04d", prefix, i)
		emu.AddRunning(dlffProject, "", dlffScript, inst)
		bodies[i] = []byte(`{"command_id":"` + ids[i] + `","script_name":"` + dlffScript + `","instance_id":"` + inst + `"}`)
	}
	return ids, bodies
}

// runFaultScenario publishes commands as the first phase begins, runs
// the phases, clears the faults, waits for every outcome and reports.
func (r *dlffRig) runFaultScenario(phase, prefix string, commands int, phases []dlffPhase) {
	t := r.t
	ids, bodies := dlffCommands(r.emu, prefix, commands)
	outcomes := watchOutcomes(r.ctx, t, r.js, "DLF_STOP_OUTCOMES", commands)
	dead := watchDead(r.ctx, t, r.js, "DLF_STOP_DEAD")
	ready := r.pollReadyz(100 * time.Millisecond)

	began, cleared, atClear := r.runFaults(phases, bodies)
	decidedDuringFaults := outcomes.distinct()
	done := r.awaitOutcomes(outcomes, commands, 40*time.Second)
	tl := r.tally(outcomes, dead, ids)

	var final int
	eventually(t, 5*time.Second, func() error {
		code, err := r.readyz(r.ctx)
		if err != nil {
			return err
		}
		if final = code; code != http.StatusOK {
			return fmt.Errorf("/readyz answered %d after every command was decided", code)
		}
		return nil
	})
	ready.stop()
	rs := ready.stats(began, cleared)

	// From the emulator's log: calls it received during the faults (a
	// refused connection never reaches it), the longest gap between two of
	// them (the probe spacing, RETRY_MAX_INTERVAL at most), and how long
	// after the faults were cleared the first call got through.
	reqs := r.emu.Requests()
	slices.SortFunc(reqs, func(a, b emulator.Request) int { return a.Time.Compare(b.Time) })
	var (
		faultCalls   int
		n400         int // DLF.6205: a call for an instance already stopped
		maxGap       time.Duration
		prevCall     time.Time
		firstSuccess time.Duration = -1
	)
	for _, q := range reqs {
		switch {
		case q.Time.Before(began):
		case q.Time.Before(cleared):
			faultCalls++
			if !prevCall.IsZero() {
				maxGap = max(maxGap, q.Time.Sub(prevCall))
			}
			prevCall = q.Time
		case firstSuccess < 0 && q.Status >= 200 && q.Status < 300:
			firstSuccess = q.Time.Sub(cleared)
		}
		if q.Status == http.StatusBadRequest {
			n400++
		}
	}
	after, _ := r.metrics()
	t.Logf("dlf_faults phase=%s commands=%d lost=%d dead_letters=%d stopped=%d calls_per_command=%.2f outage_calls=%g "+
		"drain_after_recovery=%s readyz_not_ready_for=%s outage_calls_received=%d worker_calls_per_command=%.2f "+
		"max_gap_between_received_calls=%s first_success_after_recovery=%s calls_to_stopped_instances=%d "+
		"decided_during_outage=%d readyz_ready_during_outage=%d faults=%s outage_calls_by_code=%s worker_calls=%s",
		phase, commands, tl.lost, tl.dead, tl.status[consumer.StatusStopped],
		float64(r.emu.StopCalls())/float64(commands), atClear.total(),
		done.Sub(cleared).Round(time.Millisecond), rs.longest.Round(100*time.Millisecond),
		faultCalls, float64(after.total())/float64(commands),
		maxGap.Round(time.Millisecond), firstSuccess.Round(time.Millisecond), n400,
		decidedDuringFaults, rs.readyAfterNotReady, phaseNames(phases), atClear.calls(), after.calls())
	r.logSummary()

	tl.check(t, commands)
	if decidedDuringFaults != 0 {
		t.Errorf("%d commands were decided while DLF failed; they should have waited", decidedDuringFaults)
	}
	if rs.notReady == 0 {
		t.Errorf("/readyz never answered 503 during the faults (%d samples from %s to %s)",
			rs.samples, began.Format(time.StampMilli), cleared.Format(time.StampMilli))
	}
	if rs.readyAfterNotReady > 0 {
		t.Errorf("/readyz answered 200 %d times during the faults after it had gone 503 at %s: the circuit closed while DLF still failed",
			rs.readyAfterNotReady, rs.firstNotReady.Format(time.StampMilli))
	}
	if final != http.StatusOK {
		t.Errorf("/readyz answers %d at the end", final)
	}
}

func phaseNames(ps []dlffPhase) string {
	var b strings.Builder
	for i, p := range ps {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%s:%s", p.name, p.last)
	}
	return b.String()
}

// runFaults sets each phase's faults in turn for its duration, publishing
// bodies as the first phase begins, then clears the faults. It returns
// when the faults began and were cleared, and the worker's call counters
// read just before clearing.
func (r *dlffRig) runFaults(phases []dlffPhase, bodies [][]byte) (began, cleared time.Time, atClear dlffMetrics) {
	t := r.t
	began = time.Now()
	r.emu.SetFaults(phases[0].faults)
	published := publishPaced(r.ctx, t, r.js, "dlf.stop.request", bodies, len(bodies), time.Millisecond)
	for i, p := range phases {
		if i > 0 {
			r.emu.SetFaults(p.faults)
		}
		timer := time.NewTimer(p.last)
	phase:
		for {
			select {
			case <-timer.C:
				break phase
			case err := <-published:
				if err != nil {
					t.Fatal(err)
				}
				published = nil
			case err := <-r.w.c.done:
				r.w.reaped = true
				t.Fatalf("worker exited during phase %s (%v); log: %s", p.name, err, tail(r.w.c.lines(), 10))
			case <-r.ctx.Done():
				t.Fatalf("phase %s: %v", p.name, r.ctx.Err())
			}
		}
	}
	atClear, err := r.metrics()
	if err != nil {
		t.Errorf("read worker metrics: %v", err)
	}
	r.emu.SetFaults(emulator.Faults{})
	cleared = time.Now()
	if published != nil {
		select {
		case err := <-published:
			if err != nil {
				t.Fatal(err)
			}
		case <-r.ctx.Done():
			t.Fatal("publishing did not finish during the faults")
		}
	}
	return began, cleared, atClear
}

// awaitOutcomes waits until every command has an outcome and returns when.
func (r *dlffRig) awaitOutcomes(outcomes *outcomeWatch, want int, within time.Duration) time.Time {
	t := r.t
	timer := time.NewTimer(within)
	defer timer.Stop()
	select {
	case <-outcomes.complete:
		return time.Now()
	case <-timer.C:
		t.Fatalf("only %d of %d commands have an outcome %s after DLF recovered (by status %v); worker log: %s",
			outcomes.distinct(), want, within, outcomes.snapshot().status, tail(r.w.c.lines(), 10))
	case err := <-r.w.c.done:
		r.w.reaped = true
		t.Fatalf("worker exited (%v) with %d of %d outcomes; log: %s", err, outcomes.distinct(), want, tail(r.w.c.lines(), 10))
	case <-r.ctx.Done():
		t.Fatalf("%v with %d of %d outcomes", r.ctx.Err(), outcomes.distinct(), want)
	}
	return time.Time{}
}

// dlffTally is what the streams say once the work queue is empty.
type dlffTally struct {
	lost, duplicates, dead int
	unacked                uint64
	status                 map[string]int
	lostIDs, notStopped    []string
	deadCauses             map[string]int
}

// tally waits until the worker acked every command (the dead letter, if
// any, is stored before the ack), reads both streams to their end and
// counts.
func (r *dlffRig) tally(outcomes *outcomeWatch, dead *deadWatch, ids []string) dlffTally {
	t := r.t
	var tl dlffTally
	stop, err := r.js.Stream(r.ctx, "DLF_STOP")
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.NewTimer(15 * time.Second)
	defer deadline.Stop()
	poll := time.NewTicker(50 * time.Millisecond)
	defer poll.Stop()
wait:
	for {
		info, err := stop.Info(r.ctx)
		if err != nil {
			t.Fatal(err)
		}
		if tl.unacked = info.State.Msgs; tl.unacked == 0 {
			break
		}
		select {
		case <-poll.C:
		case <-deadline.C:
			break wait
		}
	}
	outN := streamMsgs(r.ctx, t, r.js, "DLF_STOP_OUTCOMES")
	deadN := streamMsgs(r.ctx, t, r.js, "DLF_STOP_DEAD")
	eventually(t, 10*time.Second, func() error {
		if got := outcomes.total(); uint64(got) != outN {
			return fmt.Errorf("read %d of %d outcome events", got, outN)
		}
		if got := dead.total(); uint64(got) != deadN {
			return fmt.Errorf("read %d of %d dead letters", got, deadN)
		}
		return nil
	})
	s := outcomes.snapshot()
	tl.status = s.status
	tl.duplicates = s.total - len(s.byID)
	for _, id := range ids {
		if len(s.byID[id]) == 0 {
			tl.lost++
			tl.lostIDs = append(tl.lostIDs, id)
		}
	}
	for id, sts := range s.byID {
		for _, o := range sts {
			if o.Status != consumer.StatusStopped {
				tl.notStopped = append(tl.notStopped, fmt.Sprintf("%s=%s/%s/%s attempts=%d", id, o.Status, o.Cause, o.ErrorCode, o.Attempts))
			}
		}
	}
	sort.Strings(tl.notStopped)
	d := dead.snapshot()
	tl.dead, tl.deadCauses = d.total, d.causes
	return tl
}

func (tl dlffTally) check(t *testing.T, commands int) {
	t.Helper()
	if tl.lost != 0 {
		t.Errorf("%d commands have no outcome event, e.g. %s", tl.lost, sample(tl.lostIDs))
	}
	if tl.dead != 0 {
		t.Errorf("%d dead letters (by status/cause/code %v)", tl.dead, tl.deadCauses)
	}
	if n := tl.status[consumer.StatusStopped]; n != commands || len(tl.notStopped) > 0 {
		t.Errorf("%d of %d outcomes stopped; not stopped: %d, e.g. %s", n, commands, len(tl.notStopped), sample(tl.notStopped))
	}
	if tl.duplicates != 0 {
		t.Errorf("%d outcome events beyond one per command", tl.duplicates)
	}
	if tl.unacked != 0 {
		t.Errorf("%d commands still in DLF_STOP after every command had an outcome", tl.unacked)
	}
}

// logSummary logs the worker's log lines by message, leaving out the
// one-per-command "command decided".
func (r *dlffRig) logSummary() {
	sum := warnSummary([]*reapable{r.w})
	delete(sum, "command decided")
	keys := make([]string, 0, len(sum))
	for k := range sum {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%q=%d", k, sum[k])
	}
	r.t.Logf("worker log by message: %s", strings.Join(parts, " "))
	var warns []string
	for _, line := range r.w.c.lines() {
		if strings.Contains(line, `"level":"warn"`) || strings.Contains(line, `"level":"error"`) {
			if !strings.Contains(line, "DLF circuit") && !strings.Contains(line, "no DLF credentials configured") {
				warns = append(warns, line)
			}
		}
	}
	if len(warns) > 0 {
		r.t.Logf("worker warnings besides the circuit's (%d): %s", len(warns), tail(warns, 5))
	}
}

func (r *dlffRig) readyz(ctx context.Context) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+r.httpAddr+"/readyz", nil)
	if err != nil {
		return 0, err
	}
	resp, err := r.client.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// dlffMetrics is the worker's dlf_stop_dlf_calls_total by code.
type dlffMetrics map[string]float64

func (m dlffMetrics) total() float64 {
	var n float64
	for _, v := range m {
		n += v
	}
	return n
}

func (m dlffMetrics) calls() string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s:%g", k, m[k])
	}
	return strings.Join(parts, ",")
}

// metrics reads dlf_stop_dlf_calls_total from the worker's /metrics.
func (r *dlffRig) metrics() (dlffMetrics, error) {
	req, err := http.NewRequestWithContext(r.ctx, http.MethodGet, "http://"+r.httpAddr+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := r.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	m := dlffMetrics{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), `dlf_stop_dlf_calls_total{code="`)
		if !ok {
			continue
		}
		code, val, ok := strings.Cut(rest, `"} `)
		if !ok {
			continue
		}
		v, err := strconv.ParseFloat(val, 64)
		if err != nil {
			return nil, fmt.Errorf("metrics line %q: %w", sc.Text(), err)
		}
		m[code] = v
	}
	return m, sc.Err()
}

// readySample is one /readyz answer (0: no answer).
type readySample struct {
	at   time.Time
	code int
}

// readyzPoll samples /readyz on a ticker until stopped.
type readyzPoll struct {
	mu      sync.Mutex
	samples []readySample
	cancel  context.CancelFunc
	done    chan struct{}
}

func (r *dlffRig) pollReadyz(every time.Duration) *readyzPoll {
	ctx, cancel := context.WithCancel(r.ctx)
	p := &readyzPoll{cancel: cancel, done: make(chan struct{})}
	r.t.Cleanup(p.stop)
	go func() {
		defer close(p.done)
		tick := time.NewTicker(every)
		defer tick.Stop()
		for {
			code, _ := r.readyz(ctx)
			if ctx.Err() != nil {
				return
			}
			p.mu.Lock()
			p.samples = append(p.samples, readySample{at: time.Now(), code: code})
			p.mu.Unlock()
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	return p
}

func (p *readyzPoll) stop() { p.cancel(); <-p.done }

type readyStats struct {
	samples, notReady  int // within the fault window
	readyAfterNotReady int // 200s within the window after the first non-200
	firstNotReady      time.Time
	longest            time.Duration // longest non-200 stretch from the window's start on
}

// stats looks at the samples from `from` on; counts are for [from, to).
func (p *readyzPoll) stats(from, to time.Time) readyStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	var s readyStats
	var runStart time.Time
	var last time.Time
	for _, x := range p.samples {
		if x.at.Before(from) {
			continue
		}
		last = x.at
		inWindow := x.at.Before(to)
		if x.code != http.StatusOK {
			if inWindow {
				s.notReady++
				if s.firstNotReady.IsZero() {
					s.firstNotReady = x.at
				}
			}
			if runStart.IsZero() {
				runStart = x.at
			}
		} else {
			if inWindow && !s.firstNotReady.IsZero() {
				s.readyAfterNotReady++
			}
			if !runStart.IsZero() {
				s.longest = max(s.longest, x.at.Sub(runStart))
				runStart = time.Time{}
			}
		}
		if inWindow {
			s.samples++
		}
	}
	if !runStart.IsZero() {
		s.longest = max(s.longest, last.Sub(runStart))
	}
	return s
}

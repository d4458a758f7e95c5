package e2e

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dlf-stop/worker/internal/consumer"
	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/testutil"
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
// answers 503 for 10 s, then recovers, while 1,000 commands wait. Then,
// on the same worker, DLF answers 401 APIG.0301 to everything for 10 s
// (revoked credentials, fixed by an operator) while 1,000 more wait: the
// circuit that closed after the outage opens again (at once, on a 401).
func TestDLFOutageAndRecovery(t *testing.T) {
	const commands = 1000
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Second)
	defer cancel()
	guard := newSecretsGuard(t, guardAKSK)
	emu, emuURL := emulator.StartForTest(t, emulator.WithRequestLogSize(100_000), guard.emulatorOption())
	rig := startDLFFaultRig(ctx, t, emu, emuURL, guard)
	rig.runFaultScenario("outage", "outage", commands, []dlffPhase{
		{name: "down", last: 20 * time.Second, faults: emulator.Faults{Down: true}},
		{name: "503", last: 10 * time.Second, faults: emulator.Faults{ErrorRate: 1, ErrorStatus: http.StatusServiceUnavailable}},
	})
	if t.Failed() {
		return
	}
	rig.runFaultScenario("unauthorized", "unauth", commands, []dlffPhase{
		{name: "401", last: 10 * time.Second, faults: emulator.Faults{AuthFail: true}},
	})
}

// dlffPhase is one stretch of emulator behaviour.
type dlffPhase struct {
	name   string
	last   time.Duration
	faults emulator.Faults
}

// runFaultScenario publishes commands as the first phase begins, runs
// the phases, clears the faults, waits for every outcome and reports.
func (r *dlffRig) runFaultScenario(phase, prefix string, commands int, phases []dlffPhase) {
	t := r.t
	ids, bodies := dlffCommands(r.emu, prefix, commands)
	// A scenario may follow another on the same worker: it counts only
	// what it adds.
	outcomes := watchOutcomesFrom(r.ctx, t, r.js, "DLF_STOP_OUTCOMES", commands, streamMsgs(r.ctx, t, r.js, "DLF_STOP_OUTCOMES"))
	dead := watchDeadFrom(r.ctx, t, r.js, "DLF_STOP_DEAD", streamMsgs(r.ctx, t, r.js, "DLF_STOP_DEAD"))
	callsBefore := r.emu.StopCalls()
	before, err := r.metrics()
	if err != nil {
		t.Fatalf("read worker metrics: %v", err)
	}
	ready := r.pollReadyz(100 * time.Millisecond)

	began, cleared, atClear := r.runFaults(phases, bodies)
	decidedDuringFaults := outcomes.distinct()
	done := r.awaitOutcomes(outcomes, commands, 40*time.Second)
	tl := r.tally(outcomes, dead, ids)

	var final int
	testutil.Eventually(t, 5*time.Second, func() error {
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
		if q.Status == http.StatusBadRequest && !q.Time.Before(began) {
			n400++
		}
	}
	after, _ := r.metrics()
	t.Logf("dlf_faults phase=%s commands=%d lost=%d dead_letters=%d stopped=%d calls_per_command=%.2f outage_calls=%g "+
		"drain_after_recovery=%s readyz_not_ready_for=%s outage_calls_received=%d worker_calls_per_command=%.2f "+
		"max_gap_between_received_calls=%s first_success_after_recovery=%s calls_to_stopped_instances=%d "+
		"decided_during_outage=%d readyz_ready_during_outage=%d faults=%s outage_calls_by_code=%s worker_calls=%s",
		phase, commands, tl.lost, tl.dead, tl.status[consumer.StatusStopped],
		float64(r.emu.StopCalls()-callsBefore)/float64(commands), atClear.total()-before.total(),
		done.Sub(cleared).Round(time.Millisecond), rs.longest.Round(100*time.Millisecond),
		faultCalls, (after.total()-before.total())/float64(commands),
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
	} else if late := rs.firstNotReady.Sub(began); late > 5*time.Second {
		t.Errorf("/readyz first answered 503 %s after the faults began; the circuit should open within seconds", late.Round(time.Millisecond))
	}
	if rs.unanswered > 0 {
		t.Errorf("/readyz gave no answer or neither 200 nor 503 %d times during the faults", rs.unanswered)
	}
	if rs.readyAfterNotReady > 0 {
		t.Errorf("/readyz answered 200 %d times during the faults after it had gone 503 at %s: the circuit closed while DLF still failed",
			rs.readyAfterNotReady, rs.firstNotReady.Format(time.StampMilli))
	}
	if final != http.StatusOK {
		t.Errorf("/readyz answers %d at the end", final)
	}
	r.guard.check(t, r.js, phase, [][]string{r.w.c.lines()})
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

package e2e

import (
	"context"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/consumer"
	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/testutil"
)

// dlffRig is one embedded JetStream, one emulator and one worker process.
type dlffRig struct {
	t        *testing.T
	ctx      context.Context
	js       jetstream.JetStream
	emu      *emulator.Emulator
	w        *reapable
	httpAddr string
	client   *http.Client
	guard    *secretsGuard
	pubs     *publishCount
}

// startDLFFaultRig starts JetStream, creates the streams and the consumer
// (short ack wait), starts the worker against emuURL with guard's secrets
// (the emulator must demand them) and waits until its /readyz says 200.
func startDLFFaultRig(ctx context.Context, t *testing.T, emu *emulator.Emulator, emuURL string, guard *secretsGuard) *dlffRig {
	t.Helper()
	srv := guard.server(t)
	_, js := guard.connect(t, srv)
	if _, err := consumer.Setup(ctx, js, consumer.Config{AckWait: dlffAckWait}, zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	r := &dlffRig{t: t, ctx: ctx, js: js, emu: emu,
		client: &http.Client{Timeout: 2 * time.Second}, guard: guard}
	t.Cleanup(r.client.CloseIdleConnections)
	r.pubs = countPublished(t, js.Conn(), "dlf.stop.outcome.*")
	r.w = spawnWorker(t, guard.workerEnv(map[string]string{
		"NATS_URL":                   srv.ClientURL(),
		"DLF_ENDPOINT":               emuURL,
		"HUAWEICLOUD_SDK_PROJECT_ID": dlffProject,
		"HTTP_ADDR":                  anyPort,
		"RETRY_INITIAL_INTERVAL":     "200ms",
		"RETRY_MAX_INTERVAL":         "2s",
	}))
	r.httpAddr = servingAddr(t, r.w.c, 20*time.Second)
	testutil.Eventually(t, 20*time.Second, func() error {
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
	republished            int // outcome publishes beyond one per command
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
	tl.unacked = waitDrained(r.ctx, t, r.js, "DLF_STOP", 15*time.Second)
	readWatchedToEnd(r.ctx, t, r.js, outcomes, dead)
	s := outcomes.snapshot()
	tl.status = s.status
	tl.duplicates = s.total - len(s.byID)
	tl.republished = r.pubs.republished()
	tl.lostIDs = s.missing(ids)
	tl.lost = len(tl.lostIDs)
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
	// NATS works throughout, so no stored-ack is lost and nothing excuses
	// a second publish, which the outcome stream would quietly drop.
	if tl.republished != 0 {
		t.Errorf("%d outcome publishes beyond one per command", tl.republished)
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
	r.t.Logf("worker log by message: %s", joinSorted(sum, " ", func(k string, n int) string { return fmt.Sprintf("%q=%d", k, n) }))
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

package e2e

import (
	"context"
	"math"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dlf-stop/worker/internal/consumer"
	"github.com/dlf-stop/worker/internal/dlf/emulator"
)

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
	guard := newSecretsGuard(t, guardTokenCreds)
	emu := emulator.New(emulator.WithRequestLogSize(100_000), guard.emulatorOption())
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

	rig := startDLFFaultRig(ctx, t, emu, srv.URL, guard)
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
	// 429. None may arrive inside: that is "every in-flight command slows
	// down, not just the one that got it". Requests while throttled are
	// grouped into bursts: runs with less than burstGap between neighbours.
	const (
		retrySlack = 250 * time.Millisecond
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
	if inside > 0 {
		t.Errorf("%d requests arrived inside the Retry-After of an earlier 429", inside)
	}
	if rateAfter >= rateBefore && rateBefore > 0 {
		t.Errorf("the worker did not slow down after a 429: %.1f/s before, %.1f/s after", rateBefore, rateAfter)
	}
	guard.check(t, rig.js, "throttling", [][]string{rig.w.c.lines()})
}

func dlffRate(r float64) string {
	if math.IsNaN(r) || math.IsInf(r, 0) {
		return "n/a"
	}
	return strconv.FormatFloat(r, 'f', 1, 64)
}

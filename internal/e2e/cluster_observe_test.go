package e2e

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

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

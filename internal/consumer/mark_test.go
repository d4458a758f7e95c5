package consumer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/dlf-stop/worker/internal/command"
	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/testutil"
)

// A delivery that dies while it waits for a rate token has sent nothing,
// so it must leave no "sent" mark: the DLF.6205 its redelivery gets for
// an instance DLF does not know is then a failure with a dead letter, not
// taken for the answer to a lost call (contract section 6).
func TestDeliveryDyingBeforeItsTokenLeavesNoMark(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.AckWait = 2 * time.Second })
	e.emu.AddRunning(proj, "", "s1", "a")
	r := e.startWorker(func(c *Config) { c.RateLimit, c.RateBurst = 0.05, 1 }) // a token every 20s
	e.publish(body(t, map[string]any{"command_id": "a", "project_id": proj, "script_name": "s1", "instance_id": "a"}), nil)
	e.out.wait(t, 1, 10*time.Second) // a spent the only token
	bBody := body(t, map[string]any{"command_id": "b", "project_id": proj, "script_name": "s1", "instance_id": "no-such"})
	seq := e.publish(bBody, nil)
	testutil.Eventually(t, 5*time.Second, func() error {
		if n := gaugeValue(r.w.m.held); n != 1 {
			return fmt.Errorf("the worker holds %v commands, want b", n)
		}
		return nil
	})
	// b waits for its token; long enough for a mark to be written first.
	testutil.Consistently(t, 500*time.Millisecond, func() error {
		if n := e.emu.StopCallsFor(proj, "s1", "no-such"); n != 0 {
			return fmt.Errorf("b was sent %d times without a token", n)
		}
		return nil
	})
	// The worker dies: its connection first, so nothing more reaches NATS.
	r.nc.Close()
	r.stop(t)

	e.startWorker(nil)
	e.out.wait(t, 2, 20*time.Second)
	o := byID(t, e.out.outcomes(t))["b"]
	if o.Status != StatusFailed || o.Cause != CauseDLFError || o.ErrorCode != "DLF.6205" || o.Attempts != 1 {
		t.Fatalf("b, sent once and answered DLF.6205 = %s/%s %s attempts=%d; want failed/dlf_error DLF.6205 attempts=1",
			o.Status, o.Cause, o.ErrorCode, o.Attempts)
	}
	e.checkDead(t, o, bBody, seq)
	if n := e.emu.StopCallsFor(proj, "s1", "no-such"); n != 1 {
		t.Errorf("DLF calls for b = %d, want 1", n)
	}
}

// A delivery marked before its call and then held back by a circuit that
// opened meanwhile takes its mark back: a worker that dies during the
// outage sent nothing for it, and the DLF.6205 its redelivery gets for an
// instance DLF does not know fails as usual. With and without a rate
// limit, as the mark goes before or after the wait for a slot.
func TestDeliveryHeldByTheCircuitTakesItsMarkBack(t *testing.T) {
	t.Parallel()
	for _, limited := range []bool{false, true} {
		t.Run(fmt.Sprintf("rate_limit=%v", limited), func(t *testing.T) {
			e := newEnv(t, func(c *Config) { c.AckWait = 2 * time.Second })
			e.emu.AddRunning(proj, "", "s1", "a")
			// a's call takes 1.5 s and is answered 401: the circuit opens then,
			// while b, marked, waits for the only slot.
			e.emu.SetFaultsFor(proj, "s1", "a", emulator.Faults{Latency: 1500 * time.Millisecond, ErrorRate: 1, ErrorStatus: 401})
			r := e.startWorker(func(c *Config) {
				c.Concurrency = 1
				c.RetryInitial, c.RetryMax = 4*time.Second, 4*time.Second // no probe meanwhile
				if limited {
					c.RateLimit, c.RateBurst = 1000, 10
				}
			})
			e.publish(body(t, map[string]any{"command_id": "a", "project_id": proj, "script_name": "s1", "instance_id": "a"}), nil)
			testutil.Eventually(t, 5*time.Second, func() error {
				if n := gaugeValue(r.w.m.inFlight); n != 1 {
					return fmt.Errorf("%v calls in flight, want a's", n)
				}
				return nil
			})
			bBody := body(t, map[string]any{"command_id": "b", "project_id": proj, "script_name": "s1", "instance_id": "no-such"})
			seq := e.publish(bBody, nil)
			r.waitCircuitOpen(t)
			testutil.Consistently(t, 500*time.Millisecond, func() error {
				if n := e.emu.StopCallsFor(proj, "s1", "no-such"); n != 0 {
					return fmt.Errorf("b was sent %d times with the circuit open", n)
				}
				if n := gaugeValue(r.w.m.held); n != 2 {
					return fmt.Errorf("the worker holds %v commands, want a and b", n)
				}
				return nil
			})
			r.nc.Close() // the worker dies
			r.stop(t)

			e.emu.SetFaultsFor(proj, "s1", "a", emulator.Faults{})
			e.startWorker(nil)
			e.out.wait(t, 2, 20*time.Second)
			o := byID(t, e.out.outcomes(t))["b"]
			if o.Status != StatusFailed || o.Cause != CauseDLFError || o.ErrorCode != "DLF.6205" {
				t.Fatalf("b, sent once and answered DLF.6205 = %s/%s %s; want failed/dlf_error DLF.6205", o.Status, o.Cause, o.ErrorCode)
			}
			e.checkDead(t, o, bBody, seq)
		})
	}
}

// A "sent" mark the bucket refuses, although the server read it, holds the
// call back: the command waits, returned with a growing delay, and is
// called once the bucket takes marks again, even after RETRY_MAX_ELAPSED:
// it is owed its call, and a decision the bucket could not record would be
// made again by every delivery. (A mark confirmed by a flush let the call
// go out unmarked.)
func TestMarkTheBucketRefusesHoldsTheCall(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) {
		c.RetryInitial, c.RetryMax, c.RetryMaxElapsed = 100*time.Millisecond, 400*time.Millisecond, time.Second
	})
	e.emu.AddRunning(proj, "", "s1", "a")
	st := e.state(t)
	r := e.startWorker(nil)
	r.waitStarted(t)
	// Marks are larger than this; reads are not writes and still work. (At
	// start the worker refuses a bucket limited like this.)
	e.updateStream(t, "KV_dlf_stop_state", func(c *jetstream.StreamConfig) { c.MaxMsgSize = 16 })
	e.publish(body(t, map[string]any{"command_id": "a", "project_id": proj, "script_name": "s1", "instance_id": "a"}), nil)
	published := time.Now()
	returned := func() float64 { return testutilCount(r.w.m.returned.WithLabelValues("state_unavailable")) }
	testutil.Eventually(t, 10*time.Second, func() error {
		if n := returned(); n < 3 || time.Since(published) < 2*time.Second {
			return fmt.Errorf("a returned %v times for its mark, want 3 and RETRY_MAX_ELAPSED well past", n)
		}
		return nil
	})
	if n := e.emu.StopCallsFor(proj, "s1", "a"); n != 0 {
		t.Fatalf("a was called %d times without a stored mark", n)
	}
	if n := e.out.len(); n != 0 {
		t.Fatalf("%d outcomes while the bucket refused a's mark; want a to wait for its call", n)
	}
	if ok, why := r.w.Readiness(); ok || !strings.Contains(why, "marks") {
		t.Errorf("readiness = %v %q while the bucket refuses marks; want not ready, saying why", ok, why)
	}
	if n := returned(); n > 12 { // 100 ms doubling to 400 ms: about 7 in 2 s
		t.Errorf("a was returned %v times in about 2 s: the returns are not spaced out", n)
	}
	if _, err := st.kv.Get(context.Background(), cmdKey("a")); err == nil {
		t.Fatal("a's mark is stored: the bucket did not refuse it, and the test proves nothing")
	}
	e.updateStream(t, "KV_dlf_stop_state", func(c *jetstream.StreamConfig) { c.MaxMsgSize = -1 })
	e.out.wait(t, 1, 10*time.Second)
	o := byID(t, e.out.outcomes(t))["a"]
	if o.Status != StatusStopped || o.Cause != CauseOK || o.Attempts != 1 {
		t.Fatalf("a = %s/%s attempts=%d; want stopped/ok attempts=1", o.Status, o.Cause, o.Attempts)
	}
	if n := e.emu.StopCallsFor(proj, "s1", "a"); n != 1 {
		t.Errorf("DLF calls for a = %d, want 1", n)
	}
	if ok, why := r.w.Readiness(); !ok {
		t.Errorf("not ready (%s) once the bucket stored a mark again", why)
	}
}

// A mark replaces only what its delivery read. A redelivery whose read was
// answered by a replica behind an earlier delivery's mark (after a
// restart, a follower answers direct gets once 90% synchronised) must not
// overwrite that mark: it is the only evidence that a call may have
// stopped the instance, and without it the redelivery's DLF.6205 was
// dead-lettered (once in the cluster test). The write fails as a
// compare-and-set refusal instead, and the earlier mark stands; at the
// revision read afresh it goes through. Both ways of writing: through the
// worker's writer and without one.
func TestMarkDoesNotOverwriteAMarkItDidNotRead(t *testing.T) {
	t.Parallel()
	for _, withWriter := range []bool{true, false} {
		t.Run(fmt.Sprintf("writer=%v", withWriter), func(t *testing.T) {
			e := newEnv(t, nil)
			st := e.state(t)
			if withWriter {
				st, _ = e.stateWithWriter(t)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			inst := command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-1"}.InstanceKey()
			if err := st.markSent(ctx, "c", 1, 5, inst); err != nil { // the earlier delivery's
				t.Fatal(err)
			}
			_, err := st.markSentAt(ctx, "c", 2, 5, inst, 0) // as read from a replica without it
			if !errors.Is(err, errWrongRevision) {
				t.Fatalf("mark over a key it did not read: err = %v, want a compare-and-set refusal", err)
			}
			rec, err := st.load(ctx, cmdKey("c"))
			if err != nil {
				t.Fatal(err)
			}
			if m := rec.doc.Cmds["c"]; m == nil || m.Delivery != 1 {
				t.Fatalf("the earlier mark was overwritten: %+v", rec.doc)
			}
			rev, err := st.markSentAt(ctx, "c", 2, 5, inst, rec.rev)
			if err != nil || rev <= rec.rev {
				t.Fatalf("mark at the revision read: rev %d, err %v", rev, err)
			}
		})
	}
}

// Deliveries of one command overlap when one loses its lease (its
// heartbeats lost with a connection or a leader) and JetStream hands the
// command on. Then a later delivery may read the id's key before an
// earlier one, still alive, marks its call, and record its own progress
// after that mark: delivery numbers do not order marks and progress. What
// orders them is the revision of the id's key the progress entry
// accounted for. Here delivery 8 recorded progress having seen no mark,
// and delivery 7's mark, newer, is of a call nobody heard answered: the
// DLF.6205 that follows is that call's stop, whether the mark was there
// at the lookup or came during the call. (A cluster test run dead-lettered
// three commands so: their first delivery's call had stopped the
// instance.) A mark the entry did account for, its delivery's answer
// recorded, explains nothing.
func TestMarkNewerThanTheProgressOfALaterDelivery(t *testing.T) {
	t.Parallel()
	inst := command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-1"}.InstanceKey()
	zero := uint64(0)
	seenNone := cmdEntry{Phase: phaseAnswered, Delivery: 8, MarkRev: &zero}
	for _, tc := range []struct {
		name      string
		before    stateStep // before the delivery
		during    stateStep // while its call is on the wire
		explained bool
	}{
		{"newer mark at the lookup", func(ctx context.Context, st *stateStore, seq uint64) error {
			if err := st.putEntry(ctx, instKey(inst), "both", seenNone); err != nil {
				return err
			}
			return st.markSent(ctx, "both", 7, seq, inst)
		}, nil, true},
		{"newer mark during the call", func(ctx context.Context, st *stateStore, seq uint64) error {
			return st.putEntry(ctx, instKey(inst), "both", seenNone)
		}, func(ctx context.Context, st *stateStore, seq uint64) error {
			return st.markSent(ctx, "both", 7, seq, inst)
		}, true},
		{"mark accounted for at the lookup", func(ctx context.Context, st *stateStore, seq uint64) error {
			if err := st.markSent(ctx, "both", 7, seq, inst); err != nil {
				return err
			}
			rec, err := st.load(ctx, cmdKey("both"))
			if err != nil {
				return err
			}
			return st.putEntry(ctx, instKey(inst), "both", cmdEntry{Phase: phaseAnswered, Attempts: 1, Delivery: 8, MarkRev: &rec.rev})
		}, nil, false},
		{"own mark of the entry's delivery, its answer lost", func(ctx context.Context, st *stateStore, seq uint64) error {
			// Delivery 7 read no mark; its own was stored but it was told
			// otherwise, so it sent no call and went back.
			if err := st.putEntry(ctx, instKey(inst), "both", cmdEntry{Phase: phaseAnswered, Delivery: 7, MarkRev: &zero}); err != nil {
				return err
			}
			return st.markSent(ctx, "both", 7, seq, inst)
		}, nil, false},
		{"mark accounted for, then progress of an overlapping delivery that saw less", func(ctx context.Context, st *stateStore, seq uint64) error {
			// Delivery 7 marked, was answered (500) and recorded so;
			// delivery 8, which read the key before that mark and had
			// its own refused, records its progress after.
			if err := st.markSent(ctx, "both", 7, seq, inst); err != nil {
				return err
			}
			rec, err := st.load(ctx, cmdKey("both"))
			if err != nil {
				return err
			}
			if err := st.putEntry(ctx, instKey(inst), "both", cmdEntry{Phase: phaseAnswered, Attempts: 1, Delivery: 7, MarkRev: &rec.rev, LastHTTPStatus: 500}); err != nil {
				return err
			}
			doc, err := st.load(ctx, instKey(inst))
			if err != nil {
				return err
			}
			return st.save(ctx, doc, func(d *stateDoc) {
				d.setProgress("both", cmdEntry{Phase: phaseAnswered, Delivery: 8, MarkRev: &zero}, time.Hour)
			})
		}, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, calls, b, seq := run6205(t, tc.before, tc.during)
			if tc.explained {
				e.explained6205(t, calls, 2) // delivery 7's call and this one
				return
			}
			o := e.single(t)
			if o.Status != StatusFailed || o.Cause != CauseDLFError {
				t.Fatalf("outcome = %+v; want failed/dlf_error", o)
			}
			oneCall(t, calls)
			e.checkDead(t, o, b, seq)
		})
	}
}

// A delivery held back by a 429 pause after marking takes its mark back
// while it waits. Whether a take-back that failed was stored is not known
// (its answer may be lost after JetStream stored it), so the delivery
// marks again before it calls: a call sent on the mark the take-back may
// have replaced would leave only a "held" mark behind, and should the
// delivery then die, its redelivery would take the call's DLF.6205 for a
// failure. Here the bucket refuses the take-back (it is a few bytes
// larger than the mark) and the call goes out on a new mark.
func TestTakeBackThatFailedIsMarkedAgain(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	st := e.state(t)
	// a's first call is answered 429 once the test lets it go, pausing
	// every call for a second; then a is stopped. b's instance does not
	// exist.
	release := make(chan struct{})
	var aCalls, bCalls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if strings.Contains(r.URL.Path, "/instances/no-such/") {
			bCalls.Add(1)
			w.WriteHeader(http.StatusBadRequest)
			_, _ = w.Write([]byte(`{"error_code":"DLF.6205","error_msg":"The script instance is not running."}`))
			return
		}
		if aCalls.Add(1) > 1 {
			w.WriteHeader(http.StatusNoContent)
			return
		}
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		w.Header().Set("Retry-After", "1")
		w.WriteHeader(http.StatusTooManyRequests)
		_, _ = w.Write([]byte(`{"error_code":"APIG.0308","error_msg":"The throttling threshold has been reached."}`))
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() {
		select {
		case <-release:
		default:
			close(release)
		}
	})
	r := e.startWorkerAt(srv.URL, func(c *Config) { c.Concurrency = 1 })
	e.publish(body(t, map[string]any{"command_id": "a", "project_id": proj, "script_name": "s1", "instance_id": "a"}), nil)
	testutil.Eventually(t, 5*time.Second, func() error {
		if n := aCalls.Load(); n != 1 {
			return fmt.Errorf("%d calls for a, want its first on the wire", n)
		}
		return nil
	})
	// b marks its call, then waits for the only slot.
	e.publish(body(t, map[string]any{"command_id": "b", "project_id": proj, "script_name": "s1", "instance_id": "no-such"}), nil)
	var first *stateRecord
	testutil.Eventually(t, 5*time.Second, func() error {
		rec, err := st.load(context.Background(), cmdKey("b"))
		if err != nil || rec.rev == 0 {
			return fmt.Errorf("b's mark is not stored yet (%v)", err)
		}
		first = rec
		return nil
	})
	raw, err := json.Marshal(&first.doc)
	if err != nil {
		t.Fatal(err)
	}
	// Room for the mark and its compare-and-set header (52 bytes and a
	// few more digits), not for the take-back's `,"h":true`.
	e.updateStream(t, "KV_dlf_stop_state", func(c *jetstream.StreamConfig) { c.MaxMsgSize = int32(len(raw) + 52 + 4) })
	close(release)
	e.out.wait(t, 2, 20*time.Second)
	if n := testutilCount(r.w.m.throttled); n != 1 {
		t.Fatalf("%v calls answered 429, want a's first", n)
	}
	if o := byID(t, e.out.outcomes(t))["b"]; o.Status != StatusFailed || o.ErrorCode != "DLF.6205" {
		t.Fatalf("b = %s/%s %s; want failed, DLF.6205 (its own call, answered)", o.Status, o.Cause, o.ErrorCode)
	}
	last, err := st.load(context.Background(), cmdKey("b"))
	if err != nil {
		t.Fatal(err)
	}
	m := last.doc.Cmds["b"]
	if last.rev <= first.rev || m == nil || m.Phase != phaseSent || m.Held {
		t.Errorf("b's key at revision %d (first mark %d): %+v; want a new mark, not held, written after the take-back failed", last.rev, first.rev, m)
	}
	if n := bCalls.Load(); n != 1 {
		t.Errorf("DLF calls for b = %d, want 1", n)
	}
}

// fetchedByADyingWorker fetches the command at seq as a worker that then
// dies (it never acks) would.
func (e *env) fetchedByADyingWorker(t *testing.T, seq uint64) {
	t.Helper()
	if md, err := e.fetchN(t, 1)[0].Metadata(); err != nil || md.Sequence.Stream != seq {
		t.Fatalf("the dying worker got %v (%v), want stream sequence %d", md, err, seq)
	}
}

// fetchN takes n commands from the worker's consumer, as a worker that
// then holds them (or dies) would, and returns them unacked.
func (e *env) fetchN(t *testing.T, n int) []jetstream.Msg {
	t.Helper()
	cons, err := e.js.Consumer(context.Background(), "DLF_STOP", "dlf-stop-worker")
	if err != nil {
		t.Fatal(err)
	}
	batch, err := cons.Fetch(n, jetstream.FetchMaxWait(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	var out []jetstream.Msg
	for m := range batch.Messages() {
		out = append(out, m)
	}
	if len(out) != n {
		t.Fatalf("fetched %d commands, want %d", len(out), n)
	}
	return out
}

// keepHeld heartbeats m until the test ends, as a live worker holding it
// (in its backoff, say) would.
func keepHeld(t *testing.T, m jetstream.Msg) {
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(300 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				_ = m.InProgress()
			}
		}
	}()
	t.Cleanup(func() { close(stop); <-done })
}

// Two messages of one command (the same id and instance, published
// twice), X then Y. Y's delivery 1 marked, called (503) and handed back
// its progress; X's delivery 1 then marked over it, its call stopped the
// instance, and it died. X's delivery 2 gets DLF.6205: that is X's call's
// stop. Found by review: Y's entry (delivery 1) was taken for the entry
// of X's mark's delivery (delivery 1 too), which accounted for it, and the
// DLF.6205 was dead-lettered. Y's entry written by its delivery 2 never
// collided, and is the control.
func TestAnotherMessagesEntryDoesNotHideThisMessagesCall(t *testing.T) {
	t.Parallel()
	for _, yDelivery := range []uint64{1, 2} {
		t.Run(fmt.Sprintf("y_delivery=%d", yDelivery), func(t *testing.T) {
			e := newEnv(t, func(c *Config) { c.AckWait = 2 * time.Second })
			st := e.state(t)
			ctx := context.Background()
			b := body(t, map[string]any{"command_id": "dup", "project_id": proj, "script_name": "s1", "instance_id": "i-1"})
			seqX, seqY := e.publish(b, nil), e.publish(b, nil)
			for _, m := range e.fetchN(t, 2) {
				if md, _ := m.Metadata(); md.Sequence.Stream == seqY {
					keepHeld(t, m) // Y's worker lives on
				}
			}
			inst := command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-1"}.InstanceKey()
			r1, err := st.kv.Create(ctx, cmdKey("dup"), sentMarkDoc("dup", 1, seqY, inst))
			if err != nil {
				t.Fatal(err)
			}
			if err := st.putEntry(ctx, instKey(inst), "dup", cmdEntry{Phase: phaseAnswered, Attempts: 1, Delivery: yDelivery, Seq: seqY,
				LastHTTPStatus: 503, MarkRev: &r1, At: time.Now().Unix()}); err != nil {
				t.Fatal(err)
			}
			if _, err := st.kv.Update(ctx, cmdKey("dup"), sentMarkDoc("dup", 1, seqX, inst), r1); err != nil {
				t.Fatal(err)
			}
			e.startWorker(nil) // X's delivery 2, after the ack wait; i-1 is unknown to DLF: stopped
			if o := e.single(t); o.Status != StatusStopped || o.Cause != CauseAlreadyStopped {
				t.Errorf("outcome %s/%s %s attempts=%d; want stopped/already_stopped for X's unanswered call",
					o.Status, o.Cause, o.ErrorCode, o.Attempts)
			}
			e.noDeadLetters(t)
		})
	}
}

// Another message's mark, stored although its delivery never heard so
// (the stored-ack lost), and that delivery's own entry, which says it sent
// no call: the mark explains no DLF.6205, and this message's fails as any
// DLF.6205 with no call of ours before it (found by review: it counted,
// and the outcome said already_stopped).
func TestAnotherMessagesOwnEntryAccountsForItsMark(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.AckWait = 2 * time.Second })
	st := e.state(t)
	ctx := context.Background()
	b := body(t, map[string]any{"command_id": "lost", "project_id": proj, "script_name": "s1", "instance_id": "i-9"})
	seqY := e.publish(b, nil)
	e.publish(b, nil) // X
	y := e.fetchN(t, 1)[0]
	if md, _ := y.Metadata(); md.Sequence.Stream != seqY {
		t.Fatal("fetched the wrong message")
	}
	inst := command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-9"}.InstanceKey()
	if _, err := st.kv.Create(ctx, cmdKey("lost"), sentMarkDoc("lost", 1, seqY, inst)); err != nil {
		t.Fatal(err)
	}
	zero := uint64(0) // the key as Y's delivery last knew it: absent
	if err := st.putEntry(ctx, instKey(inst), "lost", cmdEntry{Phase: phaseAnswered, Delivery: 1, Seq: seqY, MarkRev: &zero,
		At: time.Now().Unix()}); err != nil {
		t.Fatal(err)
	}
	if err := y.NakWithDelay(time.Minute); err != nil { // Y goes back for later
		t.Fatal(err)
	}
	e.startWorker(nil) // X's delivery 1
	if o := e.single(t); o.Status != StatusFailed || o.Cause != CauseDLFError {
		t.Errorf("outcome %s/%s %s attempts=%d; want failed/dlf_error: no call of ours reached DLF before X's",
			o.Status, o.Cause, o.ErrorCode, o.Attempts)
	}
}

// deliveredAndDied is fetchedByADyingWorker after that worker stored the
// "sent" mark of its call to inst: the call went out and its answer was
// lost with the worker.
func (e *env) deliveredAndDied(t *testing.T, st *stateStore, id string, seq uint64, inst command.Command) {
	t.Helper()
	e.fetchedByADyingWorker(t, seq)
	if _, err := st.kv.Create(context.Background(), cmdKey(id), sentMarkDoc(id, 1, seq, inst.InstanceKey())); err != nil {
		t.Fatal(err)
	}
}

// Delivery 1 called and died. Delivery 2 knows it (the mark), marks its
// own call and is then held back by a 429 pause before it calls. It must
// not take its mark back: the mark is all that is left of delivery 1's
// call, and when delivery 2 dies too, delivery 3's DLF.6205 is the answer
// to that call (contract section 6), not a failure to dead-letter.
func TestHeldDeliveryKeepsTheMarkOfAnEarlierUnansweredCall(t *testing.T) {
	t.Parallel()
	// Delivery 2 comes after the ack wait, 3 s after delivery 1: by then
	// the worker has started and "slow" holds the only slot, for 5 s.
	e := newEnv(t, func(c *Config) { c.AckWait, c.CallTimeout = 3*time.Second, 10*time.Second })
	st := e.state(t)
	e.emu.AddRunning(proj, "", "s1", "i-slow")
	e.emu.SetFaultsFor(proj, "s1", "i-slow", emulator.Faults{Latency: 5 * time.Second})
	// i-1 is not running: delivery 1's call stopped it.
	seq := e.publish(body(t, map[string]any{"command_id": "r", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	e.deliveredAndDied(t, st, "r", seq, command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-1"})
	// "slow" holds the only call slot while delivery 2 of r waits for it.
	e.publish(body(t, map[string]any{"command_id": "slow", "project_id": proj, "script_name": "s1", "instance_id": "i-slow"}), nil)
	r1 := e.startWorker(func(c *Config) { c.Concurrency = 1 })
	testutil.Eventually(t, 10*time.Second, func() error {
		rec, err := st.load(context.Background(), cmdKey("r"))
		if m := rec.doc.Cmds["r"]; err != nil || m == nil || m.Delivery != 2 {
			return fmt.Errorf("delivery 2 of r has not marked yet: %+v (%v)", m, err)
		}
		return nil
	})
	r1.w.thr.throttled(10 * time.Second) // a 429 pause begins while delivery 2 waits for the slot
	// The slot is given back before slow's outcome is stored: by then
	// delivery 2 has the slot, has met the pause and given it back.
	e.out.wait(t, 1, 10*time.Second)
	if n := e.emu.StopCallsFor(proj, "s1", "i-1"); n != 0 {
		t.Fatalf("delivery 2 called during the pause (%d calls)", n)
	}
	rec, err := st.load(context.Background(), cmdKey("r"))
	if m := rec.doc.Cmds["r"]; err != nil || m == nil || m.Held {
		t.Errorf("r's mark after delivery 2 was held back: %+v (%v); want it kept, not held", m, err)
	}
	r1.nc.Close() // delivery 2 dies in the pause
	r1.stop(t)

	e.startWorker(nil)
	e.out.wait(t, 2, 20*time.Second)
	o := byID(t, e.out.outcomes(t))["r"]
	if o.Status != StatusStopped || o.Cause != CauseAlreadyStopped || o.ErrorCode != "DLF.6205" {
		t.Errorf("r = %s/%s %s; want stopped/already_stopped: delivery 1's call stopped it", o.Status, o.Cause, o.ErrorCode)
	}
	e.noDeadLetters(t)
}

// The same command (its id, its instance) published again while the first
// message's delivery had sent its call and died: the second message's
// DLF.6205 is the answer to that call (contract section 6: an earlier
// attempt for the same command), not a failure, and the first message's
// redelivery is then acked without an outcome of its own.
func TestSameCommandPublishedAgainCountsTheFirstMessagesCall(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.AckWait = 4 * time.Second })
	st := e.state(t)
	b := body(t, map[string]any{"command_id": "again", "project_id": proj, "script_name": "s1", "instance_id": "i-1"})
	seq := e.publish(b, nil)
	e.deliveredAndDied(t, st, "again", seq, command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-1"})
	// Published again by its scheduler, past the duplicate window: a
	// message of its own (here the stream sees no Nats-Msg-Id, so the
	// test need not wait out the window).
	e.publish(b, nil)
	e.startWorker(nil)
	e.stopStreamEmpty(t) // both messages acked: every outcome is stored
	o := e.single(t)
	if o.Status != StatusStopped || o.Cause != CauseAlreadyStopped || o.ErrorCode != "DLF.6205" {
		t.Errorf("outcome = %s/%s %s; want stopped/already_stopped: the first message's call stopped the instance", o.Status, o.Cause, o.ErrorCode)
	}
	e.noDeadLetters(t)
}

// outcomesStored is how many outcome events the outcome stream holds.
func (e *env) outcomesStored(t *testing.T) uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := e.js.Stream(ctx, "DLF_STOP_OUTCOMES")
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Msgs
}

// Id "A" names i-1 in a first message, whose call is slow, and i-2 in a
// second one, which stops i-2 meanwhile and stores A's outcome. When the
// first message's call ends, past the outcome stream's duplicate window
// (1 s here, 2 minutes by default), A is decided: it must be acked without
// a second outcome event, the second message's mark leading to where A's
// decision is.
func TestHeldDeliveryFindsItsIdDecidedForAnotherInstance(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.AckWait, c.CallTimeout = 2*time.Second, 10*time.Second })
	e.updateStream(t, "DLF_STOP_OUTCOMES", func(c *jetstream.StreamConfig) { c.Duplicates = time.Second })
	e.emu.AddRunning(proj, "", "s1", "i-1")
	e.emu.AddRunning(proj, "", "s1", "i-2")
	e.emu.SetFaultsFor(proj, "s1", "i-1", emulator.Faults{Latency: 4 * time.Second})
	e.startWorker(nil)
	e.publish(body(t, map[string]any{"command_id": "A", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	testutil.Eventually(t, 10*time.Second, func() error {
		if e.emu.StopCallsFor(proj, "s1", "i-1") == 0 {
			return errors.New("the first message has not called yet")
		}
		return nil
	})
	e.publish(body(t, map[string]any{"command_id": "A", "project_id": proj, "script_name": "s1", "instance_id": "i-2"}), nil)
	e.stopStreamEmpty(t) // both acked: every outcome they published is stored
	if n := e.outcomesStored(t); n != 1 {
		t.Errorf("%d outcome events for id A, want 1", n)
	}
	if o := e.single(t); o.InstanceID != "i-2" || o.Status != StatusStopped {
		t.Errorf("A's outcome: %s %s/%s; want i-2's, stopped", o.InstanceID, o.Status, o.Cause)
	}
	// The first message's call stopped i-1, and the state says so: a
	// later command for i-1 is already_stopped, without a call.
	e.publish(body(t, map[string]any{"command_id": "B", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	e.out.wait(t, 2, 10*time.Second)
	if o := byID(t, e.out.outcomes(t))["B"]; o.Status != StatusStopped || o.Cause != CauseAlreadyStopped {
		t.Errorf("B for i-1 = %s/%s %s; want stopped/already_stopped: A's first message stopped i-1", o.Status, o.Cause, o.ErrorCode)
	}
	if n := e.emu.StopCallsFor(proj, "s1", "i-1"); n != 1 {
		t.Errorf("DLF calls for i-1 = %d, want A's only", n)
	}
}

// A refused mark makes the worker unready while commands wait for theirs.
// Once none is waiting (here the only one expired) and the bucket is well
// again, the worker is ready again: an idle worker has no mark to store
// that would say so, and stayed unready for good.
func TestRefusedMarkDoesNotKeepAnIdleWorkerUnready(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.RetryInitial, c.RetryMax = 100*time.Millisecond, 400*time.Millisecond })
	e.emu.AddRunning(proj, "", "s1", "a")
	r := e.startWorker(nil)
	r.waitStarted(t)
	e.updateStream(t, "KV_dlf_stop_state", func(c *jetstream.StreamConfig) { c.MaxMsgSize = 16 })
	deadline := time.Now().Add(1500 * time.Millisecond).UTC().Format(time.RFC3339Nano)
	e.publish(body(t, map[string]any{"command_id": "a", "project_id": proj, "script_name": "s1", "instance_id": "a", "deadline": deadline}), nil)
	testutil.Eventually(t, 5*time.Second, func() error {
		if ok, why := r.w.Readiness(); ok || !strings.Contains(why, "marks") {
			return fmt.Errorf("readiness = %v %q; want not ready for the refused marks", ok, why)
		}
		return nil
	})
	if o := e.single(t); o.Status != StatusExpired {
		t.Fatalf("a = %s/%s; want expired, its deadline passed while its mark was refused", o.Status, o.Cause)
	}
	e.updateStream(t, "KV_dlf_stop_state", func(c *jetstream.StreamConfig) { c.MaxMsgSize = -1 })
	e.stopStreamEmpty(t)
	testutil.Eventually(t, 15*time.Second, func() error {
		if ok, why := r.w.Readiness(); !ok {
			return fmt.Errorf("not ready (%s), with no command waiting and the bucket well", why)
		}
		return nil
	})
}

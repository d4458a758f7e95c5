package consumer

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/dlf-stop/worker/internal/command"
	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/testutil"
)

// The same command id published again after the stream's duplicate
// window (here: with another Nats-Msg-Id, which the stream does not
// deduplicate) is acked without a call and without a second outcome.
func TestDecidedCommandIsNotRepeated(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "", "s1", "i-1")
	r := e.startWorker(nil)
	b := body(t, map[string]any{"command_id": "once", "project_id": proj, "script_name": "s1", "instance_id": "i-1"})
	e.publish(b, nats.Header{nats.MsgIdHdr: []string{"m-1"}})
	e.out.wait(t, 1, 10*time.Second)
	// Acked only once its decision is recorded: the repeat must find the
	// record, not race the write that follows the outcome (CI once saw it
	// lose: the repeat called DLF, got DLF.6205 and was then acked).
	e.stopStreamEmpty(t)
	e.publish(b, nats.Header{nats.MsgIdHdr: []string{"m-2"}})
	e.repeatSkipped(t, r)
	if got := testutilCount(r.w.m.reusedIDs); got != 0 {
		t.Errorf("reused ids counted %v for a plain repeat, want 0", got)
	}
}

// The same command id published again, late, for another instance is
// still the same command (contract section 6): acked without a call and
// without a second outcome. The id index recognises it.
func TestDecidedIDReusedForAnotherInstance(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "", "s1", "i-1")
	e.emu.AddRunning(proj, "", "s1", "i-2")
	r := e.startWorker(nil)
	e.publish(body(t, map[string]any{"command_id": "reused", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}),
		nats.Header{nats.MsgIdHdr: []string{"m-1"}})
	e.out.wait(t, 1, 10*time.Second)
	st := e.state(t)
	first := e.stopRecorded(t, st, "reused", "i-1")
	// The id's index is the mark of its call, pointing to that document.
	if rec, err := st.load(context.Background(), cmdKey("reused")); err != nil {
		t.Fatal(err)
	} else if en := rec.doc.Cmds["reused"]; en == nil || en.Phase != phaseSent || en.Inst != first {
		t.Fatalf("id index: %+v", en)
	}
	e.publish(body(t, map[string]any{"command_id": "reused", "project_id": proj, "script_name": "s1", "instance_id": "i-2"}),
		nats.Header{nats.MsgIdHdr: []string{"m-2"}})
	e.repeatSkipped(t, r)
	if got := testutilCount(r.w.m.reusedIDs); got != 1 {
		t.Errorf("reused ids counted %v, want 1", got)
	}
	if e.emu.Stopped(proj, "s1", "i-2") {
		t.Error("the reused id stopped its instance")
	}
}

// The same id published again with a body that is not a valid command,
// after its call stopped an instance: the id's key holds only the mark of
// that call, which names the instance document holding the decision. The
// repeat is acked without an outcome or a dead letter (contract section 6:
// a decided id, "however late"; found by review).
func TestDecidedIDPublishedAgainAsAnInvalidCommand(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		body []byte
		hdr  nats.Header
	}{
		{"no instance", []byte(`{"command_id":"once","project_id":"` + proj + `","script_name":"s1"}`), nats.Header{nats.MsgIdHdr: []string{"m-2"}}},
		{"not JSON", []byte("not a command"), nats.Header{nats.MsgIdHdr: []string{"once"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, nil)
			e.emu.AddRunning(proj, "", "s1", "i-1")
			r := e.startWorker(nil)
			e.publish(body(t, map[string]any{"command_id": "once", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}),
				nats.Header{nats.MsgIdHdr: []string{"m-1"}})
			e.out.wait(t, 1, 10*time.Second)
			e.stopRecorded(t, e.state(t), "once", "i-1")
			e.publish(tc.body, tc.hdr)
			e.repeatSkipped(t, r)
			if got := testutilCount(r.w.m.reusedIDs); got != 1 {
				t.Errorf("reused ids counted %v, want 1", got)
			}
		})
	}
}

// The same message, decided by a worker whose defaults made it valid and
// redelivered to one for which it is invalid (no default project): acked
// without an outcome, and not counted as a reused id, which it is not
// (found by review). The first worker's mark and decision are written here.
func TestSameMessageDecidedWhereItWasValid(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	seq := e.publish([]byte(`{"script_name":"s1","instance_id":"i-1"}`), nats.Header{nats.MsgIdHdr: []string{"same"}})
	st := e.state(t)
	ctx := context.Background()
	inst := command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-1"}.InstanceKey()
	if _, err := st.markSentAt(ctx, "same", 1, seq, inst, 0); err != nil {
		t.Fatal(err)
	}
	if err := st.putEntry(ctx, instKey(inst), "same", cmdEntry{Phase: phaseDecided, Attempts: 1, Status: StatusStopped, Cause: CauseOK, At: time.Now().Unix()}); err != nil {
		t.Fatal(err)
	}
	r := e.startWorker(func(c *Config) { c.Defaults = command.Defaults{} })
	e.ackedSilently(t, r)
	if got := testutilCount(r.w.m.reusedIDs); got != 0 {
		t.Errorf("reused ids counted %v for a redelivery of the message that was decided; want 0", got)
	}
	e.noDeadLetters(t)
}

// stopRecorded waits until the state bucket records that command id
// stopped instance (of script s1 in proj), and returns its instance key.
func (e *env) stopRecorded(t *testing.T, st *stateStore, id, instance string) string {
	t.Helper()
	inst := command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: instance}.InstanceKey()
	testutil.Eventually(t, 5*time.Second, func() error {
		rec, err := st.load(context.Background(), instKey(inst))
		if err != nil {
			return err
		}
		if rec.doc.StoppedBy != id {
			return fmt.Errorf("decision not recorded yet: %+v", rec.doc)
		}
		return nil
	})
	return inst
}

// An instance's document keeps at most maxCmdEntries commands. A decided
// command dropped for room was indexed only by the mark of its call, which
// points to that document: it is indexed as decided when dropped, so its
// id published again for another instance is still recognised.
func TestIDDroppedForRoomIsStillDecided(t *testing.T) {
	t.Parallel()
	// One call at a time: 260 decisions for one document at once would
	// mostly collide in compare-and-set.
	e := newEnv(t, func(c *Config) { c.Concurrency = 1 })
	e.emu.AddRunning(proj, "", "s1", "i-2")
	r := e.startWorker(nil)
	n := maxCmdEntries + 4
	for i := 0; i < n; i++ { // i-404 does not exist: each call gets DLF.6205, each command fails
		e.publish(body(t, map[string]any{"command_id": "c-" + strconv.Itoa(i), "project_id": proj,
			"script_name": "s1", "instance_id": "i-404"}), nil)
	}
	e.out.wait(t, n, 30*time.Second) // 260 calls one at a time: seconds under -race
	e.stopStreamEmpty(t)
	// Which ones went: entries written in the same second are equally old.
	rec, err := e.state(t).load(context.Background(),
		instKey(command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-404"}.InstanceKey()))
	if err != nil {
		t.Fatal(err)
	}
	dropped := ""
	for i := 0; i < n && dropped == ""; i++ {
		if id := "c-" + strconv.Itoa(i); rec.doc.Cmds[id] == nil {
			dropped = id
		}
	}
	if dropped == "" || len(rec.doc.Cmds) != maxCmdEntries {
		t.Fatalf("document holds %d entries, none dropped", len(rec.doc.Cmds))
	}
	e.reusedForI2IsSkipped(t, r, dropped)
}

// The decision write that drops an entry for room fails and is retried
// (recordDecisionLater): the retry applies the change to a document already
// pruned, which drops nothing more, and the entry dropped the first time
// must still be indexed.
func TestIDDroppedForRoomIsIndexedWhenTheRecordIsRetried(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	key404 := e.fullDocument(t)
	r := e.startWorker(nil)
	e.decideWhileTheBucketRefuses(t, r)
	e.stopStreamEmpty(t)
	e.old0StaysDecided(t, r, key404)
}

// The decision write that drops old-0 for room fails, and the worker stops
// while it waits to write it again: the document goes back with the pending
// outcome (already pruned), and old-0 must still be indexed as decided.
func TestIDDroppedForRoomIsIndexedWhenTheWorkerStops(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	key404 := e.fullDocument(t)
	r := e.startWorker(func(c *Config) { c.RetryInitial, c.RetryMax = time.Minute, time.Minute })
	e.decideWhileTheBucketRefuses(t, r)
	r.stop(t) // recordDecisionLater is in its one-minute wait: the stop hands the command back
	r2 := e.startWorker(nil)
	e.old0StaysDecided(t, r2, key404)
	// Its outcome is stored: the decision counts once, by the worker that
	// stored it (found by review: the next one acked it as decided, and
	// no worker counted it).
	decided := func(r *running) float64 {
		return testutilCount(r.w.m.commands.WithLabelValues(StatusFailed, CauseDLFError))
	}
	if n1, n2 := decided(r), decided(r2); n1+n2 != 1 {
		t.Errorf("failed/dlf_error counted %v times by the first worker and %v by the second, want once", n1, n2)
	}
}

// The same stop, when the bucket still refuses, or the document changed
// meanwhile: the decision is counted once, by whichever worker records it
// (found by review: both did, in each case). A bucket still refusing when
// SHUTDOWN_TIMEOUT ends leaves it to the next worker; a changed document
// is re-read and written within it, by the first.
func TestDecisionCountedOnceWhenTheStopsHandBackFails(t *testing.T) {
	t.Parallel()
	for name, before := range map[string]func(t *testing.T, e *env){
		"bucket still refuses": func(*testing.T, *env) {},
		"document changed meanwhile": func(t *testing.T, e *env) {
			e.updateStream(t, "KV_dlf_stop_state", func(c *jetstream.StreamConfig) { c.MaxMsgSize = -1 })
			key := instKey(command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-404"}.InstanceKey())
			if _, err := e.state(t).kv.Put(context.Background(), key, []byte(`{}`)); err != nil {
				t.Fatal(err)
			}
		},
	} {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t, nil)
			// The stop tries the record for SHUTDOWN_TIMEOUT; a short one
			// keeps the case that still refuses quick.
			r := e.startWorker(func(c *Config) {
				c.RetryInitial, c.RetryMax, c.ShutdownTimeout = time.Minute, time.Minute, time.Second
			})
			e.refuseTheDecision(t, r)
			before(t, e)
			r.stop(t) // the hand-back writes no decision
			e.updateStream(t, "KV_dlf_stop_state", func(c *jetstream.StreamConfig) { c.MaxMsgSize = -1 })
			r2 := e.startWorker(nil)
			decided := func(r *running) float64 {
				return testutilCount(r.w.m.commands.WithLabelValues(StatusFailed, CauseDLFError))
			}
			testutil.Eventually(t, 10*time.Second, func() error {
				if n1, n2 := decided(r), decided(r2); n1+n2 != 1 {
					return fmt.Errorf("counted %v times by the first worker and %v by the second, want once", n1, n2)
				}
				return nil
			})
			e.stopStreamEmpty(t)
			if n1, n2 := decided(r), decided(r2); n1+n2 != 1 {
				t.Errorf("counted %v times by the first worker and %v by the second, want once", n1, n2)
			}
			if n := len(e.out.outcomes(t)); n != 1 {
				t.Errorf("%d outcomes, want 1", n)
			}
		})
	}
}

// A worker stopped while the bucket refuses a decision record goes on
// trying it within SHUTDOWN_TIMEOUT, instead of one try and a hand-back:
// once the bucket takes it, the command is acked, and no redelivery after
// the outcome's duplicate window can publish a second outcome (found by
// review: the redelivery called DLF, got DLF.6205 and published
// stopped/already_stopped as a second event).
func TestStopWhileTheBucketRefusesTheRecordKeepsTrying(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "", "s1", "i-404")
	r := e.startWorker(func(c *Config) { c.RetryInitial, c.RetryMax = time.Minute, time.Minute })
	e.refuseTheDecision(t, r)
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		r.stop(t)
	}()
	testutil.Eventually(t, 5*time.Second, func() error {
		if !r.w.shuttingDown.Load() {
			return fmt.Errorf("not stopping yet")
		}
		return nil
	})
	e.updateStream(t, "KV_dlf_stop_state", func(c *jetstream.StreamConfig) { c.MaxMsgSize = -1 })
	<-stopped
	if n := testutilCount(r.w.m.returned.WithLabelValues("shutdown")); n != 0 {
		t.Errorf("handed back %v times at the stop; want the record written and the command acked", n)
	}
	e.stopStreamEmpty(t)
	rec, err := e.state(t).load(context.Background(),
		instKey(command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-404"}.InstanceKey()))
	if err != nil {
		t.Fatal(err)
	}
	if !decidedIn(&rec.doc, "new") {
		t.Errorf("state = %+v; want new decided", rec.doc)
	}
}

// fullDocument fills the document of instance i-404 with maxCmdEntries
// decided commands, old-0 the oldest, and gives old-0 the mark of a call
// as its only index. It returns the instance key.
func (e *env) fullDocument(t *testing.T) string {
	t.Helper()
	e.emu.AddRunning(proj, "", "s1", "i-2")
	st := e.state(t)
	key404 := command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-404"}.InstanceKey()
	now := time.Now().Unix()
	full := stateDoc{Cmds: map[string]*cmdEntry{}}
	for i := 0; i < maxCmdEntries; i++ {
		full.Cmds["old-"+strconv.Itoa(i)] = &cmdEntry{Phase: phaseDecided, Attempts: 1, Status: StatusFailed,
			Cause: CauseDLFError, At: now - 1000 + int64(i)}
	}
	r0, err := st.load(context.Background(), instKey(key404))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.save(context.Background(), r0, func(d *stateDoc) { *d = full }); err != nil {
		t.Fatal(err)
	}
	if _, err := st.kv.Put(context.Background(), cmdKey("old-0"), sentMarkDoc("old-0", 1, 999, key404)); err != nil {
		t.Fatal(err)
	}
	return key404
}

// markFits is a size limit for the bucket's messages that the "sent" mark
// of the commands below fits and their decision record does not: a mark
// refused holds the call back. Both carry a compare-and-set header of 52
// bytes; the mark's body is 69 to 72 bytes, the first decision's 82 or 83
// (a stop, no command entries); documents with command entries are larger.
const markFits = 130

// decideWhileTheBucketRefuses has command "new" decided for i-404 while
// the bucket refuses its writes, and lets it accept them again once the
// decision write failed.
func (e *env) decideWhileTheBucketRefuses(t *testing.T, r *running) {
	t.Helper()
	e.refuseTheDecision(t, r)
	e.updateStream(t, "KV_dlf_stop_state", func(c *jetstream.StreamConfig) { c.MaxMsgSize = -1 })
}

// refuseTheDecision is decideWhileTheBucketRefuses without the end: the
// bucket goes on refusing.
func (e *env) refuseTheDecision(t *testing.T, r *running) {
	t.Helper()
	r.waitStarted(t)
	e.updateStream(t, "KV_dlf_stop_state", func(c *jetstream.StreamConfig) { c.MaxMsgSize = markFits })
	e.publish(body(t, map[string]any{"command_id": "new", "project_id": proj, "script_name": "s1", "instance_id": "i-404"}), nil)
	e.out.wait(t, 1, 10*time.Second)
	testutil.Eventually(t, 10*time.Second, func() error {
		if n := testutilCount(r.w.m.publishFail.WithLabelValues("state")); n < 1 {
			return fmt.Errorf("no failed decision write yet")
		}
		return nil
	})
}

// old0StaysDecided checks that old-0 left i-404's document, and that its
// id published again for i-2 is acked by r as a reused id, without a stop.
func (e *env) old0StaysDecided(t *testing.T, r *running, key404 string) {
	t.Helper()
	if rec, err := e.state(t).load(context.Background(), instKey(key404)); err != nil {
		t.Fatal(err)
	} else if rec.doc.Cmds["old-0"] != nil {
		t.Fatal("old-0 still in the document: nothing was dropped for room")
	}
	e.reusedForI2IsSkipped(t, r, "old-0")
}

// reusedForI2IsSkipped publishes the decided id for instance i-2 and checks
// that r acks it as a reused id, without stopping i-2.
func (e *env) reusedForI2IsSkipped(t *testing.T, r *running, id string) {
	t.Helper()
	e.publish(body(t, map[string]any{"command_id": id, "project_id": proj, "script_name": "s1", "instance_id": "i-2"}),
		nats.Header{nats.MsgIdHdr: []string{"again"}})
	e.stopStreamEmpty(t)
	testutil.Eventually(t, 5*time.Second, func() error {
		if got := testutilCount(r.w.m.reusedIDs); got != 1 {
			return fmt.Errorf("reused ids counted %v, want 1", got)
		}
		return nil
	})
	if e.emu.Stopped(proj, "s1", "i-2") {
		t.Errorf("the decided id %s stopped another instance", id)
	}
}

// A command without an id is known by its stream sequence ("DLF_STOP-1").
// A stream deleted and created again numbers its messages from 1 again,
// so its first command gets that id once more: it is a new command, to be
// stopped with its own call and outcome, not taken for the decided
// command of the old stream and acked without a stop.
func TestSeqIDAfterStreamRecreated(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// Both outcomes carry Nats-Msg-Id DLF_STOP-1; a short duplicate
	// window lets the outcome stream keep the second one too.
	const window = 100 * time.Millisecond
	e.updateStream(t, "DLF_STOP_OUTCOMES", func(c *jetstream.StreamConfig) { c.Duplicates = window })
	e.emu.AddRunning(proj, "", "s1", "old")
	e.emu.AddRunning(proj, "", "s1", "new")

	r := e.startWorker(nil)
	e.publish(body(t, map[string]any{"project_id": proj, "script_name": "s1", "instance_id": "old"}), nil)
	first := e.single(t)
	if first.CommandID != "DLF_STOP-1" || first.Status != StatusStopped {
		t.Fatalf("first outcome = %+v", first)
	}
	r.stop(t)
	if err := e.js.DeleteStream(ctx, "DLF_STOP"); err != nil {
		t.Fatal(err)
	}
	r = e.startWorker(nil) // creates the stream again, as at start-up
	// The premise, not a result: the first outcome is out of the window.
	<-time.After(window)
	e.publish(body(t, map[string]any{"project_id": proj, "script_name": "s1", "instance_id": "new"}), nil)

	outs := e.out.wait(t, 2, 10*time.Second)
	if len(outs) != 2 {
		t.Fatalf("%d outcomes, want 2", len(outs))
	}
	second := e.out.outcomes(t)[1]
	if second.CommandID != "DLF_STOP-1" || second.InstanceID != "new" || second.Status != StatusStopped || second.Cause != CauseOK {
		t.Errorf("second outcome = %+v", second)
	}
	if !e.emu.Stopped(proj, "s1", "new") {
		t.Error("the new stream's command did not stop its instance")
	}
	if n := e.emu.StopCalls(); n != 2 {
		t.Errorf("DLF calls = %d, want 2", n)
	}
	if got := testutilCount(r.w.m.skipped); got != 0 {
		t.Errorf("skipped = %v, want 0", got)
	}
	e.stopStreamEmpty(t)
	e.noDeadLetters(t)
}

// As above, but the new stream's command is decided while the first
// outcome still holds its id in the outcome stream's duplicate window: its
// own outcome is dropped as a duplicate. It must still get one, once the
// window is over, and only one.
func TestSeqIDWithinTheDuplicateWindowGetsItsOwnOutcome(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const window = 2 * time.Second
	e.updateStream(t, "DLF_STOP_OUTCOMES", func(c *jetstream.StreamConfig) { c.Duplicates = window })
	e.emu.AddRunning(proj, "", "s1", "old")
	e.emu.AddRunning(proj, "", "s1", "new")
	r := e.startWorker(nil)
	e.publish(body(t, map[string]any{"project_id": proj, "script_name": "s1", "instance_id": "old"}), nil)
	if first := e.single(t); first.CommandID != "DLF_STOP-1" {
		t.Fatalf("first outcome = %+v", first)
	}
	r.stop(t)
	if err := e.js.DeleteStream(ctx, "DLF_STOP"); err != nil {
		t.Fatal(err)
	}
	e.startWorker(nil)
	e.publish(body(t, map[string]any{"project_id": proj, "script_name": "s1", "instance_id": "new"}), nil)
	e.out.wait(t, 2, 20*time.Second)
	e.stopStreamEmpty(t)
	outs := e.out.outcomes(t)
	if len(outs) != 2 || outs[1].InstanceID != "new" || outs[1].Status != StatusStopped || outs[1].Cause != CauseOK {
		t.Fatalf("outcomes = %+v; want the new command's own", outs)
	}
	if n := e.emu.StopCallsFor(proj, "s1", "new"); n != 1 {
		t.Errorf("DLF calls for the new command = %d, want 1", n)
	}
	if n := e.pubs.count(); n != 3 {
		t.Errorf("%d outcome publishes, want 3 (the old command's, the new one's dropped, and again)", n)
	}
	e.noDeadLetters(t)
}

// As above, with the outcome stream's duplicate window longer than
// STATE_TTL: the pending outcome recorded while the command waits must
// not expire first (the redelivery would call DLF again, get DLF.6205 and
// fail a command that stopped its instance).
func TestSeqIDWaitingForAWindowLongerThanStateTTL(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.StateTTL = 2 * time.Second })
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	e.updateStream(t, "DLF_STOP_OUTCOMES", func(c *jetstream.StreamConfig) { c.Duplicates = 5 * time.Second })
	e.emu.AddRunning(proj, "", "s1", "old")
	e.emu.AddRunning(proj, "", "s1", "new")
	r := e.startWorker(nil)
	e.publish(body(t, map[string]any{"project_id": proj, "script_name": "s1", "instance_id": "old"}), nil)
	e.single(t)
	r.stop(t)
	if err := e.js.DeleteStream(ctx, "DLF_STOP"); err != nil {
		t.Fatal(err)
	}
	e.startWorker(nil)
	e.publish(body(t, map[string]any{"project_id": proj, "script_name": "s1", "instance_id": "new"}), nil)
	e.out.wait(t, 2, 30*time.Second)
	e.stopStreamEmpty(t)
	if o := e.out.outcomes(t)[1]; o.InstanceID != "new" || o.Status != StatusStopped || o.Cause != CauseOK {
		t.Errorf("new command's outcome = %+v; it stopped its instance with its one call", o)
	}
	if n := e.emu.StopCallsFor(proj, "s1", "new"); n != 1 {
		t.Errorf("DLF calls for the new command = %d, want 1", n)
	}
	e.noDeadLetters(t)
}

// A derived id whose slot in the duplicate window is held by an outcome
// that can no longer be read (here: deleted) on the command's first
// delivery: no earlier delivery of it can have stored that outcome, so it
// waits out the window and publishes its own.
func TestSeqIDWhoseSlotHolderIsUnreadableGetsItsOwnOutcome(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e.updateStream(t, "DLF_STOP_OUTCOMES", func(c *jetstream.StreamConfig) { c.Duplicates = 2 * time.Second })
	e.emu.AddRunning(proj, "", "s1", "new")
	m := nats.NewMsg("dlf.stop.outcome.stopped")
	m.Data = []byte(`{"command_id":"DLF_STOP-1","status":"stopped","cause":"ok"}`)
	m.Header.Set(nats.MsgIdHdr, "DLF_STOP-1")
	ack, err := e.js.PublishMsg(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	s, err := e.js.Stream(ctx, "DLF_STOP_OUTCOMES")
	if err != nil {
		t.Fatal(err)
	}
	e.out.wait(t, 1, 10*time.Second) // the collector sees it before it goes
	if err := s.DeleteMsg(ctx, ack.Sequence); err != nil {
		t.Fatal(err)
	}
	e.startWorker(nil)
	e.publish(body(t, map[string]any{"project_id": proj, "script_name": "s1", "instance_id": "new"}), nil)
	e.stopStreamEmpty(t)
	e.out.wait(t, 2, 10*time.Second)
	if o := e.out.outcomes(t)[1]; o.CommandID != "DLF_STOP-1" || o.InstanceID != "new" || o.Status != StatusStopped || o.Cause != CauseOK {
		t.Errorf("outcome = %+v; want the command's own", o)
	}
	if n := e.pubs.count(); n != 3 {
		t.Errorf("%d outcome publishes, want 3 (the deleted one, this one's dropped, and again)", n)
	}
}

func TestStateID(t *testing.T) {
	t.Parallel()
	at := time.Unix(1764201600, 123456789)
	tests := []struct {
		c     command.Command
		sid   string
		shown string
	}{
		{command.Command{ID: "chosen-1"}, "chosen-1", "chosen-1"},
		{command.Command{ID: "DLF_STOP-12", SeqID: true}, "DLF_STOP-12@1764201600123456789", "DLF_STOP-12"},
		// A chosen id that looks like a derived one is still chosen.
		{command.Command{ID: "DLF_STOP-12"}, "DLF_STOP-12", "DLF_STOP-12"},
	}
	for _, tt := range tests {
		if got := stateID(tt.c, at); got != tt.sid {
			t.Errorf("stateID(%+v) = %q, want %q", tt.c, got, tt.sid)
		}
		if got := shownID(tt.sid); got != tt.shown {
			t.Errorf("shownID(%q) = %q, want %q", tt.sid, got, tt.shown)
		}
	}
}

// A redelivery of a command known by its stream sequence is still the
// same command: the stored time that completes its identity is the same
// on every delivery.
func TestSeqIDDecidedIsNotRepeated(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "", "s1", "i-1")
	seq := e.publish(body(t, map[string]any{"project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stored := e.storedAt(ctx, t, seq)
	// What a delivery that stored the outcome but lost its ack left.
	c := command.Command{ID: "DLF_STOP-1", SeqID: true, ProjectID: proj, ScriptName: "s1", InstanceID: "i-1"}
	if err := e.state(t).putEntry(ctx, instKey(c.InstanceKey()), stateID(c, stored),
		cmdEntry{Phase: phaseDecided, Attempts: 1, Status: StatusStopped, Cause: CauseOK}); err != nil {
		t.Fatal(err)
	}
	e.ackedSilently(t, e.startWorker(nil))
}

// A command without an id is known by its stream sequence and the time
// the stream stored it, yet its redelivery may read differently: here a
// worker without a default project rejected it and lost the ack, and the
// redelivery reaches a worker that has one, so the command is now valid
// and its instance's document knows nothing of it. The index of its id
// still says it is decided: no call, no second outcome.
func TestDerivedIDDecidedUnderOtherDefaultsIsNotRepeated(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.Defaults = command.Defaults{ProjectID: proj} })
	e.emu.AddRunning(proj, "", "s1", "i-1")
	seq := e.publish(body(t, map[string]any{"script_name": "s1", "instance_id": "i-1"}), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stored := e.storedAt(ctx, t, seq)
	sid := stateID(command.Command{ID: "DLF_STOP-1", SeqID: true}, stored)
	if err := e.state(t).putEntry(ctx, cmdKey(sid), sid,
		cmdEntry{Phase: phaseDecided, Status: StatusRejected, Cause: CauseInvalidCommand}); err != nil {
		t.Fatal(err)
	}
	e.ackedSilently(t, e.startWorker(nil))
}

// storedAt is when the stop stream stored the message at seq.
func (e *env) storedAt(ctx context.Context, t *testing.T, seq uint64) time.Time {
	t.Helper()
	s, err := e.js.Stream(ctx, "DLF_STOP")
	if err != nil {
		t.Fatal(err)
	}
	m, err := s.GetMsg(ctx, seq)
	if err != nil {
		t.Fatal(err)
	}
	return m.Time
}

// ackedSilently checks that the one command in the stream, already
// decided, left it without a call or an outcome.
func (e *env) ackedSilently(t *testing.T, r *running) {
	t.Helper()
	e.stopStreamEmpty(t)
	testutil.Eventually(t, 5*time.Second, func() error {
		if got := testutilCount(r.w.m.skipped); got != 1 {
			return fmt.Errorf("skipped = %v", got)
		}
		return nil
	})
	if n := e.emu.StopCalls(); n != 0 {
		t.Errorf("DLF calls = %d, want 0", n)
	}
	if n := e.out.len(); n != 0 {
		t.Errorf("%d outcomes, want 0", n)
	}
	if n := e.pubs.count(); n != 0 {
		t.Errorf("%d outcome events published, want 0", n)
	}
}

// repeatSkipped checks that the second command, a repeat of a decided
// id, left the stream without a call, an outcome or a dead letter.
func (e *env) repeatSkipped(t *testing.T, r *running) {
	t.Helper()
	e.stopStreamEmpty(t)
	testutil.Eventually(t, 5*time.Second, func() error {
		if got := testutilCount(r.w.m.skipped); got != 1 {
			return fmt.Errorf("skipped = %v", got)
		}
		return nil
	})
	testutil.Consistently(t, 300*time.Millisecond, func() error {
		if n := e.out.len(); n != 1 {
			return fmt.Errorf("%d outcomes, want 1", n)
		}
		if n := e.pubs.count(); n != 1 {
			return fmt.Errorf("%d outcome events published, want 1 (the repeat was decided again)", n)
		}
		return nil
	})
	if n := e.emu.StopCalls(); n != 1 {
		t.Errorf("DLF calls = %d, want 1", n)
	}
	e.noDeadLetters(t)
}

// The lost 204: DLF stops the instance but the answer never arrives; the
// retry gets DLF.6205, which now means "already stopped".
func TestLostResponseIsAlreadyStopped(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "", "s1", "i-1")
	e.emu.SetFaultsFor(proj, "s1", "i-1", emulator.Faults{DropAfterStop: true})
	e.startWorker(nil)
	e.publish(body(t, map[string]any{"command_id": "lost", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	testutil.Eventually(t, 10*time.Second, func() error {
		if !e.emu.Stopped(proj, "s1", "i-1") {
			return fmt.Errorf("not stopped yet")
		}
		return nil
	})
	e.emu.ClearFaultsFor(proj, "s1", "i-1") // the next answer arrives
	o := e.single(t)
	if o.Status != StatusStopped || o.Cause != CauseAlreadyStopped || o.Attempts < 2 || o.HTTPStatus != 400 || o.ErrorCode != "DLF.6205" {
		t.Fatalf("outcome = %+v", o)
	}
	if o.Detail != "" {
		t.Errorf("stopped outcome with detail %q; the contract gives detail to every status but stopped", o.Detail)
	}
	if !e.emu.Stopped(proj, "s1", "i-1") {
		t.Error("instance not stopped")
	}
	e.noDeadLetters(t)
	// Acked: the checks above cannot see a command left unacked, whose
	// redelivery comes only after the ack wait (found by review).
	e.stopStreamEmpty(t)
	testutil.Consistently(t, 300*time.Millisecond, func() error {
		if n := e.out.len(); n != 1 {
			return fmt.Errorf("%d outcomes", n)
		}
		if n := e.pubs.count(); n != 1 {
			return fmt.Errorf("%d outcome events published", n)
		}
		return nil
	})
	t.Logf("lost_response status=%s cause=%s outcomes=%d dead_letters=%d dlf_calls=%d",
		o.Status, o.Cause, e.out.len(), e.dead.len(), e.emu.StopCallsFor(proj, "s1", "i-1"))
}

// A gateway's 504 (or 502) is not DLF's answer: the call went in and DLF
// may have stopped the instance behind it, so the retry's DLF.6205 is that
// stop, as after a dropped connection (found by review: it was
// dead-lettered). The front here lets the stop through to the emulator
// and answers 504 instead of its 204.
func TestGatewayTimeoutThenDLF6205IsAlreadyStopped(t *testing.T) {
	t.Parallel()
	for _, status := range []int{http.StatusGatewayTimeout, http.StatusBadGateway} {
		t.Run(strconv.Itoa(status), func(t *testing.T) {
			e := newEnv(t, func(c *Config) { c.RetryInitial, c.RetryMax = 50*time.Millisecond, 100*time.Millisecond })
			e.emu.AddRunning(proj, "", "s1", "i-1")
			var calls atomic.Int32
			front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if calls.Add(1) == 1 {
					e.emu.ServeHTTP(httptest.NewRecorder(), r) // the stop happens behind the gateway
					w.WriteHeader(status)
					return
				}
				e.emu.ServeHTTP(w, r)
			}))
			t.Cleanup(front.Close)
			e.startWorkerAt(front.URL, nil)
			e.publish(body(t, map[string]any{"command_id": "gw", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
			o := e.single(t)
			if o.Status != StatusStopped || o.Cause != CauseAlreadyStopped || o.Attempts != 2 || o.ErrorCode != "DLF.6205" {
				t.Fatalf("outcome = %+v; want stopped/already_stopped after two calls", o)
			}
			e.noDeadLetters(t)
			e.stopStreamEmpty(t) // acked
		})
	}
}

// An earlier delivery recorded a call that went unanswered: a DLF.6205
// now means that call stopped the instance.
func TestRecordedUnansweredCallCounts(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "", "s1", "i-1")
	e.emu.SetStatus(proj, "s1", "i-1", "FINISHED") // what DLF shows after the stop we never heard of
	st := e.state(t)
	key := instKey(command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-1"}.InstanceKey())
	if err := st.putEntry(context.Background(), key, "earlier", cmdEntry{Phase: phaseAnswered, Attempts: 1, Unanswered: true, Delivery: 1}); err != nil {
		t.Fatal(err)
	}
	e.startWorker(nil)
	e.publish(body(t, map[string]any{"command_id": "earlier", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	o := e.single(t)
	if o.Status != StatusStopped || o.Cause != CauseAlreadyStopped || o.Attempts != 2 {
		t.Fatalf("outcome = %+v", o)
	}
	e.noDeadLetters(t)
}

// A delivery that sent its call and then died without a word (its NATS
// connection gone before the answer came) left its "sent" mark: the
// redelivery's DLF.6205 is taken as that call's stop.
func TestCallOfACrashedDeliveryCounts(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.AckWait = time.Second })
	e.crashWithTheCallOnTheWire(t, body(t, map[string]any{"command_id": "crashed", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}))
	e.startWorker(nil)
	o := e.single(t)
	if o.Status != StatusStopped || o.Cause != CauseAlreadyStopped || o.ErrorCode != "DLF.6205" {
		t.Fatalf("outcome = %+v", o)
	}
	// The dead delivery's call is one of the command's calls (contract
	// section 4; found by review: attempts said 1).
	if calls := e.emu.StopCallsFor(proj, "s1", "i-1"); int64(o.Attempts) != calls {
		t.Errorf("attempts = %d, DLF saw %d calls", o.Attempts, calls)
	}
	e.noDeadLetters(t)
}

// The same call counts when the redelivery finds the deadline passed: the
// outcome does not say that no call was made (found by review).
func TestCallOfACrashedDeliveryCountsWhenTheDeadlinePassed(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.AckWait = time.Second })
	b := body(t, map[string]any{"command_id": "crashed", "project_id": proj, "script_name": "s1", "instance_id": "i-1",
		"deadline": time.Now().Add(30 * time.Minute).Format(time.RFC3339)})
	seq := e.crashWithTheCallOnTheWire(t, b)
	e.startWorker(nil, WithClock(func() time.Time { return time.Now().Add(time.Hour) }))
	o := e.single(t)
	if o.Status != StatusExpired || o.Cause != CauseDeadlinePassed || o.Attempts != 1 || o.HTTPStatus != 0 ||
		!strings.Contains(o.Detail, "after 1 in earlier deliveries") || !strings.Contains(o.Detail, "no answer") {
		t.Fatalf("outcome = %+v; want expired after the one call, which got no answer", o)
	}
	e.checkDead(t, o, b, seq)
}

// An earlier delivery whose first call went unanswered and whose last
// was refused before it reached DLF (no answer either: http_status 0)
// handed the command back; its deadline passes before the next one. The
// detail must not say the last request was sent (found by review: any
// unanswered call made it say so).
func TestExpiredAfterARefusedLastCallDoesNotSayItWasSent(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	st := e.state(t)
	ctx := context.Background()
	b := body(t, map[string]any{"command_id": "w", "project_id": proj, "script_name": "s1", "instance_id": "i-1",
		"deadline": time.Now().Add(30 * time.Minute).Format(time.RFC3339)})
	seq := e.publish(b, nil)
	inst := command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-1"}.InstanceKey()
	rev, err := st.markSentAt(ctx, "w", 1, seq, inst, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.putEntry(ctx, instKey(inst), "w", cmdEntry{Phase: phaseAnswered, Attempts: 2, Unanswered: true, Delivery: 1,
		Seq: seq, MarkRev: &rev, At: time.Now().Unix()}); err != nil {
		t.Fatal(err)
	}
	e.startWorker(nil, WithClock(func() time.Time { return time.Now().Add(time.Hour) }))
	o := e.single(t)
	if o.Status != StatusExpired || o.Attempts != 2 || strings.Contains(o.Detail, "after the request was sent") {
		t.Errorf("outcome = %+v; want expired after 2 attempts, not saying the last request was sent", o)
	}
}

// crashWithTheCallOnTheWire has a worker take command b for a running
// instance i-1 and die while its call is on the wire, after that call
// stopped the instance: no answer, no record but the call's mark.
func (e *env) crashWithTheCallOnTheWire(t *testing.T, b []byte) (seq uint64) {
	t.Helper()
	e.emu.AddRunning(proj, "", "s1", "i-1")
	e.emu.SetFaultsFor(proj, "s1", "i-1", emulator.Faults{Latency: 300 * time.Millisecond})
	crashing := e.startWorker(nil)
	seq = e.publish(b, nil)
	testutil.Eventually(t, 10*time.Second, func() error {
		if e.emu.StopCallsFor(proj, "s1", "i-1") == 0 {
			return fmt.Errorf("no call yet")
		}
		return nil
	})
	crashing.nc.Close() // dies with the call on the wire: no answer, no record
	testutil.Eventually(t, 10*time.Second, func() error {
		if !e.emu.Stopped(proj, "s1", "i-1") {
			return fmt.Errorf("the first call has not stopped the instance yet")
		}
		return nil
	})
	e.emu.ClearFaultsFor(proj, "s1", "i-1")
	return seq
}

// A delivery that died before it called (here: fetched and never acked)
// left no mark, so the redelivery's DLF.6205 is what it says: the
// instance does not exist, and the command fails and is dead-lettered
// (contract section 6: already_stopped only after a call that was sent).
func TestDeliveryThatNeverCalledCountsForNothing(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.AckWait = time.Second })
	b := body(t, map[string]any{"command_id": "typo", "project_id": proj, "script_name": "s1", "instance_id": "i-404"})
	seq := e.publish(b, nil)
	e.fetchedByADyingWorker(t, seq)
	e.startWorker(nil)
	o := e.single(t)
	if o.Status != StatusFailed || o.Cause != CauseDLFError || o.ErrorCode != "DLF.6205" {
		t.Fatalf("outcome = %+v; want failed: no call was ever sent before this one", o)
	}
	e.checkDead(t, o, b, seq)
}

// An earlier delivery stored its outcome (failed, DLF.6205) and died
// before its dead letter and its decision record. The redelivery decides
// otherwise (here DLF stops the instance), and its outcome is dropped as a
// duplicate: the dead letter and the state must follow the outcome that
// was stored, not the dropped one.
func TestDuplicateOutcomeFollowsTheStoredOne(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "", "s1", "i-1")
	b := body(t, map[string]any{"command_id": "dup", "project_id": proj, "script_name": "s1", "instance_id": "i-1"})
	seq := e.publish(b, nil)
	stored := Outcome{CommandID: "dup", ProjectID: proj, ScriptName: "s1", InstanceID: "i-1",
		Status: StatusFailed, Cause: CauseDLFError, HTTPStatus: 400, ErrorCode: "DLF.6205",
		ErrorMsg: "The script running history does not exist.", Detail: "DLF refused the stop",
		Attempts: 1, ReceivedAt: FormatTime(e.storedAt(context.Background(), t, seq)),
		FinishedAt: FormatTime(time.Now()), WorkerID: "died"}
	e.storeOutcome(t, stored)
	e.startWorker(nil)
	e.stopStreamEmpty(t)
	e.checkDead(t, stored, b, seq)
	if o := e.single(t); o.Status != StatusFailed || o.WorkerID != "died" {
		t.Errorf("outcome = %+v, want only the stored one", o)
	}
	rec, err := e.state(t).load(context.Background(),
		instKey(command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-1"}.InstanceKey()))
	if err != nil {
		t.Fatal(err)
	}
	if rec.doc.StoppedBy != "" {
		t.Errorf("state says the instance was stopped by %q; the stored outcome says failed", rec.doc.StoppedBy)
	}
	if c := rec.doc.Cmds["dup"]; c == nil || c.Phase != phaseDecided || c.Status != StatusFailed {
		t.Errorf("decision record = %+v, want decided failed", c)
	}
}

// A stop recorded longer ago than STATE_TTL is forgotten, as the contract
// says, even when its document lived on (other commands wrote to it): a
// new command for the instance is sent to DLF.
func TestStopOlderThanStateTTLIsForgotten(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.StateTTL = time.Hour })
	e.emu.AddRunning(proj, "", "s1", "i-1")
	st := e.state(t)
	key := instKey(command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-1"}.InstanceKey())
	doc := fmt.Sprintf(`{"stopped_by":"first","stopped_at":"then","st":%d}`, time.Now().Add(-2*time.Hour).Unix())
	if _, err := st.kv.Put(context.Background(), key, []byte(doc)); err != nil {
		t.Fatal(err)
	}
	e.startWorker(nil)
	e.publish(body(t, map[string]any{"command_id": "second", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	if o := e.single(t); o.Status != StatusStopped || o.Cause != CauseOK {
		t.Fatalf("outcome = %+v; want a call that stopped it", o)
	}
	if calls := e.emu.StopCallsFor(proj, "s1", "i-1"); calls != 1 {
		t.Errorf("DLF saw %d calls, want 1", calls)
	}
}

// deafConsumer hands out messages whose in-progress heartbeats never reach
// the server, as when a consumer leader change loses them.
type deafConsumer struct{ jetstream.Consumer }

func (c deafConsumer) Fetch(n int, opts ...jetstream.FetchOpt) (jetstream.MessageBatch, error) {
	b, err := c.Consumer.Fetch(n, opts...)
	if err != nil {
		return nil, err
	}
	return relay(b, func(m jetstream.Msg) jetstream.Msg { return deafMsg{m} }), nil
}

// relay hands b's messages on, each as wrap makes it.
func relay(b jetstream.MessageBatch, wrap func(jetstream.Msg) jetstream.Msg) *slowBatch {
	out := &slowBatch{MessageBatch: b, msgs: make(chan jetstream.Msg)}
	go func() {
		for m := range b.Messages() {
			out.msgs <- wrap(m)
		}
		close(out.msgs)
	}()
	return out
}

type deafMsg struct{ jetstream.Msg }

func (deafMsg) InProgress() error { return nil }

// Worker B holds a command (its DLF refuses B's credentials, so its circuit
// holds the command until the give-up time) and its heartbeats are lost:
// JetStream hands the command to worker A after the ack wait, and A stops
// the instance. When B's time is up it has decided too (failed), but it
// must not publish a second outcome: past the duplicate window that would
// be a second event for one command.
func TestOverlappingDeliveryDoesNotDecideAgain(t *testing.T) {
	t.Parallel()
	overlapDeliveries(t, nil)
}

// The same overlap when the two workers read the command under different
// defaults (here B's default workspace): A's decision lives in the
// document of another instance key than B's, and B finds it by following
// the id's "sent" mark that A's delivery wrote.
func TestOverlappingDeliveryUnderOtherDefaultsFollowsTheMark(t *testing.T) {
	t.Parallel()
	overlapDeliveries(t, func(c *Config) { c.Defaults.Workspace = "other" })
}

// overlapDeliveries runs the overlap above, with B's configuration changed
// by mutateB.
func overlapDeliveries(t *testing.T, mutateB func(*Config)) {
	e := newEnv(t, func(c *Config) { c.AckWait = time.Second; c.RetryMaxElapsed = 4 * time.Second })
	e.emu.AddRunning(proj, "", "s1", "i-1")
	var bCalls atomic.Int32
	refusing := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		bCalls.Add(1)
		w.WriteHeader(http.StatusUnauthorized)
	}))
	t.Cleanup(refusing.Close)
	b := e.startWorkerAt(refusing.URL, mutateB, func(w *Worker) { w.cons = deafConsumer{w.cons} })
	e.publish(body(t, map[string]any{"command_id": "both", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	testutil.Eventually(t, 10*time.Second, func() error {
		if bCalls.Load() == 0 {
			return fmt.Errorf("B has not called yet")
		}
		return nil
	})
	a := e.startWorker(nil) // A takes the redelivery once the ack wait is over
	if o := e.single(t); o.Status != StatusStopped || o.Cause != CauseOK || o.Workspace != "" {
		t.Fatalf("outcome = %+v; want A's stop", o)
	}
	// B may hold more than one delivery of it by then (one more came back
	// to B after its ack wait); each must end without an outcome.
	testutil.Eventually(t, 20*time.Second, func() error {
		if got := testutilCount(b.w.m.skipped); got < 1 {
			return fmt.Errorf("B has not given the command up as decided elsewhere")
		}
		if held := len(b.w.held); held != 0 {
			return fmt.Errorf("B still holds %d deliveries", held)
		}
		return nil
	})
	if n := e.pubs.count(); n != 1 {
		t.Errorf("%d outcome events published, want A's only", n)
	}
	// One message delivered twice is no reused id, under other defaults
	// either (found by review: B's re-read counted it as one).
	if n := testutilCount(a.w.m.reusedIDs) + testutilCount(b.w.m.reusedIDs); n != 0 {
		t.Errorf("dlf_stop_command_ids_reused_total = %v for one message delivered twice", n)
	}
	e.noDeadLetters(t)
}

// The outcome is stored but the state bucket refuses the decision record
// (here: its messages may be markFits bytes at most) until an operator
// fixes it.
// The worker holds the command and records the decision then; it does not
// hand the command back to be called and decided again.
func TestDecisionRecordedOnceTheBucketRecovers(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "", "s1", "i-1")
	r := e.startWorker(nil)
	r.waitStarted(t)
	e.updateStream(t, "KV_dlf_stop_state", func(c *jetstream.StreamConfig) { c.MaxMsgSize = markFits })
	e.publish(body(t, map[string]any{"command_id": "held", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	e.out.wait(t, 1, 10*time.Second)
	testutil.Eventually(t, 10*time.Second, func() error {
		if n := testutilCount(r.w.m.publishFail.WithLabelValues("state")); n < 1 {
			return fmt.Errorf("decision write failures so far: %v", n)
		}
		return nil
	})
	e.updateStream(t, "KV_dlf_stop_state", func(c *jetstream.StreamConfig) { c.MaxMsgSize = -1 })
	e.stopStreamEmpty(t)
	if n := e.pubs.count(); n != 1 {
		t.Errorf("outcome published %d times, want once", n)
	}
	if n := e.emu.StopCalls(); n != 1 {
		t.Errorf("DLF calls = %d, want 1", n)
	}
	rec, err := e.state(t).load(context.Background(),
		instKey(command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-1"}.InstanceKey()))
	if err != nil {
		t.Fatal(err)
	}
	if rec.doc.StoppedBy != "held" {
		t.Errorf("state = %+v, want the instance recorded as stopped by the command", rec.doc)
	}
}

// A publisher's id published again (another message, here for another
// instance) while its first command was undecided is that same command by
// the contract. When the second one also called and decided otherwise
// (here: failed, DLF.6205), its outcome is dropped as the first one's
// duplicate. The first outcome stands: no dead letter contradicting it, and
// the second instance is not recorded as stopped (a later command for it
// must still be sent to DLF).
func TestIDPublishedAgainWhileUndecidedFollowsTheFirst(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.storeOutcome(t, firstDupOutcome())
	r := e.startWorker(nil)
	e.publish(body(t, map[string]any{"command_id": "dup", "project_id": proj, "script_name": "s1", "instance_id": "i-2"}), nil)
	e.stopStreamEmpty(t)
	if o := e.single(t); o.InstanceID != "i-1" || o.Status != StatusStopped {
		t.Fatalf("outcome = %+v; want the first command's only", o)
	}
	e.noDeadLetters(t)
	if got := testutilCount(r.w.m.reusedIDs); got != 1 {
		t.Errorf("reused ids counted %v, want 1", got)
	}
	e.emu.AddRunning(proj, "", "s1", "i-2")
	e.publish(body(t, map[string]any{"command_id": "later", "project_id": proj, "script_name": "s1", "instance_id": "i-2"}), nil)
	e.out.wait(t, 2, 10*time.Second)
	if o := byID(t, e.out.outcomes(t))["later"]; o.Status != StatusStopped || o.Cause != CauseOK {
		t.Errorf("later command for i-2: %+v; want its own stop (i-2 was never stopped)", o)
	}
	if !e.emu.Stopped(proj, "s1", "i-2") {
		t.Error("i-2 was never stopped")
	}
}

// As above, but the second command's own call stopped its instance: the
// stop is recorded (a later command for that instance is already_stopped,
// without a call), and the id, now indexed as decided, is recognised when
// a third message uses it for yet another instance.
func TestIDPublishedAgainWhoseCallStoppedItsInstance(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "", "s1", "i-2")
	e.emu.AddRunning(proj, "", "s1", "i-3")
	e.storeOutcome(t, firstDupOutcome())
	r := e.startWorker(nil)
	e.publish(body(t, map[string]any{"command_id": "dup", "project_id": proj, "script_name": "s1", "instance_id": "i-2"}), nil)
	e.stopStreamEmpty(t)
	if !e.emu.Stopped(proj, "s1", "i-2") {
		t.Fatal("the second command's call did not stop i-2")
	}
	e.publish(body(t, map[string]any{"command_id": "later", "project_id": proj, "script_name": "s1", "instance_id": "i-2"}), nil)
	e.out.wait(t, 2, 10*time.Second)
	if o := byID(t, e.out.outcomes(t))["later"]; o.Status != StatusStopped || o.Cause != CauseAlreadyStopped {
		t.Errorf("later command for i-2: %+v; want already_stopped by the recorded stop", o)
	}
	if n := e.emu.StopCallsFor(proj, "s1", "i-2"); n != 1 {
		t.Errorf("DLF calls for i-2 = %d, want 1", n)
	}
	e.publish(body(t, map[string]any{"command_id": "dup", "project_id": proj, "script_name": "s1", "instance_id": "i-3"}),
		nats.Header{nats.MsgIdHdr: []string{"third"}})
	e.stopStreamEmpty(t)
	testutil.Eventually(t, 5*time.Second, func() error {
		if got := testutilCount(r.w.m.reusedIDs); got != 2 {
			return fmt.Errorf("reused ids counted %v, want 2", got)
		}
		return nil
	})
	if e.emu.Stopped(proj, "s1", "i-3") {
		t.Error("the decided id dup stopped a third instance")
	}
	e.noDeadLetters(t)
}

// A reused id whose record the bucket refuses is returned as the bucket's
// failure, not as an outcome that could not be stored: readiness must not
// send an operator to the outcome stream, which took everything (found by
// review), and it ends once the bucket takes writes again.
func TestReusedIDWhoseRecordIsRefusedWaitsForTheBucket(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "", "s1", "i-2")
	e.storeOutcome(t, firstDupOutcome())
	r := e.startWorker(func(c *Config) { c.RetryInitial, c.RetryMax = 50*time.Millisecond, 200*time.Millisecond })
	r.waitStarted(t)
	e.updateStream(t, "KV_dlf_stop_state", func(c *jetstream.StreamConfig) { c.MaxMsgSize = markFits })
	e.publish(body(t, map[string]any{"command_id": "dup", "project_id": proj, "script_name": "s1", "instance_id": "i-2"}), nil)
	testutil.Eventually(t, 10*time.Second, func() error {
		if n := testutilCount(r.w.m.returned.WithLabelValues("state_unavailable")); n < 1 {
			return fmt.Errorf("not returned for the bucket yet")
		}
		return nil
	})
	if n := testutilCount(r.w.m.returned.WithLabelValues("publish_failed")); n != 0 {
		t.Errorf("returned %v times as a failed publish", n)
	}
	if ok, why := r.w.Readiness(); strings.Contains(why, "outcomes") {
		t.Errorf("readiness = %v, %q; the outcome stream is not what fails", ok, why)
	}
	e.updateStream(t, "KV_dlf_stop_state", func(c *jetstream.StreamConfig) { c.MaxMsgSize = -1 })
	e.stopStreamEmpty(t)
	testutil.Eventually(t, 5*time.Second, func() error {
		if got := testutilCount(r.w.m.reusedIDs); got < 1 {
			return fmt.Errorf("reused ids counted %v", got)
		}
		return nil
	})
	if o := e.single(t); o.InstanceID != "i-1" {
		t.Errorf("outcome = %+v; want the first command's only", o)
	}
	e.noDeadLetters(t)
}

// storeOutcome stores o in the outcome stream under its command id, as an
// earlier delivery (or another message with that id) would have.
func (e *env) storeOutcome(t *testing.T, o Outcome) {
	t.Helper()
	b, err := json.Marshal(&o)
	if err != nil {
		t.Fatal(err)
	}
	m := nats.NewMsg("dlf.stop.outcome." + o.Status)
	m.Data = b
	m.Header.Set(nats.MsgIdHdr, o.CommandID)
	if _, err := e.js.PublishMsg(context.Background(), m); err != nil {
		t.Fatal(err)
	}
}

// firstDupOutcome is the stored outcome of a first command "dup", another
// message than the one a test publishes: it stopped instance i-1.
func firstDupOutcome() Outcome {
	return Outcome{CommandID: "dup", ProjectID: proj, ScriptName: "s1", InstanceID: "i-1",
		Status: StatusStopped, Cause: CauseOK, HTTPStatus: 204, Attempts: 1,
		ReceivedAt: FormatTime(time.Now().Add(-time.Minute)), FinishedAt: FormatTime(time.Now()), WorkerID: "other"}
}

// Without such a record a DLF.6205 still fails and is dead-lettered.
func TestDLF6205WithoutRecordFails(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.startWorker(nil)
	b := body(t, map[string]any{"command_id": "nope", "project_id": proj, "script_name": "s1", "instance_id": "i-404"})
	seq := e.publish(b, nil)
	o := e.single(t)
	if o.Status != StatusFailed || o.Cause != CauseDLFError {
		t.Fatalf("outcome = %+v", o)
	}
	e.checkDead(t, o, b, seq)
}

// Another command already stopped the same instance: no call, stopped.
func TestInstanceStoppedByAnotherCommand(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.Defaults.Workspace = "ws" })
	e.emu.AddRunning(proj, "ws", "脚本", "i-1")
	e.startWorker(nil)
	e.publish(body(t, map[string]any{"command_id": "first", "project_id": proj, "script_name": "脚本", "instance_id": "i-1"}), nil)
	e.out.wait(t, 1, 10*time.Second)
	// Same instance once defaults are applied: workspace given explicitly.
	e.publish(body(t, map[string]any{"command_id": "second", "project_id": proj, "workspace": "ws", "script_name": "脚本", "instance_id": "i-1"}), nil)
	outs := e.out.wait(t, 2, 10*time.Second)
	_ = outs
	got := byID(t, e.out.outcomes(t))
	if o := got["second"]; o.Status != StatusStopped || o.Cause != CauseAlreadyStopped || o.Attempts != 0 || o.HTTPStatus != 0 || o.Detail != "" {
		t.Fatalf("second outcome = %+v", o)
	}
	if n := e.emu.StopCalls(); n != 1 {
		t.Errorf("DLF calls = %d, want 1", n)
	}
	e.noDeadLetters(t)
}

// oneCall asserts that the DLF behind calls saw exactly one call.
func oneCall(t *testing.T, calls *atomic.Int32) {
	t.Helper()
	if n := calls.Load(); n != 1 {
		t.Errorf("DLF calls = %d, want 1", n)
	}
}

// loadDoc reads the state document under key.
func loadDoc(t *testing.T, st *stateStore, key string) *stateRecord {
	t.Helper()
	rec, err := st.load(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	return rec
}

// answer6205 is a DLF that does what during runs first, on the wire of the
// call, and then answers 400 DLF.6205, counting the calls.
func answer6205(t *testing.T, calls *atomic.Int32, during func(ctx context.Context) error) string {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		if err := during(r.Context()); err != nil {
			t.Errorf("during the call: %v", err)
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		_, _ = w.Write([]byte(`{"error_code":"DLF.6205","error_msg":"The script instance is not running."}`))
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

// Two commands for one instance at once: the other one's stop is recorded
// after this one's lookup, while its call is on the wire, and the call
// gets DLF.6205. The record explains it: stopped, already_stopped, no
// dead letter; and the instance stays recorded as stopped by the other.
func TestStopRecordedDuringTheCallExplainsDLF6205(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	st := e.state(t)
	var calls atomic.Int32
	url := answer6205(t, &calls, stopRecordedBy(st, "other"))
	e.startWorkerAt(url, nil)
	e.publish(body(t, map[string]any{"command_id": "late", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	e.explained6205(t, &calls, 1)
	rec := loadDoc(t, st, i1Key())
	if rec.doc.StoppedBy != "other" || rec.doc.Cmds["late"] == nil || rec.doc.Cmds["late"].Phase != phaseDecided {
		t.Errorf("state = %+v; want stopped by the other command and this one decided", rec.doc)
	}
}

// Overlapping deliveries of one command: another delivery marks its call
// after this one's lookup, and this one's call gets DLF.6205. The mark
// explains it (the other call stopped the instance): stopped,
// already_stopped, no dead letter.
func TestMarkOfAnotherDeliveryDuringTheCallExplainsDLF6205(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	st := e.state(t)
	inst := command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-1"}.InstanceKey()
	seqc := make(chan uint64, 1)
	var calls atomic.Int32
	url := answer6205(t, &calls, func(ctx context.Context) error {
		select {
		case seq := <-seqc:
			return st.markSent(ctx, "both", 9, seq, inst)
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	e.startWorkerAt(url, nil)
	seqc <- e.publish(body(t, map[string]any{"command_id": "both", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	e.explained6205(t, &calls, 2) // the other delivery's call counts
	rec := loadDoc(t, st, instKey(inst))
	if rec.doc.StoppedBy != "both" {
		t.Errorf("state = %+v; want the instance recorded as stopped by the command", rec.doc)
	}
}

// What another delivery leaves does not always explain a DLF.6205: its
// mark for another instance (the command read under other defaults), during
// the call or before the lookup; its mark followed by a recorded answer; or
// the very mark this delivery saw at its lookup (its own mark lost). Each
// fails as usual.
func TestMarksThatDoNotExplainDLF6205(t *testing.T) {
	t.Parallel()
	inst := command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-1"}.InstanceKey()
	other := command.Command{ProjectID: proj, Workspace: "other", ScriptName: "s1", InstanceID: "i-1"}.InstanceKey()
	for _, tc := range []struct {
		name   string
		before stateStep // before the delivery
		during stateStep // while its call is on the wire
	}{
		{"mark for another instance", nil, func(ctx context.Context, st *stateStore, seq uint64) error {
			return st.markSent(ctx, "both", 9, seq, other)
		}},
		{"mark then an answer recorded", nil, func(ctx context.Context, st *stateStore, seq uint64) error {
			if err := st.markSent(ctx, "both", 9, seq, inst); err != nil {
				return err
			}
			return st.putEntry(ctx, instKey(inst), "both", cmdEntry{Phase: phaseAnswered, Attempts: 2, Delivery: 9, LastHTTPStatus: 503})
		}},
		{"mark for another instance seen at the lookup", func(ctx context.Context, st *stateStore, seq uint64) error {
			return st.markSent(ctx, "both", 9, seq, other)
		}, nil},
		{"a call to another instance that went unanswered", func(ctx context.Context, st *stateStore, seq uint64) error {
			if err := st.putEntry(ctx, instKey(other), "both", cmdEntry{Phase: phaseAnswered, Attempts: 1, Unanswered: true, Delivery: 9}); err != nil {
				return err
			}
			return st.markSent(ctx, "both", 9, seq, other)
		}, nil},
		{"the mark seen at the lookup", func(ctx context.Context, st *stateStore, seq uint64) error {
			if err := st.markSent(ctx, "both", 9, seq, inst); err != nil {
				return err
			}
			return st.putEntry(ctx, instKey(inst), "both", cmdEntry{Phase: phaseAnswered, Attempts: 1, Delivery: 9})
		}, func(ctx context.Context, st *stateStore, seq uint64) error {
			return st.markSent(ctx, "both", 9, seq, inst) // this delivery's own mark overwritten by it
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, calls, b, seq := run6205(t, tc.before, tc.during)
			o := e.single(t)
			if o.Status != StatusFailed || o.Cause != CauseDLFError {
				t.Fatalf("outcome = %+v; want failed/dlf_error", o)
			}
			oneCall(t, calls)
			e.checkDead(t, o, b, seq)
		})
	}
}

// stateStep changes the state bucket at a point of a delivery of the
// command at stream sequence seq.
type stateStep func(ctx context.Context, st *stateStore, seq uint64) error

// run6205 publishes command "both" for instance i-1 and starts a worker
// against a DLF that answers DLF.6205, with before applied to the state
// bucket ahead of the delivery and during while its call is on the wire
// (either may be nil). It returns the command's body and sequence.
func run6205(t *testing.T, before, during stateStep) (e *env, calls *atomic.Int32, b []byte, seq uint64) {
	t.Helper()
	e = newEnv(t, nil)
	st := e.state(t)
	seqc := make(chan uint64, 1)
	calls = new(atomic.Int32)
	url := answer6205(t, calls, func(ctx context.Context) error {
		select {
		case seq := <-seqc:
			if during == nil {
				return nil
			}
			return during(ctx, st, seq)
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	b = body(t, map[string]any{"command_id": "both", "project_id": proj, "script_name": "s1", "instance_id": "i-1"})
	seq = e.publish(b, nil)
	if before != nil {
		if err := before(context.Background(), st, seq); err != nil {
			t.Fatal(err)
		}
	}
	seqc <- seq
	e.startWorkerAt(url, nil)
	return e, calls, b, seq
}

// Progress another delivery records while this one's call is on the wire
// explains the DLF.6205: a call of its own that got no answer makes it a
// stop; a decision it could not publish (its outcome pending in the state)
// is published by this delivery instead of its own, even when a stop of
// another command is recorded beside it.
func TestProgressDuringTheCallExplainsDLF6205(t *testing.T) {
	t.Parallel()
	inst := command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-1"}.InstanceKey()
	pendingOf := func(status, cause string, httpStatus int) json.RawMessage {
		b, err := json.Marshal(&Outcome{CommandID: "both", ProjectID: proj, ScriptName: "s1", InstanceID: "i-1",
			Status: status, Cause: cause, HTTPStatus: httpStatus, Attempts: 1, WorkerID: "other-worker",
			ReceivedAt: "2026-11-27T10:00:00Z", FinishedAt: "2026-11-27T10:00:01Z", DurationMS: 1000})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	stopped := pendingOf(StatusStopped, CauseOK, 204)
	failed := pendingOf(StatusFailed, CauseDLFError, 400)
	for _, tc := range []struct {
		name          string
		entry         cmdEntry
		otherStop     bool // a stop of another command recorded too
		status, cause string
		adopted       bool // the outcome published is the other delivery's
	}{
		{"unanswered call", cmdEntry{Phase: phaseAnswered, Attempts: 1, Delivery: 9, Unanswered: true}, false, StatusStopped, CauseAlreadyStopped, false},
		{"pending stop", cmdEntry{Phase: phasePending, Attempts: 1, Delivery: 9, Outcome: stopped}, false, StatusStopped, CauseOK, true},
		{"pending failure", cmdEntry{Phase: phasePending, Attempts: 1, Delivery: 9, Outcome: failed}, false, StatusFailed, CauseDLFError, true},
		{"pending failure beside another stop", cmdEntry{Phase: phasePending, Attempts: 1, Delivery: 9, Outcome: failed}, true, StatusFailed, CauseDLFError, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, nil)
			st := e.state(t)
			var calls atomic.Int32
			url := answer6205(t, &calls, func(ctx context.Context) error {
				r, err := st.load(ctx, instKey(inst))
				if err != nil {
					return err
				}
				return st.save(ctx, r, func(d *stateDoc) {
					if d.Cmds == nil {
						d.Cmds = map[string]*cmdEntry{}
					}
					entry := tc.entry
					d.Cmds["both"] = &entry
					if tc.otherStop {
						d.StoppedBy, d.StoppedAt, d.StoppedT = "other", "2026-11-27T10:00:00Z", time.Now().Unix()
					}
				})
			})
			e.startWorkerAt(url, nil)
			b := body(t, map[string]any{"command_id": "both", "project_id": proj, "script_name": "s1", "instance_id": "i-1"})
			seq := e.publish(b, nil)
			o := e.single(t)
			if o.Status != tc.status || o.Cause != tc.cause || (o.WorkerID == "other-worker") != tc.adopted {
				t.Fatalf("outcome = %+v; want %s/%s, the other delivery's: %v", o, tc.status, tc.cause, tc.adopted)
			}
			e.stopStreamEmpty(t)
			oneCall(t, &calls)
			if tc.status == StatusStopped {
				e.noDeadLetters(t)
			} else {
				e.checkDead(t, o, b, seq)
			}
			rec := loadDoc(t, st, instKey(inst))
			if got := rec.doc.Cmds["both"]; rec.doc.StoppedBy != "both" && (got == nil || got.Phase != phaseDecided || got.Status != tc.status) {
				t.Errorf("state = %+v; want the command decided %s", rec.doc, tc.status)
			}
		})
	}
}

// A stop this very id recorded longer than STATE_TTL ago is forgotten: the
// id published again is called like a new command (recall), and the re-read
// after its DLF.6205 forgets that stop too, instead of taking the command
// for decided and acking it without an outcome.
func TestOwnStopOlderThanStateTTLIsForgottenAfterDLF6205(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	st := e.state(t)
	key := instKey(command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-1"}.InstanceKey())
	ctx := context.Background()
	r, err := st.load(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	c := e.cfg
	c.setDefaults()
	if err := st.save(ctx, r, func(d *stateDoc) {
		d.StoppedBy, d.StoppedAt, d.StoppedT = "again", "2026-11-20T10:00:00Z", time.Now().Add(-2*c.StateTTL).Unix()
	}); err != nil {
		t.Fatal(err)
	}
	var calls atomic.Int32
	url := answer6205(t, &calls, func(context.Context) error { return nil })
	e.startWorkerAt(url, nil)
	e.publish(body(t, map[string]any{"command_id": "again", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	if o := e.single(t); o.Status != StatusFailed || o.Cause != CauseDLFError {
		t.Fatalf("outcome = %+v; want failed/dlf_error", o)
	}
	oneCall(t, &calls)
}

// explained6205 checks that the one DLF call got DLF.6205 and the command
// ended stopped / already_stopped, acked, without a dead letter; attempts
// counts that call and those of other deliveries whose marks explain it.
func (e *env) explained6205(t *testing.T, calls *atomic.Int32, attempts int) {
	t.Helper()
	o := e.single(t)
	if o.Status != StatusStopped || o.Cause != CauseAlreadyStopped || o.Attempts != attempts {
		t.Fatalf("outcome = %+v; want stopped/already_stopped, %d attempts", o, attempts)
	}
	e.stopStreamEmpty(t)
	e.noDeadLetters(t)
	oneCall(t, calls)
}

// i1Key is the state key of instance i-1 of script s1 in proj.
func i1Key() string {
	return instKey(command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-1"}.InstanceKey())
}

// stopRecordedBy records i-1 as stopped by the command id, for answer6205
// to run while a call is on the wire.
func stopRecordedBy(st *stateStore, id string) func(context.Context) error {
	return func(ctx context.Context) error {
		r, err := st.load(ctx, i1Key())
		if err != nil {
			return err
		}
		return st.save(ctx, r, func(d *stateDoc) {
			d.StoppedBy, d.StoppedAt, d.StoppedT = id, "2026-11-27T10:00:00Z", time.Now().Unix()
		})
	}
}

// Another delivery decided the command while this one's call was on the
// wire: this one's DLF.6205 ends without an outcome of its own.
func TestDecisionDuringTheCallAcksWithoutAnOutcome(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	st := e.state(t)
	var calls atomic.Int32
	url := answer6205(t, &calls, stopRecordedBy(st, "both"))
	r := e.startWorkerAt(url, nil)
	e.publish(body(t, map[string]any{"command_id": "both", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	e.stopStreamEmpty(t)
	if got := testutilCount(r.w.m.skipped); got != 1 {
		t.Errorf("commands acked as decided elsewhere = %v, want 1", got)
	}
	if n := e.pubs.count(); n != 0 {
		t.Errorf("%d outcome events published, want none (the other delivery published it)", n)
	}
	e.noDeadLetters(t)
	oneCall(t, &calls)
}

// Attempts count across deliveries when long waits hand the command back.
func TestAttemptsSurviveRedelivery(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) {
		c.ShortWaitMax = time.Millisecond // every wait goes through NakWithDelay
		c.RetryInitial = 20 * time.Millisecond
		c.RetryMax = 50 * time.Millisecond
	})
	e.emu.AddRunning(proj, "", "s1", "i-1")
	e.emu.SetFaultsFor(proj, "s1", "i-1", emulator.Faults{ErrorRate: 1, ErrorStatus: 500})
	r := e.startWorker(nil)
	e.publish(body(t, map[string]any{"command_id": "re", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	testutil.Eventually(t, 10*time.Second, func() error {
		if n := e.emu.StopCallsFor(proj, "s1", "i-1"); n < 3 {
			return fmt.Errorf("%d calls", n)
		}
		return nil
	})
	e.emu.ClearFaultsFor(proj, "s1", "i-1")
	o := e.single(t)
	if calls := e.emu.StopCallsFor(proj, "s1", "i-1"); int64(o.Attempts) != calls {
		t.Errorf("attempts = %d, DLF saw %d calls", o.Attempts, calls)
	}
	if got := testutilCount(r.w.m.retries.WithLabelValues("redelivery")); got < 2 {
		t.Errorf("redelivery retries = %v, want >= 2", got)
	}
}

func (e *env) state(t *testing.T) *stateStore {
	t.Helper()
	c := e.cfg
	c.setDefaults()
	st, err := ensureState(context.Background(), e.js, &c, e.log)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// Systemic failure: DLF answers 401 to everything. The worker opens the
// circuit, stops fetching, reports not ready, probes one call at a time,
// and once DLF recovers every command is stopped; none is dead-lettered.
func TestCircuitOpensOnAuthFailureAndRecovers(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.RetryInitial = 100 * time.Millisecond; c.RetryMax = 300 * time.Millisecond })
	e.emu.SetFaults(emulator.Faults{AuthFail: true})
	r := e.startWorker(nil)
	e.publishMany(t, 50, "a")
	// Not ready for the circuit's reason: while it is open the pulls are
	// parked too, and "consumer not bound" alone would not tell an
	// operator why (found by review: any reason passed).
	testutil.Eventually(t, 10*time.Second, func() error {
		if ok, why := r.w.Readiness(); ok || !strings.Contains(why, "DLF circuit open") {
			return fmt.Errorf("readiness %v %q", ok, why)
		}
		return nil
	})
	// While open, calls are single probes spaced by backoff, not one per
	// command: over 1.5s at most ~1.5s/100ms probes. Calls already on the
	// wire when it opened (on a loaded machine some are still dialling)
	// are let finish before counting; after that only a probe can be.
	testutil.Eventually(t, 10*time.Second, func() error {
		if n := gaugeValue(r.w.m.inFlight); n > 1 {
			return fmt.Errorf("%v calls in flight", n)
		}
		return nil
	})
	before := e.emu.StopCalls()
	testutil.Consistently(t, 1500*time.Millisecond, func() error {
		if n := e.out.len(); n != 0 {
			return fmt.Errorf("%d outcomes while DLF refused us", n)
		}
		return nil
	})
	if probes := e.emu.StopCalls() - before; probes > 16 {
		t.Errorf("%d calls in 1.5s with the circuit open; want probes only", probes)
	}
	if got := gaugeValue(r.w.m.circuitOpen); got != 1 {
		t.Errorf("circuit gauge = %v", got)
	}
	e.emu.SetFaults(emulator.Faults{})
	e.out.wait(t, 50, 20*time.Second)
	allStopped(t, byID(t, e.out.outcomes(t)))
	e.noDeadLetters(t)
	testutil.Eventually(t, 5*time.Second, func() error {
		if ok, why := r.w.Readiness(); !ok {
			return fmt.Errorf("not ready: %s", why)
		}
		// Alerting follows the gauge (found by review: nothing checked
		// it went back to 0).
		if got := gaugeValue(r.w.m.circuitOpen); got != 0 {
			return fmt.Errorf("circuit gauge %v after recovery", got)
		}
		return nil
	})
}

// A command that passed the circuit while it was closed and then waited
// for a rate token is not sent once the circuit has opened meanwhile: it
// waits for its turn as a probe like every other command.
func TestCircuitOpeningHoldsCallsAlreadyAdmitted(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) {
		c.RateLimit, c.RateBurst = 1, 1
		c.RetryInitial, c.RetryMax = 4*time.Second, 8*time.Second
	})
	// first takes the one token at t0; its 401 opens the circuit while
	// second, admitted while it was still closed, waits for the next
	// token, due at t0+1s.
	r := e.firstAnswerLate(t, emulator.Faults{AuthFail: true})
	r.waitCircuitOpen(t)
	opened := time.Now()
	e.emu.ClearFaultsFor(proj, "s1", "first")
	e.out.wait(t, 2, 30*time.Second)
	allStopped(t, byID(t, e.out.outcomes(t)))
	var second time.Time
	for _, rq := range e.emu.Requests() {
		if rq.InstanceID == "second" {
			second = rq.Time
			break
		}
	}
	// The first probe is due RetryInitial after opening, less at most
	// half of it for jitter: 2s. Without the hold, second went out with
	// its token, 0.7s after the circuit opened.
	if early := second.Sub(opened); early < time.Second {
		t.Errorf("second was sent %s after the circuit opened, before any probe was due", early.Round(time.Millisecond))
	}
}

// Commands waiting for rate tokens when the circuit opens hand their
// tokens back: the first probe does not queue behind a token for each of
// them.
func TestCircuitOpeningReturnsRateTokens(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) {
		c.RateLimit, c.RateBurst, c.Concurrency = 1, 1, 4
		c.RetryInitial, c.RetryMax = 200*time.Millisecond, 400*time.Millisecond
	})
	// first takes the one token at t0, and its 401 opens the circuit at
	// t0+300ms. By then the other five commands wait for tokens due at
	// t0+1s, t0+2s, ... or for a slot; had they kept them, the probe's
	// token would come after theirs, at t0+6s.
	e.firstAnswerLate(t, emulator.Faults{AuthFail: true})
	e.emu.SetFaults(emulator.Faults{AuthFail: true}) // before second's token
	e.publishMany(t, 4, "r")
	testutil.Eventually(t, 20*time.Second, func() error {
		if n := e.emu.StopCalls(); n < 2 {
			return fmt.Errorf("%d calls", n)
		}
		return nil
	})
	reqs := e.emu.Requests()
	sort.Slice(reqs, func(i, j int) bool { return reqs[i].Time.Before(reqs[j].Time) })
	if reqs[0].InstanceID != "first" {
		t.Fatalf("%s was sent before first's 401", reqs[0].InstanceID)
	}
	// The probe is due RetryInitial after the 401 (1.5 times that at
	// most, with jitter), and its token at t0+1s.
	gap := reqs[1].Time.Sub(reqs[0].Time)
	t.Logf("first probe %s after the 401", gap.Round(time.Millisecond))
	if gap > 2500*time.Millisecond {
		t.Errorf("first probe %s after the 401 that opened the circuit", gap.Round(time.Millisecond))
	}
	e.emu.SetFaults(emulator.Faults{})
	e.emu.ClearFaultsFor(proj, "s1", "first")
	e.out.wait(t, 6, 30*time.Second)
	allStopped(t, byID(t, e.out.outcomes(t)))
	e.noDeadLetters(t)
}

func TestCircuitOpensWhenDLFIsDown(t *testing.T) {
	// Not parallel: a port this test frees and listens on again could be
	// taken meanwhile by a listener of a test running beside it.
	e := newEnv(t, func(c *Config) { c.RetryInitial = 50 * time.Millisecond; c.RetryMax = 200 * time.Millisecond })
	e.emu.SetFaults(emulator.Faults{Down: true})
	r := e.startWorker(nil)
	e.publishMany(t, 30, "d")
	r.waitCircuitOpen(t)
	e.emu.SetFaults(emulator.Faults{})
	e.out.wait(t, 30, 20*time.Second)
	allStopped(t, byID(t, e.out.outcomes(t)))
	e.noDeadLetters(t)
}

// A 429 pauses every call of the worker for Retry-After, not just the
// one that got it.
func TestThrottlePausesEveryCall(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.Concurrency = 8 })
	e.emu.SetFaults(emulator.Faults{Throttle: true, RetryAfter: time.Second})
	e.startWorker(nil)
	e.publishMany(t, 20, "t")
	testutil.Eventually(t, 10*time.Second, func() error {
		if n := e.emu.StopCalls(); n < 12 {
			return fmt.Errorf("%d calls", n)
		}
		return nil
	})
	e.emu.SetFaults(emulator.Faults{})
	e.out.wait(t, 20, 20*time.Second)
	allStopped(t, byID(t, e.out.outcomes(t)))
	// After each 429, no request may start within ~1s except those that
	// were already on the wire (at most the concurrency).
	reqs := e.emu.Requests()
	sort.Slice(reqs, func(a, b int) bool { return reqs[a].Time.Before(reqs[b].Time) })
	first429 := -1
	for i, rq := range reqs {
		if rq.Status == 429 {
			first429 = i
			break
		}
	}
	if first429 < 0 {
		t.Fatal("no 429 seen")
	}
	t0 := reqs[first429].Time
	within := 0
	for _, rq := range reqs[first429+1:] {
		if rq.Time.Sub(t0) < 900*time.Millisecond {
			within++
		}
	}
	if within > 8 {
		t.Errorf("%d requests within 900ms after the first 429; the pause did not apply to all", within)
	}
}

func TestRateLimit(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.RateLimit = 20; c.RateBurst = 1; c.Concurrency = 16 })
	e.startWorker(nil)
	const n = 30
	e.publishMany(t, n, "rl")
	e.out.wait(t, n, 20*time.Second)
	reqs := e.emu.Requests()
	sort.Slice(reqs, func(a, b int) bool { return reqs[a].Time.Before(reqs[b].Time) })
	span := reqs[len(reqs)-1].Time.Sub(reqs[0].Time)
	rate := float64(len(reqs)-1) / span.Seconds()
	t.Logf("rate limit 20/s: %d requests over %s = %.1f/s", len(reqs), span.Round(time.Millisecond), rate)
	if rate > 22 {
		t.Errorf("request rate %.1f/s above DLF_RATE_LIMIT 20", rate)
	}
	// And not far below it: the calls take their tokens one at a time
	// (throttle.turn), which must not slow them down.
	if rate < 15 {
		t.Errorf("request rate %.1f/s well below DLF_RATE_LIMIT 20", rate)
	}
}

var _ = command.MaxBodySize

// Every held command ran out of time while the circuit was open; the
// worker must still probe (with a fetched command) and recover once DLF
// does, instead of staying paused.
func TestCircuitRecoversWhenNothingIsHeld(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) {
		c.RetryMaxElapsed = 1500 * time.Millisecond
		c.RetryInitial = 100 * time.Millisecond
		c.RetryMax = 300 * time.Millisecond
	})
	e.emu.SetFaults(emulator.Faults{AuthFail: true})
	r := e.startWorker(nil)
	e.publishMany(t, 3, "old")
	e.out.wait(t, 3, 20*time.Second) // all retries_exhausted while open
	// Open, with nothing held (found by review: the test passed with a
	// circuit that never opened).
	if got := gaugeValue(r.w.m.circuitOpen); got != 1 {
		t.Fatalf("circuit gauge %v after every command met 401; want open", got)
	}
	e.emu.SetFaults(emulator.Faults{})
	e.publishMany(t, 3, "new")
	e.out.wait(t, 6, 20*time.Second)
	got := byID(t, e.out.outcomes(t))
	for _, id := range []string{"new-0", "new-1", "new-2"} {
		if got[id].Status != StatusStopped {
			t.Errorf("%s: %+v", id, got[id])
		}
	}
	testutil.Eventually(t, 5*time.Second, func() error {
		if ok, why := r.w.Readiness(); !ok {
			return fmt.Errorf("not ready: %s", why)
		}
		return nil
	})
}

// An operator deletes the state bucket while the worker runs: the worker
// creates it again, as at start-up, and commands go on being decided
// instead of being returned for ever.
func TestStateBucketDeletedWhileRunning(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.RetryInitial = 100 * time.Millisecond })
	r := e.startWorker(nil)
	e.emu.AddRunning(proj, "", "s1", "before")
	e.publish(body(t, map[string]any{"command_id": "before", "project_id": proj, "script_name": "s1", "instance_id": "before"}), nil)
	e.out.wait(t, 1, 10*time.Second)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.js.DeleteKeyValue(ctx, "dlf_stop_state"); err != nil {
		t.Fatal(err)
	}
	// First in line, so it surely meets the missing bucket: an instance
	// DLF does not know. Its DLF.6205 is a plain failure; had the command
	// been returned for the failed read, its next delivery would take
	// the 6205 for the answer to an unanswered call (already_stopped).
	e.publish(body(t, map[string]any{"command_id": "unknown", "project_id": proj, "script_name": "s1", "instance_id": "i-404"}), nil)
	for i := 0; i < 20; i++ {
		id := fmt.Sprintf("after-%d", i)
		e.emu.AddRunning(proj, "", "s1", id)
		e.publish(body(t, map[string]any{"command_id": id, "project_id": proj, "script_name": "s1", "instance_id": id}), nil)
	}
	e.out.wait(t, 22, 20*time.Second)
	for id, o := range byID(t, e.out.outcomes(t)) {
		want := [2]string{StatusStopped, CauseOK}
		if id == "unknown" {
			want = [2]string{StatusFailed, CauseDLFError}
		}
		if o.Status != want[0] || o.Cause != want[1] {
			t.Errorf("%s: %+v, want %v", id, o, want)
		}
	}
	if _, err := e.js.KeyValue(ctx, "dlf_stop_state"); err != nil {
		t.Errorf("state bucket after the run: %v", err)
	}
	// Only a failed lookup or write makes the worker look for the bucket.
	if got := testutilCount(r.w.m.stateReadErr) + testutilCount(r.w.m.publishFail.WithLabelValues("state")); got == 0 {
		t.Error("no command met the missing bucket, yet it was created again")
	}
	if got := testutilCount(r.w.m.returned.WithLabelValues("state_unavailable")); got != 0 {
		t.Errorf("%v commands returned for a bucket that was back within a second", got)
	}
	// The dead letter is stored before the command's ack, but the
	// collector may read it after the outcomes: wait for it.
	if msgs := e.dead.wait(t, 1, 10*time.Second); len(msgs) != 1 {
		t.Errorf("%d dead letters, want 1 (the unknown instance)", len(msgs))
	}
}

// Another replica's call stopped the instance just before this one's got
// there: this call gets DLF.6205 before that replica has stored its
// outcome and recorded the stop, half a second later. The DLF.6205 waits
// for the record (stopRecordWait) instead of failing at once (found by
// review: with two or three replicas, one of the commands for an instance
// stopped at once was often dead-lettered).
func TestStopRecordedJustAfterTheDLF6205ExplainsIt(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	st := e.state(t)
	var calls atomic.Int32
	url := answer6205(t, &calls, func(context.Context) error {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			timer := time.NewTimer(500 * time.Millisecond) // the other replica stores its outcome first
			defer timer.Stop()
			<-timer.C
			if err := stopRecordedBy(st, "other")(ctx); err != nil {
				t.Errorf("recording the other replica's stop: %v", err)
			}
		}()
		return nil
	})
	e.startWorkerAt(url, nil)
	e.publish(body(t, map[string]any{"command_id": "late", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	e.explained6205(t, &calls, 1)
}

// A shutdown while a DLF.6205 waits for that record returns the command
// undecided: failing it then would dead-letter a stop the record may yet
// explain (found by review: it was decided failed and kept as a pending
// outcome, which the next delivery published without looking again).
func TestShutdownWhileADLF6205WaitsForARecordReturnsIt(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.ShutdownTimeout = 200 * time.Millisecond })
	var calls atomic.Int32
	answered := make(chan struct{})
	url := answer6205(t, &calls, func(context.Context) error {
		if calls.Load() == 1 {
			close(answered)
		}
		return nil
	})
	r := e.startWorkerAt(url, nil)
	e.publish(body(t, map[string]any{"command_id": "late", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	<-answered
	r.stop(t)
	if n := e.pubs.count(); n != 0 {
		t.Fatalf("%d outcome events published at the shutdown; want the command returned undecided", n)
	}
	e.noDeadLetters(t)
	st := e.state(t)
	if rec := loadDoc(t, st, i1Key()); rec.doc.Cmds["late"] != nil && rec.doc.Cmds["late"].Phase != phaseAnswered {
		t.Errorf("state of late = %+v; want at most an answered entry, no decision", rec.doc.Cmds["late"])
	}
	// The other replica's record comes; the next worker reads it first.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := stopRecordedBy(st, "other")(ctx); err != nil {
		t.Fatal(err)
	}
	e.startWorkerAt(url, nil)
	o := e.single(t)
	if o.Status != StatusStopped || o.Cause != CauseAlreadyStopped {
		t.Errorf("outcome %s/%s; want stopped/already_stopped", o.Status, o.Cause)
	}
	if n := calls.Load(); n != 1 {
		t.Errorf("%d DLF calls; want only the first, the record read before any other", n)
	}
}

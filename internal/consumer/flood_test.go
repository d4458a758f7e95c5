package consumer

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dlf-stop/worker/internal/command"
)

// A flood of commands for one instance (a scheduler that kept sending the
// same stop while no worker ran) is fetched at once, and every one of them
// records its decision in that instance's document. The worker writes the
// records of one document together, so that they do not each lose
// compare-and-set to the others and wait out growing retries, their
// commands held all the while. And every command but the one whose call
// stopped the instance ends already_stopped, also those whose DLF.6205
// came before that stop was recorded (see siblings).
func TestFloodOfOneInstanceDrains(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "", "s1", "i-flood")
	const n = 300
	for i := 0; i < n; i++ {
		e.publish(body(t, map[string]any{"command_id": "f-" + strconv.Itoa(i), "project_id": proj,
			"script_name": "s1", "instance_id": "i-flood"}), nil)
	}
	start := time.Now()
	r := e.startWorker(nil)
	e.out.wait(t, n, 30*time.Second)
	e.stopStreamEmpty(t)
	took := time.Since(start)
	outs := byID(t, e.out.outcomes(t))
	counts := map[string]int{}
	for _, o := range outs {
		counts[o.Status+"/"+o.Cause]++
	}
	retried := testutilCount(r.w.m.publishFail.WithLabelValues("state"))
	t.Logf("flood commands=%d took=%s outcomes=%v dlf_calls=%d decision_retries=%v",
		n, took.Round(time.Millisecond), counts, e.emu.StopCalls(), retried)
	if counts[StatusStopped+"/"+CauseOK] != 1 {
		t.Errorf("%d commands stopped the instance, want 1", counts[StatusStopped+"/"+CauseOK])
	}
	if retried != 0 {
		t.Errorf("%v decision records had to be tried again", retried)
	}
	// The calls that met DLF.6205 did so because the first one stopped
	// the instance, which this worker saw even before it was recorded.
	if n := counts[StatusFailed+"/"+CauseDLFError]; n != 0 {
		t.Errorf("%d commands failed on DLF.6205 although a command of the same worker had stopped the instance", n)
	}
}

// Two workers share a flood for one instance: each writes its records of
// the document together, and the two meet in compare-and-set, where the
// loser reads the document again and merges all its records into it. None
// may be lost: every command's decision is in the document.
func TestFloodOfOneInstanceSharedByTwoWorkers(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "", "s1", "i-flood")
	const n = 200 // below maxCmdEntries: no entry is dropped for room
	for i := 0; i < n; i++ {
		e.publish(body(t, map[string]any{"command_id": "f-" + strconv.Itoa(i), "project_id": proj,
			"script_name": "s1", "instance_id": "i-flood"}), nil)
	}
	a, b := e.startWorker(nil), e.startWorker(nil)
	e.out.wait(t, n, 30*time.Second)
	e.stopStreamEmpty(t)
	// One stopped it; every other command's DLF.6205 is explained, by
	// the other worker's record too (found by review: this test checked
	// only the records, and passed with a command dead-lettered).
	allStopped(t, byID(t, e.out.outcomes(t)))
	e.noDeadLetters(t)
	rec, err := e.state(t).load(context.Background(),
		instKey(command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-flood"}.InstanceKey()))
	if err != nil {
		t.Fatal(err)
	}
	if rec.doc.StoppedBy == "" {
		t.Error("the document does not say who stopped the instance")
	}
	for i := 0; i < n; i++ { // the one that stopped it is recorded as stopped_by
		id := "f-" + strconv.Itoa(i)
		if en := rec.doc.Cmds[id]; id != rec.doc.StoppedBy && (en == nil || en.Phase != phaseDecided) {
			t.Errorf("%s: entry %+v, want decided", id, en)
		}
	}
	t.Logf("shared flood commands=%d decision_retries=%v+%v", n,
		testutilCount(a.w.m.publishFail.WithLabelValues("state")), testutilCount(b.w.m.publishFail.WithLabelValues("state")))
}

// A decision record whose change panics fails that record, and the
// document's next record is still written: the key must not stay busy for
// good, holding every later command for its instance.
func TestPanickingRecordLeavesTheDocumentFree(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	st, _ := e.stateWithWriter(t)
	result := func() (func(), func(error), chan error) {
		done := make(chan error, 1)
		return func() { done <- nil }, func(err error) { done <- err }, done
	}
	wait := func(done chan error) error {
		select {
		case err := <-done:
			return err
		case <-time.After(10 * time.Second):
			t.Fatal("the record was never answered")
			return nil
		}
	}
	ok, failed, first := result()
	st.saveAsync(context.Background(), &stateRecord{key: "inst.p"}, funcSave{func(*stateDoc) { panic("test: broken change") }, ok, failed})
	if err := wait(first); err == nil || !strings.Contains(err.Error(), "panic") {
		t.Fatalf("panicking record: %v, want a failure naming the panic", err)
	}
	ok, failed, second := result()
	st.saveAsync(context.Background(), &stateRecord{key: "inst.p"}, funcSave{func(d *stateDoc) {
		d.setCmd("next", cmdEntry{Phase: phaseDecided, Status: StatusStopped}, time.Hour)
	}, ok, failed})
	if err := wait(second); err != nil {
		t.Fatalf("the next record: %v", err)
	}
}

// A document holding a command entry written as null (by hand, or by
// another program) is read without it: deciding commands for its instance
// goes on.
func TestNullEntryInADocumentIsIgnored(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "", "s1", "i-null")
	key := instKey(command.Command{ProjectID: proj, ScriptName: "s1", InstanceID: "i-null"}.InstanceKey())
	if _, err := e.state(t).kv.Put(context.Background(), key, []byte(`{"cmds":{"x":null}}`)); err != nil {
		t.Fatal(err)
	}
	e.startWorker(nil)
	// One at a time, so that each reads the document the one before
	// wrote, null entry and all.
	for i := 1; i <= 3; i++ {
		e.publish(body(t, map[string]any{"command_id": "null-" + strconv.Itoa(i), "project_id": proj,
			"script_name": "s1", "instance_id": "i-null"}), nil)
		e.out.wait(t, i, 15*time.Second)
	}
	e.stopStreamEmpty(t)
	allStopped(t, byID(t, e.out.outcomes(t)))
}

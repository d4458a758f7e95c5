package consumer

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/dlf-stop/worker/internal/command"
)

// A flood of commands for one instance (a scheduler that kept sending the
// same stop while no worker ran) is fetched at once, and every one of them
// records its decision in that instance's document. The worker writes the
// records of one document together, so that they do not each lose
// compare-and-set to the others and wait out growing retries, their
// commands held all the while.
func TestFloodOfOneInstanceDrains(t *testing.T) {
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
}

// Two workers share a flood for one instance: each writes its records of
// the document together, and the two meet in compare-and-set, where the
// loser reads the document again and merges all its records into it. None
// may be lost: every command's decision is in the document.
func TestFloodOfOneInstanceSharedByTwoWorkers(t *testing.T) {
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

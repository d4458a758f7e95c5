package consumer

import (
	"context"
	"encoding/json"
	"maps"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestPruneDropsOldEntries(t *testing.T) {
	t.Parallel()
	const now = 1_800_000_000
	d := stateDoc{Cmds: map[string]*cmdEntry{
		"old":      {Phase: phaseDecided, At: now - 3601},
		"recent":   {Phase: phaseDecided, At: now - 3599},
		"undated":  {Phase: phaseDecided}, // written before entries had a time
		"old-busy": {Phase: phaseAnswered, At: now - 7200},
	}}
	d.setCmd("new", cmdEntry{Phase: phaseDecided, At: now}, time.Hour)
	for _, id := range []string{"recent", "undated", "new"} {
		if d.Cmds[id] == nil {
			t.Errorf("%s dropped", id)
		}
	}
	for _, id := range []string{"old", "old-busy"} {
		if d.Cmds[id] != nil {
			t.Errorf("%s kept, older than the TTL", id)
		}
	}
}

// A scheduler that sends the same stop again and again leaves an entry per
// command; the document keeps the newest decided ones and every command
// still in progress.
func TestPruneBoundsTheDocument(t *testing.T) {
	t.Parallel()
	const now = 1_800_000_000
	d := stateDoc{Cmds: map[string]*cmdEntry{}}
	for i := 0; i < 10; i++ {
		d.Cmds["busy-"+strconv.Itoa(i)] = &cmdEntry{Phase: phaseAnswered, At: now - 5000}
	}
	dropped := map[string]cmdEntry{}
	for i := 0; i < 3*maxCmdEntries; i++ {
		for id, e := range d.setCmd("c-"+strconv.Itoa(i), cmdEntry{Phase: phaseDecided, Status: StatusFailed, At: now - 3*maxCmdEntries + int64(i)}, 24*time.Hour) {
			dropped[id] = e
		}
	}
	if len(d.Cmds) != maxCmdEntries {
		t.Fatalf("%d entries, want %d", len(d.Cmds), maxCmdEntries)
	}
	// Every decided entry dropped for room is handed back, to be indexed.
	for i := 0; i < 3*maxCmdEntries; i++ {
		id := "c-" + strconv.Itoa(i)
		if _, kept := d.Cmds[id]; kept == (dropped[id].Phase == phaseDecided) {
			t.Fatalf("%s: kept %v, reported dropped %+v", id, kept, dropped[id])
		}
	}
	for i := 0; i < 10; i++ {
		if d.Cmds["busy-"+strconv.Itoa(i)] == nil {
			t.Errorf("busy-%d dropped while in progress", i)
		}
	}
	newest := 3*maxCmdEntries - 1
	for i := newest; i > newest-(maxCmdEntries-10); i-- {
		if d.Cmds["c-"+strconv.Itoa(i)] == nil {
			t.Fatalf("c-%d dropped, one of the newest", i)
		}
	}
	if d.Cmds["c-0"] != nil {
		t.Error("c-0 kept, the oldest")
	}
}

// Pending entries carry their outcomes: a document of them and decided
// entries stays within maxDocBytes, the oldest decided entries dropped
// (and handed back, to be indexed) for room, every pending one kept
// (found by review: the document outgrew what a message may hold).
func TestPruneBoundsTheDocumentByBytes(t *testing.T) {
	t.Parallel()
	const now = 1_800_000_000
	d := stateDoc{Cmds: map[string]*cmdEntry{}}
	big := strings.Repeat("x", 5000)
	for i := 0; i < 100; i++ {
		d.Cmds["old-"+strconv.Itoa(i)] = &cmdEntry{Phase: phaseDecided, Status: StatusFailed, Cause: big, At: now - 1000 + int64(i)}
	}
	outcome := json.RawMessage(`{"error_msg":"` + strings.Repeat("y", 10000) + `"}`)
	dropped := map[string]cmdEntry{}
	for i := 0; i < 40; i++ {
		maps.Copy(dropped, d.setCmd("p-"+strconv.Itoa(i), cmdEntry{Phase: phasePending, Outcome: outcome, At: now}, 24*time.Hour))
		b, err := json.Marshal(&d)
		if err != nil {
			t.Fatal(err)
		}
		if len(b) > maxDocBytes {
			t.Fatalf("after %d pending entries the document takes %d bytes, over %d", i+1, len(b), maxDocBytes)
		}
	}
	for i := 0; i < 40; i++ {
		if d.Cmds["p-"+strconv.Itoa(i)] == nil {
			t.Errorf("pending p-%d dropped", i)
		}
	}
	if len(dropped) == 0 {
		t.Fatal("nothing dropped; the test shows nothing")
	}
	for i := 0; i < len(dropped); i++ { // the oldest, in order
		if _, ok := dropped["old-"+strconv.Itoa(i)]; !ok || d.Cmds["old-"+strconv.Itoa(i)] != nil {
			t.Errorf("old-%d: dropped %v, kept %v; want the %d oldest dropped", i, ok, d.Cmds["old-"+strconv.Itoa(i)] != nil, len(dropped))
		}
	}
}

// sizeBound is a bound: a document with every text field full of
// characters JSON escapes takes no more.
func TestSizeBoundIsABound(t *testing.T) {
	t.Parallel()
	worst := strings.Repeat("<", 1000)
	out, err := json.Marshal(map[string]string{"reason": worst, "error_msg": worst, "detail": worst})
	if err != nil {
		t.Fatal(err)
	}
	mr := uint64(1<<64 - 1)
	d := stateDoc{StoppedBy: worst, StoppedAt: worst, StoppedT: 1 << 62, Cmds: map[string]*cmdEntry{}}
	for i := 0; i < 5; i++ {
		d.Cmds[worst+strconv.Itoa(i)] = &cmdEntry{Phase: phasePending, Attempts: 1 << 62, Unanswered: true, Delivery: 1 << 63,
			Status: worst, Cause: worst, Outcome: out, OutcomeStored: true, At: 1 << 62, LastHTTPStatus: 599,
			LastErrorCode: worst, LastErrorMsg: worst, LastRequestID: worst, Seq: 1 << 63, Inst: worst, Held: true, MarkRev: &mr}
	}
	b, err := json.Marshal(&d)
	if err != nil {
		t.Fatal(err)
	}
	if bound := d.sizeBound(); len(b) > bound {
		t.Errorf("encoded %d bytes, over the bound %d", len(b), bound)
	}
}

// Progress of one delivery never overwrites the decision of another.
func TestProgressDoesNotUndoADecision(t *testing.T) {
	t.Parallel()
	d := stateDoc{StoppedBy: "s", Cmds: map[string]*cmdEntry{
		"f": {Phase: phaseDecided, Status: StatusFailed},
		"p": {Phase: phasePending, Attempts: 2},
		"q": {Phase: phasePending, Attempts: 2},
	}}
	d.setProgress("f", cmdEntry{Phase: phaseAnswered, Attempts: 3}, time.Hour)
	d.setProgress("p", cmdEntry{Phase: phaseAnswered, Attempts: 3}, time.Hour)
	d.setProgress("q", cmdEntry{Phase: phasePending, Attempts: 3}, time.Hour)
	if e := d.Cmds["p"]; e.Phase != phasePending || e.Attempts != 2 {
		t.Errorf("p = %+v, pending outcome undone", e)
	}
	if e := d.Cmds["q"]; e.Phase != phasePending || e.Attempts != 3 {
		t.Errorf("q = %+v, a later pending outcome not recorded", e)
	}
	d.setProgress("s", cmdEntry{Phase: phaseAnswered, Attempts: 3}, time.Hour)
	d.setProgress("n", cmdEntry{Phase: phaseAnswered, Attempts: 1}, time.Hour)
	if e := d.Cmds["f"]; e.Phase != phaseDecided {
		t.Errorf("f = %+v, decision undone", e)
	}
	if d.Cmds["s"] != nil {
		t.Errorf("s, which stopped the instance, got an entry %+v", d.Cmds["s"])
	}
	if e := d.Cmds["n"]; e == nil || e.Phase != phaseAnswered {
		t.Errorf("n = %+v", e)
	}
}

// A stop is remembered for STATE_TTL, however often the document is
// written for other commands since.
func TestPruneForgetsAnOldStop(t *testing.T) {
	t.Parallel()
	const now = 1_800_000_000
	old := stateDoc{StoppedBy: "first", StoppedAt: "then", StoppedT: now - 3601}
	old.setCmd("later", cmdEntry{Phase: phaseDecided, At: now}, time.Hour)
	if old.StoppedBy != "" || old.StoppedAt != "" || old.StoppedT != 0 {
		t.Errorf("stop recorded 3601 s ago kept with a TTL of 1 h: %+v", old)
	}
	for _, d := range []stateDoc{
		{StoppedBy: "first", StoppedT: now - 3599},
		{StoppedBy: "first"}, // written before stops had a time
	} {
		d.setCmd("later", cmdEntry{Phase: phaseDecided, At: now}, time.Hour)
		if d.StoppedBy != "first" {
			t.Errorf("stop dropped before its TTL: %+v", d)
		}
	}
}

// Writers of one key that lose compare-and-set to each other all land in
// the end: commands for one instance handed back at once, or decided by
// several workers, each re-read and write again (found by review: with
// eight tries and no pause between them, 9 of 24 failed).
func TestConcurrentWritersOfOneKeyAllLand(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	st := e.state(t)
	const n = 24
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	errs := make(chan error, n)
	for i := range n {
		go func() {
			r, err := st.load(ctx, instKey("k"))
			if err != nil {
				errs <- err
				return
			}
			errs <- st.save(ctx, r, func(d *stateDoc) {
				if d.Cmds == nil {
					d.Cmds = map[string]*cmdEntry{}
				}
				d.Cmds["c"+strconv.Itoa(i)] = &cmdEntry{Phase: phaseAnswered, Attempts: 1}
			})
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	r, err := st.load(ctx, instKey("k"))
	if err != nil {
		t.Fatal(err)
	}
	if len(r.doc.Cmds) != n {
		t.Fatalf("%d entries stored, want %d", len(r.doc.Cmds), n)
	}
}

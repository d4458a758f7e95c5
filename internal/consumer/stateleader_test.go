package consumer

import (
	"context"
	"testing"
	"time"
)

// The leader read gives what the batched direct read gives: a missing key
// as an empty document at revision 0, a written one with its revision and
// document, a deleted one as an empty document at the revision of its
// delete marker (what a compare-and-set write must name), in the order
// asked; a bucket that does not exist is an error, not an empty document.
func TestLeaderRead(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	st := e.state(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := st.putEntry(ctx, "inst.k1", "c", cmdEntry{Phase: phaseDecided, Attempts: 3}); err != nil {
		t.Fatal(err)
	}
	want, err := st.load(ctx, "inst.k1")
	if err != nil {
		t.Fatal(err)
	}
	kv, err := e.js.KeyValue(ctx, "dlf_stop_state")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "inst.gone", []byte(`{"stopped_by":"x"}`)); err != nil {
		t.Fatal(err)
	}
	if err := kv.Delete(ctx, "inst.gone"); err != nil {
		t.Fatal(err)
	}
	lr := newLeaderReader(e.nc, "dlf_stop_state")
	recs, err := lr.read(ctx, []string{"cmd.none", "inst.k1", "inst.gone"})
	if err != nil {
		t.Fatal(err)
	}
	if r := recs[0]; r.key != "cmd.none" || r.rev != 0 || r.doc.Cmds != nil {
		t.Errorf("missing key read as %+v", r)
	}
	if r := recs[1]; r.key != "inst.k1" || r.rev != want.rev || r.doc.Cmds["c"] == nil || r.doc.Cmds["c"].Attempts != 3 {
		t.Errorf("inst.k1 read as rev %d %+v, want rev %d", r.rev, r.doc, want.rev)
	}
	if r := recs[2]; r.rev <= want.rev || r.doc.StoppedBy != "" {
		t.Errorf("deleted key read as rev %d %+v, want its delete marker's revision and an empty document", r.rev, r.doc)
	}
	if _, err := newLeaderReader(e.nc, "no_such_bucket").read(ctx, []string{"cmd.x"}); err == nil {
		t.Error("a bucket that does not exist read without an error")
	}
}

// A stream that answers no leader read (no leader: an election, a lost
// quorum; here a reader aimed at a stream that does not exist) does not
// leave the re-read after a DLF.6205 without an answer: it falls back to
// the reading every lookup uses.
func TestLeaderReadFallsBack(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	st := e.state(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := st.putEntry(ctx, "inst.k1", "c", cmdEntry{Phase: phaseDecided, Attempts: 2}); err != nil {
		t.Fatal(err)
	}
	st.leader = newLeaderReader(e.nc, "no_such_bucket")
	recs, err := st.lookupLeader(ctx, []string{"inst.k1"})
	if err != nil {
		t.Fatalf("no fallback: %v", err)
	}
	if e := recs[0].doc.Cmds["c"]; e == nil || e.Attempts != 2 {
		t.Errorf("fallback read %+v", recs[0].doc)
	}
}

package consumer

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

// stateWithWriter binds the state bucket with an asynchronous writer, as
// a running worker has it.
func (e *env) stateWithWriter(t *testing.T) (*stateStore, *stateWriter) {
	t.Helper()
	st := e.state(t)
	w, err := newStateWriter(e.nc, "dlf_stop_state")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.close)
	st.writer = w
	return st, w
}

type writeResult struct {
	rev uint64
	err error
}

func writeAndWait(t *testing.T, w *stateWriter, key, value string, rev uint64, timeout time.Duration) writeResult {
	t.Helper()
	res := make(chan writeResult, 1)
	w.write(key, []byte(value), rev, timeout, func(rev uint64, err error) { res <- writeResult{rev, err} })
	select {
	case r := <-res:
		return r
	case <-time.After(10 * time.Second):
		t.Fatalf("write of %s never answered", key)
		return writeResult{}
	}
}

// The writer's answers say what JetStream did: stored at a revision,
// refused because the key moved (compare-and-set), or refused otherwise.
func TestStateWriterAnswers(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	st, w := e.stateWithWriter(t)

	first := writeAndWait(t, w, "inst.a", `{"stopped_by":"c1"}`, 0, 5*time.Second)
	if first.err != nil || first.rev == 0 {
		t.Fatalf("create: rev %d, %v", first.rev, first.err)
	}
	r, err := st.load(context.Background(), "inst.a")
	if err != nil || r.rev != first.rev || r.doc.StoppedBy != "c1" {
		t.Fatalf("stored: rev %d (want %d) %+v, %v", r.rev, first.rev, r.doc, err)
	}

	// A second create of the same key, and an update at a stale revision,
	// are compare-and-set refusals.
	if again := writeAndWait(t, w, "inst.a", `{"stopped_by":"c2"}`, 0, 5*time.Second); !errors.Is(again.err, errWrongRevision) {
		t.Fatalf("second create: %v, want errWrongRevision", again.err)
	}
	next := writeAndWait(t, w, "inst.a", `{"stopped_by":"c1","cmds":{"c2":{"p":"decided"}}}`, first.rev, 5*time.Second)
	if next.err != nil || next.rev <= first.rev {
		t.Fatalf("update: rev %d, %v", next.rev, next.err)
	}
	if stale := writeAndWait(t, w, "inst.a", `{}`, first.rev, 5*time.Second); !errors.Is(stale.err, errWrongRevision) {
		t.Fatalf("stale update: %v, want errWrongRevision", stale.err)
	}

	// A key the bucket refuses (not a valid subject token) fails cleanly.
	bad := writeAndWait(t, w, "inst.a b", `{}`, 0, 5*time.Second)
	if bad.err == nil || errors.Is(bad.err, errWrongRevision) {
		t.Fatalf("invalid key: %v, want a plain failure", bad.err)
	}
}

// A write nobody answers (here a plain subscriber swallows it, as when
// the answer is lost with a connection) fails after its timeout instead
// of holding the command for ever; close fails what is still pending.
func TestStateWriterUnanswered(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	sink, err := e.nc.Subscribe("$KV.nowhere.>", func(*nats.Msg) {})
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Unsubscribe()
	w, err := newStateWriter(e.nc, "nowhere")
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	r := writeAndWait(t, w, "inst.x", `{}`, 0, 200*time.Millisecond)
	if r.err == nil || !strings.Contains(r.err.Error(), "no answer in time") {
		t.Fatalf("unanswered write: %v", r.err)
	}
	if took := time.Since(start); took > 3*writeSweep {
		t.Fatalf("gave up after %s, want within %s", took, 3*writeSweep)
	}

	var mu sync.Mutex
	var errs []error
	for i := 0; i < 3; i++ {
		w.write("inst.y", []byte(`{}`), 0, time.Hour, func(_ uint64, err error) {
			mu.Lock()
			errs = append(errs, err)
			mu.Unlock()
		})
	}
	w.close()
	mu.Lock()
	defer mu.Unlock()
	if len(errs) != 3 {
		t.Fatalf("close answered %d of 3 pending writes", len(errs))
	}
	for _, err := range errs {
		if err == nil {
			t.Fatal("a pending write succeeded after close")
		}
	}
}

// saveAsync after another writer moved the key: the refusal goes through
// save's re-read-and-merge, so neither writer's entry is lost, and the
// merged write is the only one after the refusal (a retry at the refused
// revision could only be refused again).
func TestSaveAsyncMergesAfterConflict(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	st, _ := e.stateWithWriter(t)
	ctx := context.Background()
	writes, err := e.nc.SubscribeSync("$KV.dlf_stop_state.inst.m")
	if err != nil {
		t.Fatal(err)
	}
	defer writes.Unsubscribe()
	if err := e.nc.Flush(); err != nil {
		t.Fatal(err)
	}

	mine, err := st.load(ctx, "inst.m") // read before the other writer
	if err != nil {
		t.Fatal(err)
	}
	if err := st.putEntry(ctx, "inst.m", "other", cmdEntry{Phase: phaseAnswered, Attempts: 2}); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	st.saveAsync(ctx, mine, funcSave{func(d *stateDoc) {
		d.setCmd("me", cmdEntry{Phase: phaseDecided, Status: StatusFailed}, 24*time.Hour)
	}, func() { done <- nil }, func(err error) { done <- err }})
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("saveAsync never finished")
	}
	got, err := st.load(ctx, "inst.m")
	if err != nil {
		t.Fatal(err)
	}
	if got.doc.Cmds["other"] == nil || got.doc.Cmds["me"] == nil || got.doc.Cmds["me"].Phase != phaseDecided {
		t.Fatalf("merged document lost an entry: %+v", got.doc.Cmds)
	}
	if got.rev != mine.rev {
		t.Fatalf("record revision %d, stored %d", mine.rev, got.rev)
	}
	// Every write went out on e.nc before its answer came back, so after
	// a flush the subscription holds them all.
	if err := e.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	if n, _, err := writes.Pending(); err != nil || n != 3 {
		t.Fatalf("%d writes of the key (%v), want 3: the other writer's, the refused one, the merged one", n, err)
	}
}

// putAckedErr is putAcked of a key that does not exist yet, for tests that
// look only at whether the write was stored.
func putAckedErr(w *stateWriter, ctx context.Context, key string, value []byte) error {
	_, err := w.putAcked(ctx, key, value, 0)
	return err
}

// markSent puts a "sent" mark whatever the key holds: for tests that set
// up the mark another delivery left.
func (s *stateStore) markSent(ctx context.Context, sid string, n, seq uint64, inst string) error {
	_, err := s.kv.Put(ctx, cmdKey(sid), sentMarkDoc(sid, n, seq, inst))
	return err
}

// Both of JetStream's codes for a failed compare-and-set are refusals: a
// replicated bucket's leader answers 10164 where one of one replica
// answers 10071, and taken as any other failure a refused mark would
// count as the bucket refusing marks.
func TestWrongRevisionCodes(t *testing.T) {
	t.Parallel()
	for code, want := range map[int]bool{10071: true, 10164: true, 10077: false, 0: false} {
		if got := wrongRevision(code); got != want {
			t.Errorf("wrongRevision(%d) = %v, want %v", code, got, want)
		}
	}
}

// funcSave is a recordSave made of three functions, for tests.
type funcSave struct {
	changeFn func(*stateDoc)
	storedFn func()
	failedFn func(error)
}

func (f funcSave) change(d *stateDoc) { f.changeFn(d) }
func (f funcSave) stored()            { f.storedFn() }
func (f funcSave) failed(err error)   { f.failedFn(err) }

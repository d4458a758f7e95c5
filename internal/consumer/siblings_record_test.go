package consumer

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/dlf-stop/worker/internal/testutil"
)

// A stop this worker noted is forgotten only once a record naming it is
// stored. Here the command whose call stopped the instance follows an
// outcome an earlier delivery of it stored (failed), so its record names
// no stopper; the bucket then explains nothing, and a sibling whose call
// was on the wire with it and gets DLF.6205 after it was acked is still
// explained by the note: stopped, already_stopped, not a dead letter.
func TestSiblingStopNotRecordedOutlivesItsCommand(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	c := e.cfg
	c.setDefaults()
	seqA := make(chan uint64, 1)
	bIn := make(chan struct{})
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch calls.Add(1) {
		case 1: // a: its earlier delivery stored "failed"; this call stops the instance
			if err := storeEarlierOutcome(r.Context(), e, c, <-seqA); err != nil {
				t.Errorf("storing a's earlier outcome: %v", err)
			}
			select {
			case <-bIn: // b's call is on the wire with this one
			case <-r.Context().Done():
				return
			}
			w.WriteHeader(http.StatusNoContent)
		case 2: // b: answered once a is acked (the stream holds b alone)
			close(bIn)
			if err := pollUntil(r.Context(), 10*time.Second, func() bool {
				s, err := e.js.Stream(r.Context(), c.StopStream)
				return err == nil && s.CachedInfo().State.Msgs == 1
			}); err != nil {
				t.Errorf("a was not acked: %v", err)
			}
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusBadRequest)
			_, _ = w.Write([]byte(`{"error_code":"DLF.6205","error_msg":"The script instance is not running."}`))
		default:
			t.Errorf("unexpected DLF call %s", r.URL.Path)
			w.WriteHeader(http.StatusInternalServerError)
		}
	}))
	t.Cleanup(srv.Close)
	e.startWorkerAt(srv.URL, nil)

	seqA <- e.publish(body(t, map[string]any{"command_id": "a", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	testutil.Eventually(t, 10*time.Second, func() error {
		if calls.Load() < 1 {
			return errors.New("a's call has not come")
		}
		return nil
	})
	e.publish(body(t, map[string]any{"command_id": "b", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)

	byID := map[string]Outcome{}
	e.out.wait(t, 2, 20*time.Second)
	for _, o := range e.out.outcomes(t) {
		byID[o.CommandID] = o
	}
	if o := byID["a"]; o.Status != StatusFailed {
		t.Errorf("a = %+v; want the failed outcome its earlier delivery stored", o)
	}
	if o := byID["b"]; o.Status != StatusStopped || o.Cause != CauseAlreadyStopped {
		t.Errorf("b = %+v; want stopped/already_stopped, explained by a's stop", o)
	}
	e.stopStreamEmpty(t)
	// a's record named no stopper; b's (stopped) does.
	if rec := loadDoc(t, e.state(t), i1Key()); rec.doc.StoppedBy != "b" || rec.doc.Cmds["a"] == nil || rec.doc.Cmds["a"].Status != StatusFailed {
		t.Errorf("state = %+v; want a decided failed and the instance recorded as stopped by b", rec.doc)
	}
	if n := e.dead.len(); n != 1 {
		t.Errorf("%d dead letters, want a's alone", n)
	}
}

// storeEarlierOutcome stores, in the outcome stream, a failed outcome of
// the command at stream sequence seq ("a"), as an earlier delivery that
// died before recording it would have.
func storeEarlierOutcome(ctx context.Context, e *env, c Config, seq uint64) error {
	s, err := e.js.Stream(ctx, c.StopStream)
	if err != nil {
		return err
	}
	m, err := s.GetMsg(ctx, seq)
	if err != nil {
		return err
	}
	o := Outcome{CommandID: "a", ProjectID: proj, ScriptName: "s1", InstanceID: "i-1",
		Status: StatusFailed, Cause: CauseDLFError, ErrorCode: "DLF.0100", Attempts: 1,
		ReceivedAt: FormatTime(m.Time), FinishedAt: FormatTime(time.Now()), WorkerID: "earlier"}
	b, err := json.Marshal(o)
	if err != nil {
		return err
	}
	out := nats.NewMsg(c.OutcomePrefix + "." + o.Status)
	out.Data = b
	out.Header.Set(nats.MsgIdHdr, o.CommandID)
	_, err = e.js.PublishMsg(ctx, out)
	return err
}

// pollUntil checks cond every 20 ms until it holds, ctx ends or within
// passes.
func pollUntil(ctx context.Context, within time.Duration, cond func() bool) error {
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			return errors.New("condition not met in time")
		case <-tick.C:
		}
	}
	return nil
}

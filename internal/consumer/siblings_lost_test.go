package consumer

import (
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"
)

// Two commands for one instance on one worker: the first one's call stops
// the instance but its answer is lost; the second one's call, after it,
// gets DLF.6205. The first one's retry gets DLF.6205 too, which its own
// unanswered call explains, and records the stop; the second one's
// DLF.6205 waits for that record (stopRecordWait) and is explained by it
// (found by review: it was dead-lettered, and no command ended ok).
func TestSiblingWhoseAnswerWasLostExplainsTheOthersDLF6205(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "", "s1", "i-lost")
	var calls atomic.Int32
	applied := make(chan struct{})
	h := e.emu.Handler()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch calls.Add(1) {
		case 1:
			h.ServeHTTP(httptest.NewRecorder(), r) // the stop is applied
			close(applied)
			timer := time.NewTimer(300 * time.Millisecond) // the second call gets there first
			defer timer.Stop()
			<-timer.C
			panic(http.ErrAbortHandler) // and this answer is lost
		case 2:
			<-applied
		}
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	e.startWorkerAt(srv.URL, nil)
	for _, id := range []string{"a", "b"} {
		e.publish(body(t, map[string]any{"command_id": id, "project_id": proj, "script_name": "s1", "instance_id": "i-lost"}), nil)
	}
	e.out.wait(t, 2, 20*time.Second)
	e.stopStreamEmpty(t)
	allStopped(t, byID(t, e.out.outcomes(t)))
	e.noDeadLetters(t)
}

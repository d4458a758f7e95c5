package consumer

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/testutil"
)

// One test per row of the decision table (contract section 6), each on a
// real JetStream server and the emulator over HTTP. Each asserts the
// outcome event, the number of DLF calls and the dead letter.

const proj = "proj-1"

func body(t testing.TB, fields map[string]any) []byte {
	t.Helper()
	b, err := json.Marshal(fields)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// settled is single for a command that must be finished with it: acked,
// and its outcome published once. The stored count alone cannot see a
// second publish, which the duplicate window drops (found by review: a
// worker publishing every outcome twice passed the row tests).
func (e *env) settled(t *testing.T) Outcome {
	t.Helper()
	o := e.single(t)
	e.stopStreamEmpty(t)
	// The publishes went out before the ack, on the same connection, so
	// they are counted by now.
	if n := e.pubs.count(); n != 1 {
		t.Errorf("%d outcome events published, want 1", n)
	}
	return o
}

// single waits for exactly one outcome and returns it.
func (e *env) single(t *testing.T) Outcome {
	t.Helper()
	e.out.wait(t, 1, 20*time.Second)
	outs := e.out.outcomes(t)
	if len(outs) != 1 {
		t.Fatalf("want 1 outcome, got %d: %+v", len(outs), outs)
	}
	return outs[0]
}

// stopStreamEmpty asserts every command was acked (work-queue retention
// removes acked messages).
func (e *env) stopStreamEmpty(t *testing.T) {
	t.Helper()
	e.stopStreamHolds(t, 0)
}

// stopStreamHolds waits until the stop stream holds n commands: acks
// reach the server on their own time.
func (e *env) stopStreamHolds(t *testing.T, n uint64) {
	t.Helper()
	testutil.Eventually(t, 10*time.Second, func() error {
		s, err := e.js.Stream(context.Background(), "DLF_STOP")
		if err != nil {
			return err
		}
		if got := s.CachedInfo().State.Msgs; got != n {
			return fmt.Errorf("stop stream holds %d messages, want %d", got, n)
		}
		return nil
	})
}

// updateStream changes an existing stream's configuration, as an operator
// would before the worker starts (the worker uses streams as they are).
func (e *env) updateStream(t *testing.T, name string, change func(*jetstream.StreamConfig)) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := e.js.Stream(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	cfg := s.CachedInfo().Config
	change(&cfg)
	if _, err := e.js.UpdateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
}

// allStopped fails for every outcome that is not stopped.
func allStopped(t *testing.T, outs map[string]Outcome) {
	t.Helper()
	for id, o := range outs {
		if o.Status != StatusStopped {
			t.Errorf("%s: %+v", id, o)
		}
	}
}

func checkTimes(t *testing.T, o Outcome) (received, finished time.Time) {
	t.Helper()
	var err error
	if received, err = time.Parse(time.RFC3339Nano, o.ReceivedAt); err != nil {
		t.Fatalf("received_at %q: %v", o.ReceivedAt, err)
	}
	if finished, err = time.Parse(time.RFC3339Nano, o.FinishedAt); err != nil {
		t.Fatalf("finished_at %q: %v", o.FinishedAt, err)
	}
	if !strings.HasSuffix(o.ReceivedAt, "Z") || !strings.Contains(o.FinishedAt, ".") {
		t.Errorf("times must be UTC with fractional seconds: %q %q", o.ReceivedAt, o.FinishedAt)
	}
	if finished.Before(received) {
		t.Errorf("finished_at %s before received_at %s", finished, received)
	}
	if want := finished.Sub(received).Milliseconds(); o.DurationMS != want {
		t.Errorf("duration_ms = %d, want %d", o.DurationMS, want)
	}
	return received, finished
}

// checkDead asserts the one dead letter holds the original bytes and the
// headers of contract section 5.
func (e *env) checkDead(t *testing.T, o Outcome, original []byte, seq uint64) {
	t.Helper()
	msgs := e.dead.wait(t, 1, 10*time.Second)
	if len(msgs) != 1 {
		t.Fatalf("want 1 dead letter, got %d", len(msgs))
	}
	d := msgs[0]
	if !bytes.Equal(d.Data(), original) {
		t.Errorf("dead letter body differs from the command:\n got %q\nwant %q", d.Data(), original)
	}
	h := d.Headers()
	want := map[string]string{
		nats.MsgIdHdr:         o.CommandID,
		HeaderStatus:          o.Status,
		HeaderCause:           o.Cause,
		HeaderErrorCode:       o.ErrorCode,
		HeaderErrorMsg:        o.ErrorMsg,
		HeaderHTTPStatus:      strconv.Itoa(o.HTTPStatus),
		HeaderAttempts:        strconv.Itoa(o.Attempts),
		HeaderOriginalSubject: "dlf.stop.request",
		HeaderOriginalSeq:     strconv.FormatUint(seq, 10),
		HeaderFailedAt:        o.FinishedAt,
		HeaderDetail:          o.Detail,
	}
	for k, v := range want {
		got, present := h[k]
		if v == "" {
			if present {
				t.Errorf("header %s should be left out, got %q", k, got)
			}
			continue
		}
		if h.Get(k) != v {
			t.Errorf("header %s = %q, want %q", k, h.Get(k), v)
		}
	}
}

func (e *env) noDeadLetters(t *testing.T) {
	t.Helper()
	testutil.Consistently(t, 300*time.Millisecond, func() error {
		if n := e.dead.len(); n != 0 {
			return fmt.Errorf("%d dead letters, want none", n)
		}
		return nil
	})
}

func TestRowStopped(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "ws-1", "etl_脚本.v2", "inst-1")
	e.startWorker(nil)
	e.publish(body(t, map[string]any{"command_id": "c-1", "project_id": proj, "workspace": "ws-1",
		"script_name": "etl_脚本.v2", "instance_id": "inst-1", "reason": "user cancel"}), nil)

	o := e.settled(t)
	if o.Status != StatusStopped || o.Cause != CauseOK || o.HTTPStatus != 204 || o.Attempts != 1 {
		t.Fatalf("outcome = %+v", o)
	}
	if o.CommandID != "c-1" || o.ProjectID != proj || o.Workspace != "ws-1" || o.ScriptName != "etl_脚本.v2" ||
		o.InstanceID != "inst-1" || o.Reason != "user cancel" || o.WorkerID != "test-worker" {
		t.Errorf("echoed fields wrong: %+v", o)
	}
	if o.ErrorCode != "" || o.Detail != "" || o.DLFRequestID == "" {
		t.Errorf("stopped outcome: error_code %q detail %q request id %q", o.ErrorCode, o.Detail, o.DLFRequestID)
	}
	checkTimes(t, o)
	if got := e.out.all()[0].Headers().Get(nats.MsgIdHdr); got != "c-1" {
		t.Errorf("outcome Nats-Msg-Id = %q", got)
	}
	if got := e.out.all()[0].Subject(); got != "dlf.stop.outcome.stopped" {
		t.Errorf("outcome subject = %q", got)
	}
	if n := e.emu.StopCallsFor(proj, "etl_脚本.v2", "inst-1"); n != 1 {
		t.Errorf("DLF calls = %d, want 1", n)
	}
	if !e.emu.Stopped(proj, "etl_脚本.v2", "inst-1") {
		t.Error("instance not stopped in the emulator")
	}
	// The outcome JSON leaves out what has nothing to say.
	raw := string(e.out.all()[0].Data())
	for _, absent := range []string{"error_code", "error_msg", "detail"} {
		if strings.Contains(raw, `"`+absent+`"`) {
			t.Errorf("outcome has %q: %s", absent, raw)
		}
	}
	e.noDeadLetters(t)
	e.stopStreamEmpty(t)
}

func TestRowDLF400(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name     string
		seed     func(*emulator.Emulator)
		wantCode string
	}{
		{"unknown instance DLF.6205", func(*emulator.Emulator) {}, "DLF.6205"},
		{"other workspace DLF.6205", func(m *emulator.Emulator) { m.AddRunning(proj, "ws-other", "s1", "i-1") }, "DLF.6205"},
		{"already finished DLF.6205", func(m *emulator.Emulator) {
			m.AddRunning(proj, "", "s1", "i-1")
			m.SetStatus(proj, "s1", "i-1", "FINISHED")
		}, "DLF.6205"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, nil)
			tc.seed(e.emu)
			e.startWorker(nil)
			b := body(t, map[string]any{"command_id": "c-400", "project_id": proj, "script_name": "s1", "instance_id": "i-1"})
			seq := e.publish(b, nil)
			o := e.settled(t)
			if o.Status != StatusFailed || o.Cause != CauseDLFError || o.HTTPStatus != 400 ||
				o.ErrorCode != tc.wantCode || o.ErrorMsg == "" || o.Attempts != 1 || o.Detail == "" || o.DLFRequestID == "" {
				t.Fatalf("outcome = %+v", o)
			}
			if n := e.emu.StopCallsFor(proj, "s1", "i-1"); n != 1 {
				t.Errorf("DLF calls = %d, want 1 (not retried)", n)
			}
			checkTimes(t, o)
			e.checkDead(t, o, b, seq)
			e.stopStreamEmpty(t)
		})
	}
}

func TestRowOther4xxFailsWithoutRetry(t *testing.T) {
	t.Parallel()
	for _, status := range []int{404, 405, 409, 413, 422} {
		t.Run(strconv.Itoa(status), func(t *testing.T) {
			e := newEnv(t, nil)
			e.emu.AddRunning(proj, "", "s1", "i-1")
			e.emu.SetFaultsFor(proj, "s1", "i-1", emulator.Faults{ErrorRate: 1, ErrorStatus: status})
			e.startWorker(nil)
			b := body(t, map[string]any{"project_id": proj, "script_name": "s1", "instance_id": "i-1"})
			seq := e.publish(b, nil)
			o := e.settled(t)
			if o.Status != StatusFailed || o.Cause != CauseDLFError || o.HTTPStatus != status || o.Attempts != 1 {
				t.Fatalf("outcome = %+v", o)
			}
			if o.CommandID != "DLF_STOP-"+strconv.FormatUint(seq, 10) {
				t.Errorf("command_id = %q, want the stream-sequence default", o.CommandID)
			}
			if n := e.emu.StopCalls(); n != 1 {
				t.Errorf("DLF calls = %d, want 1", n)
			}
			e.checkDead(t, o, b, seq)
		})
	}
}

// A 3xx is an answer, not something to follow: the emulator cannot send
// one, so a plain HTTP server does.
func TestRowRedirectNotFollowed(t *testing.T) {
	t.Parallel()
	var calls, followed int
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/elsewhere") {
			followed++
			w.WriteHeader(204)
			return
		}
		calls++
		http.Redirect(w, r, "/elsewhere", http.StatusFound)
	}))
	t.Cleanup(srv.Close)
	e := newEnv(t, nil)
	e.startWorkerAt(srv.URL, nil)
	b := body(t, map[string]any{"project_id": proj, "script_name": "s1", "instance_id": "i-1"})
	seq := e.publish(b, nil)
	o := e.settled(t)
	if o.Status != StatusFailed || o.Cause != CauseDLFError || o.HTTPStatus != 302 || o.Attempts != 1 {
		t.Fatalf("outcome = %+v", o)
	}
	if followed != 0 || calls != 1 {
		t.Errorf("calls=%d followed=%d, want 1 and 0", calls, followed)
	}
	e.checkDead(t, o, b, seq)
}

// The outcome's error_code, error_msg and dlf_request_id come from the
// last answer DLF sent (contract section 4), and http_status from the last
// attempt: when the last attempts got no answer at all, the status is 0
// but what DLF said before is still reported.
func TestLastAnswerOutlivesUnansweredAttempts(t *testing.T) {
	t.Parallel()
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) == 1 {
			w.Header().Set("X-Request-Id", "req-first")
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte(`{"error_code":"APIG.0201","error_msg":"Backend unavailable"}`))
			return
		}
		hj, ok := w.(http.Hijacker)
		if !ok {
			t.Error("no hijacker")
			return
		}
		if c, _, err := hj.Hijack(); err == nil {
			_ = c.Close() // no answer
		}
	}))
	t.Cleanup(srv.Close)
	e := newEnv(t, func(c *Config) {
		c.RetryMaxElapsed = 2 * time.Second
		c.RetryInitial, c.RetryMax = 100*time.Millisecond, 200*time.Millisecond
	})
	e.startWorkerAt(srv.URL, nil)
	e.publish(body(t, map[string]any{"project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	o := e.settled(t)
	if o.Status != StatusFailed || o.Cause != CauseRetriesExhausted || o.Attempts < 2 {
		t.Fatalf("outcome = %+v; want failed/retries_exhausted after several attempts", o)
	}
	if o.HTTPStatus != 0 || o.ErrorCode != "APIG.0201" || o.ErrorMsg != "Backend unavailable" || o.DLFRequestID != "req-first" {
		t.Errorf("http_status %d, error_code %q, error_msg %q, dlf_request_id %q; want 0 (the last attempt got no answer) and the first answer's APIG.0201, its message and req-first",
			o.HTTPStatus, o.ErrorCode, o.ErrorMsg, o.DLFRequestID)
	}
}

// retryThenHeal injects a fault on one instance, waits until the worker
// has met it at least twice, clears it and expects a stopped outcome.
func retryThenHeal(t *testing.T, f emulator.Faults, mutate func(*Config)) (*env, Outcome) {
	t.Helper()
	e := newEnv(t, mutate)
	e.emu.AddRunning(proj, "", "s1", "i-1")
	e.emu.SetFaultsFor(proj, "s1", "i-1", f)
	e.startWorker(nil)
	e.publish(body(t, map[string]any{"command_id": "c-r", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	testutil.Eventually(t, 20*time.Second, func() error {
		if n := e.emu.StopCallsFor(proj, "s1", "i-1"); n < 2 {
			return fmt.Errorf("%d calls so far", n)
		}
		return nil
	})
	if n := e.out.len(); n != 0 {
		t.Fatalf("an outcome was published while the fault lasted: %+v", e.out.outcomes(t))
	}
	e.emu.ClearFaultsFor(proj, "s1", "i-1")
	o := e.settled(t)
	if o.Status != StatusStopped || o.Cause != CauseOK || o.HTTPStatus != 204 || o.Attempts < 3 {
		t.Fatalf("outcome = %+v", o)
	}
	e.noDeadLetters(t)
	return e, o
}

func TestRowRetriedThenStopped(t *testing.T) {
	// Not parallel: a port this test frees and listens on again could be
	// taken meanwhile by a listener of a test running beside it.
	cases := []struct {
		name string
		f    emulator.Faults
		cfg  func(*Config)
	}{
		{"401 auth", emulator.Faults{AuthFail: true}, nil},
		{"403", emulator.Faults{ErrorRate: 1, ErrorStatus: 403}, nil},
		{"408", emulator.Faults{ErrorRate: 1, ErrorStatus: 408}, nil},
		{"500", emulator.Faults{ErrorRate: 1, ErrorStatus: 500}, nil},
		{"503", emulator.Faults{ErrorRate: 1, ErrorStatus: 503}, nil},
		{"connection closed", emulator.Faults{Down: true}, nil},
		{"timeout", emulator.Faults{Hang: true}, func(c *Config) { c.CallTimeout = 200 * time.Millisecond }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) { retryThenHeal(t, tc.f, tc.cfg) })
	}
}

func TestRowConnectionRefusedRetried(t *testing.T) {
	// Not parallel: a port this test frees and listens on again could be
	// taken meanwhile by a listener of a test running beside it.
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "", "s1", "i-1")
	e.emu.SetFaults(emulator.Faults{Down: true})
	r := e.startWorker(nil)
	e.publish(body(t, map[string]any{"project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	testutil.Eventually(t, 10*time.Second, func() error {
		if got := testutilCount(r.w.m.calls.WithLabelValues("0")); got < 2 {
			return fmt.Errorf("%v refused calls so far", got)
		}
		return nil
	})
	if n := e.out.len(); n != 0 {
		t.Fatal("outcome published while DLF was down")
	}
	e.emu.SetFaults(emulator.Faults{})
	o := e.settled(t)
	if o.Status != StatusStopped || o.Attempts < 3 {
		t.Fatalf("outcome = %+v", o)
	}
}

func TestRow429HonoursRetryAfter(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil) // backoff at most 200ms: any wait of ~1s comes from Retry-After
	e.emu.AddRunning(proj, "", "s1", "i-1")
	e.emu.SetFaultsFor(proj, "s1", "i-1", emulator.Faults{Throttle: true, RetryAfter: time.Second})
	e.startWorker(nil)
	e.publish(body(t, map[string]any{"project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	testutil.Eventually(t, 10*time.Second, func() error {
		if n := e.emu.StopCallsFor(proj, "s1", "i-1"); n < 2 {
			return fmt.Errorf("%d calls", n)
		}
		return nil
	})
	e.emu.ClearFaultsFor(proj, "s1", "i-1")
	o := e.settled(t)
	if o.Status != StatusStopped {
		t.Fatalf("outcome = %+v", o)
	}
	reqs := e.emu.Requests()
	if len(reqs) < 3 {
		t.Fatalf("want >= 3 requests, got %d", len(reqs))
	}
	for i := 1; i < len(reqs); i++ {
		if reqs[i-1].Status != 429 {
			continue
		}
		if gap := reqs[i].Time.Sub(reqs[i-1].Time); gap < 950*time.Millisecond {
			t.Errorf("request %d came %s after a 429 with Retry-After: 1", i, gap)
		}
	}
}

func TestRowRetriesExhausted(t *testing.T) {
	t.Parallel()
	const maxElapsed = 1500 * time.Millisecond
	const callTimeout = 500 * time.Millisecond
	e := newEnv(t, func(c *Config) { c.RetryMaxElapsed = maxElapsed; c.CallTimeout = callTimeout })
	e.emu.AddRunning(proj, "", "s1", "i-1")
	e.emu.SetFaultsFor(proj, "s1", "i-1", emulator.Faults{ErrorRate: 1, ErrorStatus: 503})
	e.startWorker(nil)
	b := body(t, map[string]any{"command_id": "c-x", "project_id": proj, "script_name": "s1", "instance_id": "i-1"})
	seq := e.publish(b, nil)
	o := e.settled(t)
	if o.Status != StatusFailed || o.Cause != CauseRetriesExhausted || o.HTTPStatus != 503 || o.Attempts < 2 {
		t.Fatalf("outcome = %+v", o)
	}
	if n := e.emu.StopCallsFor(proj, "s1", "i-1"); int(n) != o.Attempts {
		t.Errorf("attempts = %d but DLF saw %d calls", o.Attempts, n)
	}
	recv, fin := checkTimes(t, o)
	// Contract: it ends between RETRY_MAX_ELAPSED and RETRY_MAX_ELAPSED +
	// DLF_TIMEOUT after it was stored (plus publishing slack).
	if d := fin.Sub(recv); d < maxElapsed || d > maxElapsed+callTimeout+500*time.Millisecond {
		t.Errorf("gave up after %s, want within [%s, %s]", d, maxElapsed, maxElapsed+callTimeout)
	}
	e.checkDead(t, o, b, seq)
}

// A command already older than RETRY_MAX_ELAPSED when first seen gets
// exactly one call.
func TestRowOldCommandGetsOneCall(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.RetryMaxElapsed = time.Minute })
	e.emu.AddRunning(proj, "", "s1", "i-1")
	e.emu.SetFaultsFor(proj, "s1", "i-1", emulator.Faults{ErrorRate: 1, ErrorStatus: 500})
	e.startWorker(nil, WithClock(func() time.Time { return time.Now().Add(time.Hour) }))
	b := body(t, map[string]any{"project_id": proj, "script_name": "s1", "instance_id": "i-1"})
	seq := e.publish(b, nil)
	o := e.settled(t)
	if o.Status != StatusFailed || o.Cause != CauseRetriesExhausted || o.Attempts != 1 {
		t.Fatalf("outcome = %+v", o)
	}
	if n := e.emu.StopCalls(); n != 1 {
		t.Errorf("DLF calls = %d, want 1", n)
	}
	e.checkDead(t, o, b, seq)
}

func TestRowRejected(t *testing.T) {
	t.Parallel()
	big := bytes.Repeat([]byte("a"), 64<<10+1)
	cases := []struct {
		name, body, field string
	}{
		{"not json", `stop it`, "body"},
		{"not an object", `[1,2]`, "body"},
		{"missing script_name", `{"project_id":"p","instance_id":"i"}`, "script_name"},
		{"dot dot", `{"project_id":"p","script_name":"..","instance_id":"i"}`, "script_name"},
		{"slash", `{"project_id":"p","script_name":"a/b","instance_id":"i"}`, "script_name"},
		{"instance wrong type", `{"project_id":"p","script_name":"s","instance_id":7}`, "instance_id"},
		{"bad deadline", `{"project_id":"p","script_name":"s","instance_id":"i","deadline":"tomorrow"}`, "deadline"},
		{"over 64 KiB", `{"project_id":"p","script_name":"s","instance_id":"i","reason":"` + string(big) + `"}`, "body"},
		{"no project anywhere", `{"script_name":"s","instance_id":"i"}`, "project_id"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, nil)
			e.startWorker(nil)
			seq := e.publish([]byte(tc.body), nats.Header{nats.MsgIdHdr: []string{"bad-1"}})
			o := e.settled(t)
			if o.Status != StatusRejected || o.Cause != CauseInvalidCommand || o.HTTPStatus != 0 || o.Attempts != 0 {
				t.Fatalf("outcome = %+v", o)
			}
			if o.CommandID != "bad-1" {
				t.Errorf("command_id = %q, want the Nats-Msg-Id", o.CommandID)
			}
			if !strings.HasPrefix(o.Detail, tc.field) {
				t.Errorf("detail %q does not name field %q", o.Detail, tc.field)
			}
			if n := e.emu.StopCalls(); n != 0 {
				t.Errorf("DLF calls = %d for an invalid command", n)
			}
			e.checkDead(t, o, []byte(tc.body), seq)
			e.stopStreamEmpty(t)
		})
	}
}

// The zero instant is a valid deadline too, and Go's zero time: it must
// not read as "no deadline".
func TestRowExpiredBeforeFirstCall(t *testing.T) {
	t.Parallel()
	for name, deadline := range map[string]string{
		"a second ago":     time.Now().Add(-time.Second).Format(time.RFC3339),
		"the zero instant": "0001-01-01T01:00:00+01:00",
	} {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t, nil)
			e.emu.AddRunning(proj, "", "s1", "i-1")
			e.startWorker(nil)
			b := body(t, map[string]any{"project_id": proj, "script_name": "s1", "instance_id": "i-1",
				"deadline": deadline})
			seq := e.publish(b, nil)
			o := e.settled(t)
			if o.Status != StatusExpired || o.Cause != CauseDeadlinePassed || o.Attempts != 0 || o.HTTPStatus != 0 || o.Detail == "" {
				t.Fatalf("outcome = %+v", o)
			}
			if n := e.emu.StopCalls(); n != 0 {
				t.Errorf("DLF calls = %d, want 0", n)
			}
			if e.emu.Stopped(proj, "s1", "i-1") {
				t.Error("expired command stopped the instance")
			}
			e.checkDead(t, o, b, seq)
		})
	}
}

func TestRowExpiredWhileRetrying(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "", "s1", "i-1")
	e.emu.SetFaultsFor(proj, "s1", "i-1", emulator.Faults{ErrorRate: 1, ErrorStatus: 503})
	e.startWorker(nil)
	deadline := time.Now().Add(time.Second)
	b := body(t, map[string]any{"project_id": proj, "script_name": "s1", "instance_id": "i-1",
		"deadline": deadline.Format(time.RFC3339Nano)})
	seq := e.publish(b, nil)
	o := e.settled(t)
	if o.Status != StatusExpired || o.Cause != CauseDeadlinePassed || o.Attempts < 1 || o.HTTPStatus != 503 {
		t.Fatalf("outcome = %+v", o)
	}
	_, fin := checkTimes(t, o)
	if fin.After(deadline.Add(time.Second)) {
		t.Errorf("decided at %s, long after the deadline %s", fin, deadline)
	}
	e.checkDead(t, o, b, seq)
}

func TestCommandIDAndDefaults(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.Defaults.ProjectID = "defproj"; c.Defaults.Workspace = "defws" })
	e.emu.AddRunning("defproj", "defws", "s1", "i-1")
	e.emu.AddRunning("defproj", "defws", "s1", "i-2")
	e.emu.AddRunning("defproj", "defws", "s1", "i-3")
	e.emu.AddRunning("defproj", "defws", "s1", "i-4")
	e.startWorker(nil)
	e.publish([]byte(`{"script_name":"s1","instance_id":"i-1"}`), nats.Header{nats.MsgIdHdr: []string{"from-header"}})
	seq := e.publish([]byte(`{"script_name":"s1","instance_id":"i-2"}`), nats.Header{nats.MsgIdHdr: []string{"bad id!"}})
	e.publish([]byte(`{"command_id":"in-body","script_name":"s1","instance_id":"i-3"}`),
		nats.Header{nats.MsgIdHdr: []string{"redrive-1"}, HeaderRedriveOf: []string{"in-body"}})
	// The header present but empty is a redrive still (nats pub -H Dlf-Redrive-Of:).
	e.publish([]byte(`{"command_id":"in-body","script_name":"s1","instance_id":"i-4"}`),
		nats.Header{nats.MsgIdHdr: []string{"redrive-2"}, HeaderRedriveOf: []string{""}})
	e.out.wait(t, 4, 20*time.Second)
	ids := map[string]Outcome{}
	for _, o := range e.out.outcomes(t) {
		ids[o.CommandID] = o
		if o.ProjectID != "defproj" || o.Workspace != "defws" || o.Status != StatusStopped {
			t.Errorf("defaults not applied: %+v", o)
		}
	}
	for _, want := range []string{"from-header", "DLF_STOP-" + strconv.FormatUint(seq, 10), "redrive-1", "redrive-2"} {
		if _, ok := ids[want]; !ok {
			t.Errorf("no outcome with command_id %q; have %v", want, ids)
		}
	}
	for _, r := range e.emu.Requests() {
		if r.Workspace != "defws" || r.Header.Get("X-Project-Id") != "defproj" {
			t.Errorf("request without defaults: workspace %q project %q", r.Workspace, r.Header.Get("X-Project-Id"))
		}
	}
}

var _ = jetstream.MsgIDHeader

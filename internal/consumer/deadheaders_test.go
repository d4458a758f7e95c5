package consumer

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// A dead letter's headers say what its outcome says. NATS headers cannot
// end in white space (nats.go trims them), so an error message cut at its
// limit right after a space, or a detail built around an empty message,
// left the two different (found by review). And dlf_request_id is the
// answer's X-Request-Id only (contract section 4): an error body's
// "request_id" is not taken for it.
func TestDeadLetterHeadersEqualTheOutcome(t *testing.T) {
	t.Parallel()
	bodies := map[string]string{
		"i-long":    `{"error_code":"DLF.6205","error_msg":"` + strings.Repeat("a", 1023) + " " + strings.Repeat("b", 100) + `"}`,
		"i-code":    `{"error_code":"DLF.6201"}`,
		"i-body-id": `{"error_code":"DLF.6201","error_msg":"x","request_id":"from-body"}`,
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		parts := strings.Split(r.URL.Path, "/") // /v1/<project>/scripts/<script>/instances/<instance>/stop
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		_, _ = w.Write([]byte(bodies[parts[len(parts)-2]]))
	}))
	t.Cleanup(srv.Close)
	e := newEnv(t, nil)
	e.startWorkerAt(srv.URL, nil)
	for inst := range bodies {
		e.publish([]byte(`{"command_id":"`+inst+`","project_id":"p1","script_name":"s1","instance_id":"`+inst+`"}`), nil)
	}
	e.out.wait(t, len(bodies), 20*time.Second)
	dead := e.dead.wait(t, len(bodies), 20*time.Second)
	outs := byID(t, e.out.outcomes(t))
	if o := outs["i-long"]; len(o.ErrorMsg) != 1023 {
		t.Errorf("error_msg of %d bytes; want the 1,024 cut to 1,023, without the space it ended in", len(o.ErrorMsg))
	}
	if o := outs["i-code"]; o.Detail != "DLF refused the stop: HTTP 400 DLF.6201" {
		t.Errorf("detail %q", o.Detail)
	}
	if o := outs["i-body-id"]; o.DLFRequestID != "" {
		t.Errorf("dlf_request_id %q, but the answer had no X-Request-Id", o.DLFRequestID)
	}
	for _, d := range dead {
		id := d.Headers().Get("Nats-Msg-Id")
		o, ok := outs[id]
		if !ok {
			t.Fatalf("dead letter %s without an outcome", id)
		}
		for h, want := range map[string]string{HeaderErrorCode: o.ErrorCode, HeaderErrorMsg: o.ErrorMsg, HeaderDetail: o.Detail} {
			if got := d.Headers().Get(h); got != want {
				b, _ := json.Marshal(map[string]string{"header": got, "outcome": want})
				t.Errorf("%s: %s differs from the outcome: %s", id, h, b)
			}
		}
	}
}

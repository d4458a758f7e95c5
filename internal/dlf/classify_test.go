package dlf

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"
	"time"
)

// answer is what Client.Stop returns for a non-2xx status.
func answer(status int, code, msg, reqID string, retryAfter time.Duration) (*Response, error) {
	return &Response{StatusCode: status, RequestID: reqID},
		&APIError{StatusCode: status, ErrorCode: code, ErrorMsg: msg, RequestID: reqID, RetryAfter: retryAfter}
}

func TestClassify(t *testing.T) {
	type row struct {
		name string
		resp *Response
		err  error
		want Verdict
	}
	rows := []row{
		// 2xx: stopped.
		{name: "204", resp: &Response{StatusCode: 204, RequestID: "r"}, want: Verdict{Class: ClassStopped, HTTPStatus: 204, RequestID: "r"}},
		{name: "200", resp: &Response{StatusCode: 200}, want: Verdict{Class: ClassStopped, HTTPStatus: 200}},
		{name: "202", resp: &Response{StatusCode: 202}, want: Verdict{Class: ClassStopped, HTTPStatus: 202}},
		{name: "299", resp: &Response{StatusCode: 299}, want: Verdict{Class: ClassStopped, HTTPStatus: 299}},
	}
	add := func(name string, status int, code string, ra time.Duration, want Verdict) {
		msg := ""
		if code != "" {
			msg = "msg " + code
		}
		resp, err := answer(status, code, msg, "req-"+name, ra)
		want.HTTPStatus, want.ErrorCode, want.ErrorMsg, want.RequestID = status, code, msg, "req-"+name
		rows = append(rows, row{name: name, resp: resp, err: err, want: want})
	}
	failed := Verdict{Class: ClassFailed}
	// 400, any DLF code: failed, Retry-After ignored.
	for _, code := range []string{"DLF.6205", "DLF.6201", "DLF.6888", "DLF.0137", "", "APIG.0101"} {
		add("400 "+code, 400, code, time.Second, failed)
	}
	// Other 4xx except 401, 403, 408, 429: failed.
	for _, s := range []int{402, 404, 405, 406, 409, 410, 411, 412, 413, 414, 415, 418, 421, 422, 425, 428, 431, 451, 499} {
		add(fmt.Sprint(s), s, "", 0, failed)
	}
	// 1xx and 3xx: failed (redirects are not followed).
	for _, s := range []int{100, 101, 103, 199, 300, 301, 302, 303, 304, 307, 308, 399} {
		add(fmt.Sprint(s), s, "", 0, failed)
	}
	// 401, 403: retry, systemic, Retry-After honoured.
	add("401", 401, "APIG.0301", 0, Verdict{Class: ClassRetry, Systemic: true})
	add("401 APIGW", 401, "APIGW.0301", 0, Verdict{Class: ClassRetry, Systemic: true})
	add("403", 403, "APIG.0302", 2*time.Second, Verdict{Class: ClassRetry, Systemic: true, RetryAfter: 2 * time.Second})
	// 408, 429, 5xx: retry with Retry-After.
	add("408", 408, "", 0, Verdict{Class: ClassRetry})
	add("408 retry after", 408, "", 3*time.Second, Verdict{Class: ClassRetry, RetryAfter: 3 * time.Second})
	add("429 APIG.0308", 429, "APIG.0308", 5*time.Second, Verdict{Class: ClassRetry, RetryAfter: 5 * time.Second})
	for _, s := range []int{500, 501, 503, 599} {
		add(fmt.Sprint(s), s, "", time.Second, Verdict{Class: ClassRetry, RetryAfter: time.Second})
	}
	// 502 and 504: a gateway took the request on and got no good answer
	// from behind it, so DLF may have stopped the instance.
	for _, s := range []int{502, 504} {
		add(fmt.Sprint(s), s, "", time.Second, Verdict{Class: ClassRetry, RetryAfter: time.Second, NotAnswered: true})
	}
	// Statuses outside 100-599: retry (assumption).
	add("600", 600, "", 0, Verdict{Class: ClassRetry})
	add("99", 99, "", 0, Verdict{Class: ClassRetry})

	// No answer.
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}
	rows = append(rows,
		row{name: "connection refused", err: &TransportError{Err: refused}, want: Verdict{Class: ClassRetry, Systemic: true}},
		row{name: "reset after send", err: &TransportError{Err: io.ErrUnexpectedEOF, Sent: true}, want: Verdict{Class: ClassRetry, Systemic: true, NotAnswered: true}},
		row{name: "timeout before send", err: &TransportError{Err: context.DeadlineExceeded, Timeout: true}, want: Verdict{Class: ClassRetry, Systemic: true}},
		row{name: "timeout after send", err: &TransportError{Err: context.DeadlineExceeded, Sent: true, Timeout: true}, want: Verdict{Class: ClassRetry, Systemic: true, NotAnswered: true}},
		row{name: "caller cancelled before send", err: &TransportError{Err: context.Canceled}, want: Verdict{Class: ClassRetry}},
		row{name: "caller cancelled after send", err: &TransportError{Err: fmt.Errorf("%w: post: %w", context.Canceled, io.EOF), Sent: true}, want: Verdict{Class: ClassRetry, NotAnswered: true}},
		row{name: "wrapped transport error", err: fmt.Errorf("attempt 3: %w", &TransportError{Err: refused}), want: Verdict{Class: ClassRetry, Systemic: true}},
		row{name: "bare context canceled", err: context.Canceled, want: Verdict{Class: ClassRetry}},
		// Nothing sent, decided by the client.
		row{name: "invalid request", err: fmt.Errorf("%w: script_name is empty", ErrInvalidRequest), want: Verdict{Class: ClassFailed, NotSent: true}},
		row{name: "unusable credentials", err: fmt.Errorf("%w: AK and SK must both be set", ErrCredentials), want: Verdict{Class: ClassRetry, Systemic: true, NotSent: true}},
		row{name: "unknown error", err: errors.New("something else"), want: Verdict{Class: ClassRetry}},
		row{name: "nothing at all", want: Verdict{Class: ClassRetry}},
		// A wrapped APIError is still read.
		row{name: "wrapped 400", resp: &Response{StatusCode: 400}, err: fmt.Errorf("stop: %w", &APIError{StatusCode: 400, ErrorCode: "DLF.6205"}), want: Verdict{Class: ClassFailed, HTTPStatus: 400, ErrorCode: "DLF.6205"}},
		// APIError without a Response (built by hand) still classifies.
		row{name: "api error alone", err: &APIError{StatusCode: 503, RequestID: "x"}, want: Verdict{Class: ClassRetry, HTTPStatus: 503, RequestID: "x"}},
		// A non-2xx Response without error (not produced by Stop).
		row{name: "bare 503 response", resp: &Response{StatusCode: 503}, want: Verdict{Class: ClassRetry, HTTPStatus: 503}},
		row{name: "bare 404 response", resp: &Response{StatusCode: 404}, want: Verdict{Class: ClassFailed, HTTPStatus: 404}},
		row{name: "bare 401 response", resp: &Response{StatusCode: 401}, want: Verdict{Class: ClassRetry, HTTPStatus: 401, Systemic: true}},
	)

	for _, r := range rows {
		t.Run(r.name, func(t *testing.T) {
			if got := Classify(r.resp, r.err); got != r.want {
				t.Errorf("Classify\n got  %+v\n want %+v", got, r.want)
			}
		})
	}
}

func TestClassifyEveryStatus(t *testing.T) {
	// The table as a whole, status by status, so no code is forgotten.
	for s := 100; s <= 599; s++ {
		resp, err := answer(s, "", "", "", 0)
		if s >= 200 && s <= 299 {
			resp, err = &Response{StatusCode: s}, nil
		}
		v := Classify(resp, err)
		var want Class
		switch {
		case s >= 200 && s <= 299:
			want = ClassStopped
		case s == 401, s == 403, s == 408, s == 429, s >= 500:
			want = ClassRetry
		default:
			want = ClassFailed
		}
		if v.Class != want {
			t.Errorf("status %d: %s, want %s", s, v.Class, want)
		}
		if v.Systemic != (s == 401 || s == 403) {
			t.Errorf("status %d: systemic %v", s, v.Systemic)
		}
	}
}

func TestClassZeroValueRetries(t *testing.T) {
	var v Verdict
	if v.Class != ClassRetry {
		t.Fatal("the zero Verdict must mean retry")
	}
	for c, s := range map[Class]string{ClassRetry: "retry", ClassStopped: "stopped", ClassFailed: "failed", Class(9): "Class(?)"} {
		if c.String() != s {
			t.Errorf("%d.String() = %q", int(c), c.String())
		}
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2024, 3, 15, 9, 30, 0, 0, time.UTC)
	tests := []struct {
		in   string
		want time.Duration
	}{
		{"", 0},
		{"0", 0},
		{"1", time.Second},
		{"120", 2 * time.Minute},
		{" 7 ", 7 * time.Second},
		{"86399", 86399 * time.Second},
		{"86400", maxRetryAfter},
		{"86401", maxRetryAfter},
		{"10000000000", maxRetryAfter}, // would overflow a Duration
		{"999999999999999999999999", maxRetryAfter},
		{"-1", 0},
		{"-120", 0},
		{"+5", 0},
		{"1.5", 0},
		{"5s", 0},
		{"soon", 0},
		{"Fri, 15 Mar 2024 09:31:00 GMT", time.Minute},
		{"Friday, 15-Mar-24 09:30:30 GMT", 30 * time.Second}, // RFC 850
		{"Fri Mar 15 09:30:10 2024", 10 * time.Second},       // ANSI C
		{"Fri, 15 Mar 2024 09:29:00 GMT", 0},                 // past
		{"Fri, 15 Mar 2024 09:30:00 GMT", 0},                 // now
		{"Sat, 15 Mar 2025 09:30:00 GMT", maxRetryAfter},     // capped
		{"Fri, 15 Mar 2024 09:31:00 +0000", 0},               // not an HTTP date
		{"2024-03-15T09:31:00Z", 0},
	}
	for _, tc := range tests {
		if got := ParseRetryAfter(tc.in, now); got != tc.want {
			t.Errorf("ParseRetryAfter(%q) = %s, want %s", tc.in, got, tc.want)
		}
	}
}

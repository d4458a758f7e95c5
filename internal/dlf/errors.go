package dlf

import (
	"context"
	"errors"
	"net"
	"net/http/httptrace"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// APIError is a DLF (or API gateway) answer that is not 2xx. Stop returns it
// together with a *Response carrying the same status code.
//
// ErrorCode and ErrorMsg come from the JSON error body
// {"error_code": "...", "error_msg": "..."}; both are empty when the body is
// not that JSON. RequestID is the X-Request-Id response header (or, when the
// header is absent, the body's "request_id", which the API gateway sends).
// RetryAfter is the parsed Retry-After header, 0 when absent or unusable.
//
// No field ever holds a secret: the client removes the SK, tokens and the
// request signature from anything taken from the body, and never copies the
// raw body.
type APIError struct {
	StatusCode int
	ErrorCode  string
	ErrorMsg   string
	RequestID  string
	RetryAfter time.Duration
}

// Sentinel errors for the codes the stop call is known to return. Match them
// with errors.Is, which compares error codes only (see APIError.Is):
//
//	if errors.Is(err, dlf.ErrScriptInstanceNotFound) { ... }
var (
	// ErrScriptInstanceNotFound: DLF.6205, the instance does not exist (or
	// has no running history any more).
	ErrScriptInstanceNotFound error = &APIError{ErrorCode: "DLF.6205", ErrorMsg: "The script execution instance does not exist."}
	// ErrScriptNotFound: DLF.6201.
	ErrScriptNotFound error = &APIError{ErrorCode: "DLF.6201", ErrorMsg: "The script does not exist."}
	// ErrAccountPermission: DLF.6888, the account permission is invalid.
	ErrAccountPermission error = &APIError{ErrorCode: "DLF.6888", ErrorMsg: "The account permission is invalid."}
	// ErrAuthentication: APIG.0301 (or APIGW.0301), incorrect IAM
	// authentication information (HTTP 401).
	ErrAuthentication error = &APIError{ErrorCode: "APIG.0301", ErrorMsg: "Incorrect IAM authentication information."}
	// ErrThrottled: APIG.0308 (or APIGW.0308), the throttling threshold, or a
	// daily quota, has been reached (HTTP 429).
	ErrThrottled error = &APIError{ErrorCode: "APIG.0308", ErrorMsg: "The throttling threshold has been reached."}
)

// Errors the client returns without calling DLF.
var (
	// ErrInvalidRequest: the StopRequest failed ValidateStopRequest; nothing
	// was sent. Permanent.
	ErrInvalidRequest = errors.New("dlf: invalid stop request")
	// ErrCredentials: the Credentials function returned nothing usable
	// (empty, an AK without SK, or both AK/SK and a token); nothing was sent.
	// It can be fixed without losing commands, like a 401.
	ErrCredentials = errors.New("dlf: unusable credentials")
)

// Error reports status, code, message and request id; never a secret.
func (e *APIError) Error() string {
	var b strings.Builder
	b.Grow(32 + len(e.ErrorCode) + len(e.ErrorMsg) + len(e.RequestID))
	b.WriteString("dlf:")
	if e.StatusCode != 0 {
		b.WriteString(" HTTP ")
		b.WriteString(strconv.Itoa(e.StatusCode))
	}
	if e.ErrorCode != "" {
		b.WriteByte(' ')
		b.WriteString(e.ErrorCode)
	}
	if e.ErrorMsg != "" {
		b.WriteString(": ")
		b.WriteString(e.ErrorMsg)
	}
	if e.RequestID != "" {
		b.WriteString(" (request id ")
		b.WriteString(e.RequestID)
		b.WriteByte(')')
	}
	if e.RetryAfter > 0 {
		b.WriteString(" (retry after ")
		b.WriteString(e.RetryAfter.String())
		b.WriteByte(')')
	}
	return b.String()
}

// Is reports whether target is an *APIError with the same error code, so a
// decoded answer matches the sentinel of its code. The gateway prefixes
// APIG. and APIGW. are treated as one (our assumption: both spellings appear
// in Huawei's documentation for the same errors). A target without a code
// matches on its status code instead, when it has one.
func (e *APIError) Is(target error) bool {
	t, ok := target.(*APIError)
	if !ok || e == nil || t == nil {
		return false
	}
	if t.ErrorCode != "" {
		return normalizeCode(e.ErrorCode) == normalizeCode(t.ErrorCode)
	}
	return t.StatusCode != 0 && t.StatusCode == e.StatusCode
}

func normalizeCode(c string) string {
	if rest, ok := strings.CutPrefix(c, "APIGW."); ok {
		return "APIG." + rest
	}
	return c
}

// TransportError is a call that got no HTTP answer: the connection could not
// be made, broke, or the call timed out or was cancelled.
//
// Sent reports that the request was written to a connection, that is handed
// to the operating system, on the last connection the call used (net/http
// retries a request on a new connection when nothing of it was written):
// DLF may have received it and stopped the instance, so the outcome is
// unknown. With Sent false the request did not reach DLF whole: the
// connection could not be made, or the write failed (a peer reset, a
// kept-alive connection whose close the operating system already knew of),
// whatever net/http tried next. A kept-alive connection that the server
// closes while the request is on its way does take it, and then reads as
// closed: that counts as sent, rightly, since nothing tells it from a
// request DLF took and never answered (idleConnTimeout keeps it rare).
//
// Precisely, Sent is true when net/http reported the request written
// without error (net/http/httptrace WroteRequest) and the connection, which
// this package dialled, accepted at least one byte after it was handed the
// request (sendTracker.sent says why one byte). Limits: a write that breaks
// partway through the request counts as sent; over HTTP/2, a call cancelled
// or timed out just as its request is flushed can count as not sent. With a
// client from WithHTTPClient, whose connections this package does not dial,
// Sent rests on WroteRequest alone, which HTTP/1.1 reports before its final
// write, so a request lost in that write counts as sent too.
//
// Timeout reports that the call ran out of time (DLF_TIMEOUT, the caller's
// deadline, or a network timeout). When the caller cancelled its context, Err
// matches context.Canceled.
type TransportError struct {
	Err     error
	Sent    bool
	Timeout bool
}

func (e *TransportError) Error() string {
	var what string
	switch {
	case e.Sent:
		what = "dlf: no answer after the request was sent (outcome unknown)"
	default:
		what = "dlf: request not sent"
	}
	if e.Timeout {
		what += ", timed out"
	}
	if e.Err == nil {
		return what
	}
	return what + ": " + e.Err.Error()
}

func (e *TransportError) Unwrap() error { return e.Err }

// countingConn is a connection this package dialled. It counts the bytes the
// operating system accepted from Write, so Stop can tell whether a request
// left the process (TransportError.Sent).
type countingConn struct {
	net.Conn
	written atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.written.Add(int64(n))
	return n, err
}

// countingDial wraps every connection dial makes in a countingConn. Proxy
// handshakes and TLS sit above it, so their bytes are counted too; a call
// only compares the count at GotConn with the count at its end.
func countingDial(dial func(ctx context.Context, network, addr string) (net.Conn, error)) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &countingConn{Conn: conn}, nil
	}
}

// countingConnOf finds the countingConn under conn: conn itself, or the
// connection under TLS (GotConn reports the *tls.Conn). nil when conn was
// not dialled by this package.
func countingConnOf(conn net.Conn) *countingConn {
	for range 4 { // TLS over a proxy tunnel is two layers; stop at a cycle
		switch c := conn.(type) {
		case *countingConn:
			return c
		case interface{ NetConn() net.Conn }:
			conn = c.NetConn()
		default:
			return nil
		}
	}
	return nil
}

// sendTracker follows one Stop call through the attempts net/http makes
// (GetConn starts one, GotConn names its connection) and remembers, for the
// last attempt only, what is needed to decide TransportError.Sent. Its
// callbacks run on net/http's goroutines, hence the mutex.
type sendTracker struct {
	mu    sync.Mutex
	conn  *countingConn // of the last attempt; nil when unknown or not ours
	base  int64         // conn.written at GotConn
	wrote bool          // WroteRequest without error in the last attempt
}

func (s *sendTracker) trace() *httptrace.ClientTrace {
	return &httptrace.ClientTrace{
		GetConn: func(string) {
			s.mu.Lock()
			s.conn, s.base, s.wrote = nil, 0, false
			s.mu.Unlock()
		},
		GotConn: func(i httptrace.GotConnInfo) {
			cc := countingConnOf(i.Conn)
			s.mu.Lock()
			s.conn, s.base, s.wrote = cc, 0, false
			if cc != nil {
				s.base = cc.written.Load()
			}
			s.mu.Unlock()
		},
		WroteRequest: func(i httptrace.WroteRequestInfo) {
			s.mu.Lock()
			s.wrote = i.Err == nil
			s.mu.Unlock()
		},
	}
}

// sent decides TransportError.Sent once Do has failed: WroteRequest
// reported no error in the last attempt and, when that attempt's connection
// is ours, the connection accepted at least one byte since GotConn.
//
// WroteRequest alone is not enough: over HTTP/1.1 net/http reports it once
// the request is in the connection's buffer, before the flush that writes it
// out. If that flush fails having written nothing (peer reset, broken pipe
// on a stale kept-alive connection), nothing reached DLF; the count stays
// put, and net/http retries on a new connection; GetConn starts a new
// attempt, so if that dial fails the first attempt's WroteRequest no longer
// counts (for a client from WithHTTPClient this is the only protection).
// For HTTP/1.1 the count is final when Do returns an error: net/http waits
// for the connection's writer to stop first. Over HTTP/2 WroteRequest comes
// after the flush and is exact by itself; the count, shared with other
// streams, adds nothing there but does no harm. (HTTP/2 does not wait for
// its writer when the call is cancelled or times out, so a request whose
// flush ends at that very moment reads as not sent.)
//
// Why "at least one byte" and not "the whole request": net/http does not
// expose the request's size on the wire (it adds headers of its own, TLS
// adds record framing, HTTP/2 compresses headers), while an HTTP/1.1
// connection carries nothing but this request between GotConn and the end
// of the call (TLS adds its closing alert, which a connection whose write
// just failed does not take either). So the one case read wrongly is a
// write the operating system accepted in part before the connection broke:
// DLF got an incomplete request it cannot act on, yet Sent is true. That
// needs the connection to break in the middle of writing a request of about
// half a kilobyte, and it errs toward "outcome unknown", the reading the
// contract already handles, never toward "DLF got nothing" when it may have.
func (s *sendTracker) sent() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.wrote {
		return false
	}
	if s.conn == nil {
		return true // not our connection: WroteRequest is all there is
	}
	return s.conn.written.Load() > s.base
}

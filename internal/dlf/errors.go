package dlf

import (
	"errors"
	"strconv"
	"strings"
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
// Sent reports that the whole request had been written to the connection
// (net/http/httptrace WroteRequest) before the failure: DLF may have received
// it and stopped the instance, so the outcome is unknown. With Sent false the
// request certainly did not reach the server (for example connection refused).
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

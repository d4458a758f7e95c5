package dlf

import (
	"context"
	"errors"
	"net/http"
	"time"
)

// Class is what a single call result means for the command.
type Class int

const (
	// ClassRetry: try again later (honouring RetryAfter). It is the zero
	// value, so a Verdict nobody filled in never acknowledges a command.
	ClassRetry Class = iota
	// ClassStopped: DLF accepted the stop (2xx).
	ClassStopped
	// ClassFailed: DLF refused for good; outcome failed, cause dlf_error.
	ClassFailed
)

func (c Class) String() string {
	switch c {
	case ClassRetry:
		return "retry"
	case ClassStopped:
		return "stopped"
	case ClassFailed:
		return "failed"
	}
	return "Class(?)"
}

// Verdict is the decision for one call result, with what the outcome event
// needs to report it.
type Verdict struct {
	Class Class
	// RetryAfter is the server's Retry-After, for ClassRetry only; the
	// caller waits the larger of it and its own backoff.
	RetryAfter time.Duration
	// Systemic marks results that say nothing about this command but about
	// DLF or our access to it: 401/403, and calls that got no answer (not
	// counting the caller's own cancellation). Meant for a circuit breaker;
	// 5xx answers are left to it through HTTPStatus.
	Systemic bool
	// HTTPStatus of the answer; 0 when there was none.
	HTTPStatus int
	// ErrorCode, ErrorMsg and RequestID of the answer, when it had them.
	ErrorCode, ErrorMsg, RequestID string
	// NotAnswered: the request was completely sent and DLF's answer did
	// not come, so DLF may have stopped the instance: no answer at all
	// (TransportError with Sent), or a gateway's 502 or 504, which took
	// the request on and got no good answer from behind it in time.
	NotAnswered bool
	// NotSent: the request failed here, before anything went to the
	// network (it could not be built or signed); no DLF call was made.
	NotSent bool
}

// Classify is the whole decision table of the contract (section 6) for one
// call result, as returned by Client.Stop:
//
//	2xx                                   stopped
//	400 (any code)                        failed (dlf_error)
//	other 4xx but 401, 403, 408, 429      failed (dlf_error)
//	1xx, 3xx (redirects are not followed) failed (dlf_error)
//	401, 403                              retry, Systemic
//	408, 429, 5xx                         retry, Retry-After honoured (502, 504: NotAnswered)
//	no answer: refused, reset, timeout    retry, Systemic (NotAnswered when sent)
//	cancelled by the caller               retry (the command is returned, never failed)
//	ErrInvalidRequest (nothing sent)      failed
//	ErrCredentials (nothing sent)         retry, Systemic, like a 401
//	status outside 100-599, unknown error retry (our assumption: never lose a command)
//
// The rows for retries_exhausted, deadlines and the state bucket belong to
// the caller, which knows the command's history.
func Classify(resp *Response, err error) Verdict {
	var v Verdict
	if resp != nil {
		v.HTTPStatus = resp.StatusCode
		v.RequestID = resp.RequestID
	}

	var apiErr *APIError
	var te *TransportError
	switch {
	case err == nil && resp == nil:
		// Not a result Stop produces; retrying is the safe reading.
		v.Class = ClassRetry
	case err == nil:
		v.Class, v.Systemic = classifyStatus(resp.StatusCode)
	case errors.As(err, &apiErr):
		v.HTTPStatus = apiErr.StatusCode
		v.ErrorCode, v.ErrorMsg = apiErr.ErrorCode, apiErr.ErrorMsg
		if apiErr.RequestID != "" {
			v.RequestID = apiErr.RequestID
		}
		v.Class, v.Systemic = classifyStatus(apiErr.StatusCode)
		if v.Class == ClassRetry {
			v.RetryAfter = apiErr.RetryAfter
		}
	case errors.As(err, &te):
		v.Class = ClassRetry
		v.HTTPStatus = 0
		v.NotAnswered = te.Sent
		v.Systemic = !errors.Is(err, context.Canceled)
	case errors.Is(err, ErrInvalidRequest):
		v.Class, v.NotSent = ClassFailed, true
	case errors.Is(err, ErrCredentials):
		v.Class, v.Systemic, v.NotSent = ClassRetry, true, true
	default:
		// context.Canceled from elsewhere, or anything unforeseen.
		v.Class = ClassRetry
	}
	if v.HTTPStatus == http.StatusBadGateway || v.HTTPStatus == http.StatusGatewayTimeout {
		v.NotAnswered = true
	}
	return v
}

// classifyStatus maps an HTTP status to its class and whether it is systemic.
func classifyStatus(code int) (Class, bool) {
	switch {
	case code >= 200 && code <= 299:
		return ClassStopped, false
	case code == 401 || code == 403:
		return ClassRetry, true
	case code == 408 || code == 429:
		return ClassRetry, false
	case code >= 400 && code <= 499: // 400 and every other 4xx
		return ClassFailed, false
	case code >= 500 && code <= 599:
		return ClassRetry, false
	case code >= 100 && code <= 199, code >= 300 && code <= 399:
		return ClassFailed, false
	default:
		return ClassRetry, false
	}
}

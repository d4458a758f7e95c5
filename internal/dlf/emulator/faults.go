package emulator

import (
	"net/http"
	"time"
)

// Faults describes how the emulator misbehaves. The zero value means "behave".
// Faults can be changed at any time, from any goroutine, with SetFaults
// (everyone) or SetFaultsFor (one instance).
//
// Except AuthFail and Down, which affect every route, faults apply to stop
// requests only. A stop request meets them in this order, the first that
// decides the answer winning:
//
//	Down          (global: listener closed; per instance: connection closed, no answer)
//	AuthFail      401 APIG.0301
//	(credentials) 401 APIG.0301 when WithCredentials/WithAuthToken refuse it
//	Throttle      429 APIG.0308 + Retry-After
//	Latency       wait, then go on
//	Hang          no answer, stop not applied
//	ErrorRate     ErrorStatus, stop not applied
//	(the stop)    204, or 400 DLF.6205
//	DropAfterStop connection closed instead of sending the answer above
type Faults struct {
	// Latency is waited before a stop is decided and answered. The wait
	// runs to its end even if the client gives up meanwhile, and the stop is
	// then applied (a server that accepted a request finishes it): a client
	// timeout shorter than Latency thus yields "sent, no answer, stopped".
	// Close interrupts the wait; the stop is then not applied.
	Latency time.Duration
	// ErrorRate is the share (0..1) of stop calls answered ErrorStatus
	// without applying the stop. Values outside 0..1 are clamped.
	ErrorRate float64
	// ErrorStatus is the status ErrorRate answers: any of 400-599; anything
	// else (including 0) means 503. The body is
	// {"error_code":"EMU.<status>","error_msg":"Injected fault: ..."}.
	ErrorStatus int
	// Throttle answers every stop 429 {"error_code":"APIG.0308",...}
	// without applying it.
	Throttle bool
	// RetryAfter is sent as Retry-After (whole seconds, rounded up) with
	// Throttle: 0 means 1 second, a negative value sends no header. With
	// the answers of ErrorRate it is sent only when positive.
	RetryAfter time.Duration
	// Hang reads the request and never answers it nor applies it, until the
	// client gives up or Close is called; then the connection is closed.
	Hang bool
	// AuthFail answers 401 {"error_code":"APIG.0301",...} to everything
	// (set per instance: to that instance's stops).
	AuthFail bool
	// DropAfterStop applies the stop, then closes the connection without
	// answering: the "lost 204". The client gets EOF or a reset.
	DropAfterStop bool
	// Down, set with SetFaults on an emulator started with Start/StartOn,
	// closes the listener and every open connection: new connections are
	// refused until Down is cleared, when the emulator listens on the same
	// address again. With Handler only, and per instance, each request's
	// connection is closed without an answer and nothing is applied.
	Down bool
}

const defaultErrorStatus = http.StatusServiceUnavailable

func (f Faults) normalize() Faults {
	switch {
	case f.ErrorRate != f.ErrorRate || f.ErrorRate < 0: // NaN or negative
		f.ErrorRate = 0
	case f.ErrorRate > 1:
		f.ErrorRate = 1
	}
	if f.ErrorStatus < 400 || f.ErrorStatus > 599 {
		f.ErrorStatus = defaultErrorStatus
	}
	if f.Latency < 0 {
		f.Latency = 0
	}
	return f
}

// retryAfterSeconds returns the Retry-After value in seconds, and false
// when no header is to be sent.
func (f *Faults) retryAfterSeconds() (int64, bool) {
	switch {
	case f.RetryAfter < 0:
		return 0, false
	case f.RetryAfter == 0:
		return 1, true
	}
	return int64((f.RetryAfter + time.Second - 1) / time.Second), true
}

// SetFaults replaces the faults every request meets (per-instance overrides
// set with SetFaultsFor still win for their instance). Turning Down on or
// off takes effect before SetFaults returns; if the address cannot be
// listened on again, the error is logged and the emulator stays down.
func (e *Emulator) SetFaults(f Faults) {
	n := f.normalize()
	e.faults.Store(&n)
	e.setDown(n.Down)
}

// Faults returns the faults set by SetFaults.
func (e *Emulator) Faults() Faults { return *e.faults.Load() }

// SetFaultsFor makes stop requests for one instance meet f instead of the
// global faults (e.g. one slow instance for head-of-line tests). The
// override is whole: Faults{} means "no faults for this instance" even when
// SetFaults has some. The instance need not exist.
func (e *Emulator) SetFaultsFor(project, script, instanceID string, f Faults) {
	n := f.normalize()
	e.store.getOrCreate(instKey{project, script, instanceID}).faults.Store(&n)
}

// ClearFaultsFor removes the override set with SetFaultsFor.
func (e *Emulator) ClearFaultsFor(project, script, instanceID string) {
	if ent := e.store.get(instKey{project, script, instanceID}); ent != nil {
		ent.faults.Store(nil)
	}
}

// roll reports whether a call fails under rate.
func (e *Emulator) roll(rate float64) bool {
	switch {
	case rate <= 0:
		return false
	case rate >= 1:
		return true
	}
	e.rngMu.Lock()
	v := e.rng.Float64()
	e.rngMu.Unlock()
	return v < rate
}

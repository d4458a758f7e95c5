package secretfile

import (
	"context"
	"sync"
	"sync/atomic"
)

// redacted is what a Value prints as.
const redacted = "secretfile.Value(redacted)"

// Value is a secret that may be backed by a file. It is safe for concurrent
// use. Get is meant for the hot path: one atomic load, no system call.
//
// Build one with Static or Watch; the zero Value and a nil *Value read as "".
// A Value must not be copied after first use.
type Value struct {
	cur atomic.Pointer[string]
	ver atomic.Uint64

	watching // set by Watch only
}

// watching is what Close needs of a watched value: a way to stop its
// goroutine and to wait for it.
type watching struct {
	stop      context.CancelFunc
	done      chan struct{}
	closeOnce sync.Once
}

// close stops the goroutine and waits for it; without one it does nothing.
func (w *watching) close() {
	if w.stop == nil {
		return
	}
	w.closeOnce.Do(w.stop)
	<-w.done
}

// Static returns a Value that always holds v. Its Version is 1 and Close does
// nothing.
func Static(v string) *Value {
	val := &Value{}
	val.set(v)
	return val
}

// Get returns the current value.
func (v *Value) Get() string {
	if v == nil {
		return ""
	}
	p := v.cur.Load()
	if p == nil {
		return ""
	}
	return *p
}

// Version returns a counter that starts at 1 with the first value and
// increases by one on every change, so callers can notice a rotation. A
// re-read that yields the same content does not count as a change. The zero
// Value and a nil *Value report 0.
func (v *Value) Version() uint64 {
	if v == nil {
		return 0
	}
	return v.ver.Load()
}

// Close stops watching the file and waits for the watching goroutine to
// exit. The last value stays readable. Close is idempotent and safe to call
// concurrently; on a Static value it does nothing.
func (v *Value) Close() {
	if v != nil {
		v.close()
	}
}

// String returns a redacted form so that a Value never prints its content.
func (v *Value) String() string { return redacted }

// GoString returns a redacted form for %#v.
func (v *Value) GoString() string { return redacted }

// set stores s and bumps the version. The value is visible before the
// version, so a caller that sees version n also sees a value at least that
// new.
func (v *Value) set(s string) {
	v.cur.Store(&s)
	v.ver.Add(1)
}

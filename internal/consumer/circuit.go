package consumer

import (
	"context"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/dlf"
)

// circuit pauses the worker when DLF fails systemically, so an outage or
// revoked credentials park commands in the stream instead of burning their
// retry budget and dead-lettering them en masse.
//
// It opens on a 401 or 403 (or credentials it cannot use), or after
// threshold failures in a row (no answer, a 5xx), of which one instance
// may add threshold-2 at most: one instance whose stop DLF keeps failing
// (a hang, a 500 for that script) is that command's trouble, not DLF's,
// and opening on its retries alone paused every healthy command until it
// gave up (found by review). Neither may it open on that instance's
// retries and one stray failure elsewhere; but two instances failing
// again and again do open it, however few commands are in flight. A call
// refused before anything was sent (connection refused, no such host)
// cannot be one instance's trouble, and always counts (found by reviews
// of the first two versions of this rule). While open: the fetch loop takes
// nothing new, commands already held wait (heartbeating, no calls), and one
// probe call at a time is let through, spaced by a backoff. The first probe
// that gets a non-systemic answer closes it, and so does a command's last
// attempt made while it is open.
//
// An answer counts only for the state the circuit was in when its call was
// sent: the circuit numbers its openings and closings (generation), and a
// call notes the number before it is sent. A 204 to a call sent before an
// opening may predate the failures that opened it, and closing on it would
// let every held command call into a DLF that still fails, the burst the
// circuit is there to prevent; likewise a 401 to a call sent before a
// probe's 204 closed the circuit is older than that 204, and does not open
// it again.
type circuit struct {
	threshold int
	log       *zap.Logger
	onChange  func(open bool)

	mu       sync.Mutex
	open     bool
	isOpen   atomic.Bool // open, for holdsBack on every call without the lock
	failures int         // consecutive systemic failures, as counted
	// perInst counts them per instance, for the cap on what one instance
	// may add; cleared when a run ends.
	perInst map[dlf.StopRequest]int
	// clean: closed with no failure counted, so that a call that gets a
	// non-systemic answer changes nothing; read on every call without the
	// lock, which 32 calls at a time would otherwise queue on.
	clean   atomic.Bool
	probing bool // a probe call is on the wire
	// probeNow: the credentials changed while a probe was on the wire;
	// should it fail, the next one goes at once (it used the old ones).
	probeNow bool
	nextTry  time.Time // earliest next probe
	probeBo  *backoff.ExponentialBackOff
	changed  chan struct{} // closed and replaced on every state change
	disabled bool
	// gen counts the openings and closings; see generation.
	gen atomic.Uint64
}

func newCircuit(cfg *Config, log *zap.Logger, onChange func(bool)) *circuit {
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = cfg.RetryInitial
	bo.MaxInterval = cfg.RetryMax
	bo.MaxElapsedTime = 0
	c := &circuit{
		threshold: cfg.CircuitThreshold,
		log:       log,
		onChange:  onChange,
		probeBo:   bo,
		changed:   make(chan struct{}),
		disabled:  cfg.DisableCircuit,
	}
	c.clean.Store(true)
	return c
}

// openNow is Open without the lock, for the per-message path.
func (c *circuit) openNow() bool { return !c.disabled && c.isOpen.Load() }

// Open reports whether the circuit is open.
func (c *circuit) Open() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.open
}

// acquire waits until a call may be made: at once when closed; as the one
// probe when open and the probe backoff has passed; and, open or not, once
// lastAt has come (zero: never), for the command's last attempt. probe
// tells the caller to report through release. It returns ok=false when
// ctx ends first.
func (c *circuit) acquire(ctx context.Context, lastAt time.Time) (probe, ok bool) {
	if c.disabled || !c.isOpen.Load() { // the common case, without the lock
		return false, true
	}
	for {
		c.mu.Lock()
		if !c.open {
			// The common case: no timer, no allocation.
			c.mu.Unlock()
			return false, true
		}
		now := time.Now()
		if !c.probing && !now.Before(c.nextTry) {
			c.probing = true
			c.mu.Unlock()
			return true, true
		}
		ch := c.changed
		wait := c.nextTry.Sub(now)
		if c.probing || wait <= 0 {
			wait = time.Hour // woken by the probe's result
		}
		c.mu.Unlock()
		if !lastAt.IsZero() {
			left := lastAt.Sub(now)
			if left <= 0 {
				// The contract owes every command one last attempt when
				// its time is up; the circuit only decides how many go
				// before it.
				return false, true
			}
			wait = min(wait, left)
		}
		t := time.NewTimer(wait)
		select {
		case <-ch:
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return false, false
		}
		t.Stop()
	}
}

// holdsBack tells a call that acquire let through while the circuit was
// closed, and that then waited for a slot, the pause or a rate token,
// whether the circuit opened meanwhile. Such a call goes back to acquire
// instead of being sent: otherwise every command that was waiting when DLF
// started refusing us would still make its call, the very burst the
// circuit is there to spare DLF and the retry budgets.
func (c *circuit) holdsBack(probe bool, lastAt time.Time) bool {
	if c.disabled || probe || !c.isOpen.Load() {
		return false
	}
	return lastAt.IsZero() || time.Now().Before(lastAt)
}

// generation is what a call notes right before it is sent, and gives
// release with its answer. Noted before the last holdsBack check, and an
// opening sets isOpen before it counts: an opening between the two holds
// the call back or leaves it older than the opening, never the reverse.
func (c *circuit) generation() uint64 { return c.gen.Load() }

// changedCh is closed at the next state change.
func (c *circuit) changedCh() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.changed
}

// systemic tells whether a verdict counts against DLF as a whole.
func systemic(v dlf.Verdict) (counts, immediate bool) {
	switch {
	case v.HTTPStatus == http.StatusUnauthorized || v.HTTPStatus == http.StatusForbidden:
		return true, true
	case v.HTTPStatus >= 500:
		return true, false
	case v.HTTPStatus == 0 && v.Systemic && v.NotSent:
		return true, true // credentials it cannot use: like a 401
	case v.HTTPStatus == 0 && v.Systemic:
		return true, false
	}
	return false, false
}

// answeredByDLF tells whether DLF itself took the call and answered for
// the command: a 2xx, or a refusal of the command such as DLF.6205. Only
// such an answer shows that DLF is up and accepts us, which is what a probe
// must show to close the circuit; a 429 or a 408 comes from the gateway in
// front of it.
func answeredByDLF(v dlf.Verdict) bool {
	switch s := v.HTTPStatus; {
	case s >= 200 && s <= 299:
		return true
	case s >= 400 && s <= 499:
		return s != http.StatusUnauthorized && s != http.StatusForbidden &&
			s != http.StatusRequestTimeout && s != http.StatusTooManyRequests
	}
	return false
}

// release records a call's verdict; sentIn is the generation the call
// noted before it was sent (any value for a call that was not sent), and
// target what it asked DLF to stop.
func (c *circuit) release(probe bool, sentIn uint64, v dlf.Verdict, cancelled bool, target dlf.StopRequest) {
	if c.disabled {
		return
	}
	if !probe && !cancelled && c.clean.Load() {
		if counts, _ := systemic(v); !counts {
			return // the common case: nothing to count, nothing changes
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	defer func() { c.clean.Store(!c.open && c.failures == 0) }()
	if probe {
		c.probing = false
	}
	if cancelled {
		// Our own shutdown or a deadline says nothing about DLF; let
		// another probe go. A call that was not the probe changes nothing
		// anyone waits for (and waking every rate wait for it would only
		// re-queue them).
		if probe {
			c.signalLocked()
		}
		return
	}
	if sentIn != c.gen.Load() {
		// Sent before the circuit last opened or closed: older than
		// what changed it, it neither counts nor clears. A probe that
		// got it is followed by another.
		if c.open && probe {
			c.nextProbeLocked()
			c.signalLocked()
		}
		return
	}
	counts, immediate := systemic(v)
	if !counts && !answeredByDLF(v) {
		// A 429, a 408 or a failure of ours before any answer says
		// nothing of DLF: it neither counts nor clears, and a probe that
		// got it is followed by another once the backoff has passed.
		if c.open && probe {
			c.nextProbeLocked()
			c.signalLocked()
		}
		return
	}
	if !counts {
		c.failures = 0
		clear(c.perInst)
		if c.open {
			c.open = false
			c.isOpen.Store(false)
			c.gen.Add(1)
			c.probeNow = false
			c.probeBo.Reset()
			c.log.Warn("DLF circuit closed: a probe call got through", zap.Int("http_status", v.HTTPStatus))
			c.signalLocked()
			if c.onChange != nil {
				c.onChange(false)
			}
		}
		return
	}
	if v.HTTPStatus == 0 && !v.NotAnswered {
		c.failures++ // refused before it was sent: DLF or the way to it
	} else if n := c.perInst[target]; n < max(1, c.threshold-2) {
		if c.perInst == nil {
			c.perInst = make(map[dlf.StopRequest]int, c.threshold)
		}
		c.perInst[target] = n + 1
		c.failures++
	}
	if c.open {
		if probe {
			c.nextProbeLocked()
			c.signalLocked()
		}
		return
	}
	if immediate || c.failures >= c.threshold {
		c.open = true
		c.isOpen.Store(true)
		c.gen.Add(1) // after isOpen; see generation
		c.probeBo.Reset()
		c.nextTry = time.Now().Add(min(c.probeBo.NextBackOff(), c.probeBo.MaxInterval))
		c.log.Warn("DLF circuit open: pausing fetches, probing with one call at a time",
			zap.Int("http_status", v.HTTPStatus), zap.String("error_code", v.ErrorCode),
			zap.Int("consecutive_failures", c.failures))
		c.signalLocked()
		if c.onChange != nil {
			c.onChange(true)
		}
	}
}

// credentialsChanged lets an open circuit probe now: new credentials may
// be what ends a 401 or 403, and the probe backoff has grown meanwhile. A
// probe already on the wire is waited for; the next one may go as soon as
// it has answered.
func (c *circuit) credentialsChanged() {
	if c.disabled {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.open {
		return
	}
	c.probeBo.Reset()
	c.nextTry = time.Time{}
	c.probeNow = c.probing
	c.log.Info("DLF credentials changed: probing now")
	c.signalLocked()
}

// nextProbeLocked spaces the probe after one that failed: by the backoff,
// or at once when the credentials changed while it was on the wire.
func (c *circuit) nextProbeLocked() {
	c.nextTry = time.Now().Add(min(c.probeBo.NextBackOff(), c.probeBo.MaxInterval))
	if c.probeNow {
		c.nextTry, c.probeNow = time.Now(), false
	}
}

func (c *circuit) signalLocked() {
	close(c.changed)
	c.changed = make(chan struct{})
}

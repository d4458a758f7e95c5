package consumer

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// throttle paces calls to DLF. A configured rate limit (DLF_RATE_LIMIT,
// DLF_RATE_BURST) is a token bucket. A 429 from DLF pauses every call of
// this worker, not only the one that got it, until its Retry-After (or the
// backoff) has passed, and halves the configured rate, which then recovers
// step by step with successful calls: the API gateway's quota is shared by
// all of them. A call sent after the latest 429 (a command's last attempt,
// which the pause lets through) that DLF answers ends the pause: the quota
// is back, whatever the Retry-After said (a day, for a daily quota).
type throttle struct {
	limiter *rate.Limiter // nil: no configured limit
	max     rate.Limit
	// turn lets one call at a time hold a reservation on the limiter.
	// A reservation given back is restored whole only when it is the
	// latest one; with every waiting call holding its own, those given
	// back when the circuit opens would leave the limiter in debt, and
	// the probe waiting behind it.
	turn chan struct{}

	mu         sync.Mutex
	pauseUntil time.Time
	// pauses counts the 429s; a call notes it before it is sent (see
	// generation), so that only an answer to a call sent after the
	// latest 429 ends the pause.
	pauses atomic.Uint64
	lifted chan struct{} // closed and replaced when a pause ends early
}

func newThrottle(cfg *Config) *throttle {
	t := &throttle{lifted: make(chan struct{})}
	if cfg.RateLimit > 0 {
		t.max = rate.Limit(cfg.RateLimit)
		t.limiter = rate.NewLimiter(t.max, cfg.RateBurst)
		t.turn = make(chan struct{}, 1)
	}
	return t
}

// waitPause blocks until a 429's pause is over, or until lastAt (zero:
// no such limit) when the command's last attempt is due. It fails when
// ctx ends first.
func (t *throttle) waitPause(ctx context.Context, lastAt time.Time) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	for {
		t.mu.Lock()
		until, lifted := t.pauseUntil, t.lifted
		t.mu.Unlock()
		if !lastAt.IsZero() && lastAt.Before(until) {
			until = lastAt
		}
		d := time.Until(until)
		if d <= 0 {
			return nil
		}
		tm := time.NewTimer(d)
		select {
		case <-tm.C:
		case <-lifted: // look again: another 429 may have come since
		case <-ctx.Done():
			tm.Stop()
			return ctx.Err()
		}
		tm.Stop()
	}
}

// generation is what a call notes right before it is sent, and gives
// succeeded with its answer.
func (t *throttle) generation() uint64 { return t.pauses.Load() }

// limited says whether a rate limit is configured.
func (t *throttle) limited() bool { return t.limiter != nil }

// errRateWoken ends a wait for a rate token early: see waitRate.
var errRateWoken = errors.New("rate wait woken")

// waitRate blocks for the rate limiter's token, taken in turn with the
// other calls waiting for one. It fails when ctx ends first, and with
// errRateWoken when the channel wake returns (asked for only when there
// is a wait) is closed first; either way a reserved token is given back.
// Unlike rate.Limiter.Wait it does not fail early when the token would
// come after ctx's deadline, so a command is expired only once its
// deadline has passed.
func (t *throttle) waitRate(ctx context.Context, wake func() <-chan struct{}) error {
	if t.limiter == nil {
		return nil
	}
	var woken <-chan struct{}
	select {
	case t.turn <- struct{}{}:
	default:
		woken = wake()
		select {
		case t.turn <- struct{}{}:
		case <-woken:
			return errRateWoken
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	defer func() { <-t.turn }()
	r := t.limiter.Reserve()
	d := r.Delay()
	if d == 0 {
		return nil
	}
	if woken == nil {
		woken = wake()
	}
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-tm.C:
		return nil
	case <-woken:
		r.Cancel()
		return errRateWoken
	case <-ctx.Done():
		r.Cancel()
		return ctx.Err()
	}
}

// pausedFor reports whether a 429's pause still holds back a command
// whose last attempt is due at lastAt (zero: no such limit).
func (t *throttle) pausedFor(lastAt time.Time) bool {
	now := time.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	return now.Before(t.pauseUntil) && (lastAt.IsZero() || now.Before(lastAt))
}

// throttled records a 429: everyone waits at least d from now.
func (t *throttle) throttled(d time.Duration) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.pauses.Add(1)
	if until := time.Now().Add(d); until.After(t.pauseUntil) {
		t.pauseUntil = until
	}
	// The limit is read and set under t.mu, here and in succeeded: the
	// limiter locks each step alone, and a success that read the limit
	// before a 429 halved it would otherwise write the old one back.
	if t.limiter != nil {
		if l := t.limiter.Limit() / 2; l >= t.max/64 {
			t.limiter.SetLimit(l)
		}
	}
}

// succeeded lets a halved rate grow back by a twentieth of the configured
// one per call that DLF answered (a 2xx, or a refusal of the command that
// the gateway let through), and ends a pause that such a call, sent in
// generation sentIn, outlived.
func (t *throttle) succeeded(sentIn uint64) {
	if t.limiter == nil && t.pauses.Load() == 0 {
		return // never throttled: the common case, without the lock
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if sentIn == t.pauses.Load() && time.Now().Before(t.pauseUntil) {
		t.pauseUntil = time.Time{}
		close(t.lifted)
		t.lifted = make(chan struct{})
	}
	if t.limiter == nil {
		return
	}
	if l := t.limiter.Limit(); l < t.max {
		l += t.max / 20
		if l > t.max {
			l = t.max
		}
		t.limiter.SetLimit(l)
	}
}

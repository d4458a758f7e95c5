package consumer

import (
	"context"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// throttle paces calls to DLF. A configured rate limit (DLF_RATE_LIMIT,
// DLF_RATE_BURST) is a token bucket. A 429 from DLF pauses every call of
// this worker, not only the one that got it, until its Retry-After (or the
// backoff) has passed, and halves the configured rate, which then recovers
// step by step with successful calls: the API gateway's quota is shared by
// all of them.
type throttle struct {
	limiter *rate.Limiter // nil: no configured limit
	max     rate.Limit

	mu         sync.Mutex
	pauseUntil time.Time
}

func newThrottle(cfg *Config) *throttle {
	t := &throttle{}
	if cfg.RateLimit > 0 {
		t.max = rate.Limit(cfg.RateLimit)
		t.limiter = rate.NewLimiter(t.max, cfg.RateBurst)
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
	t.mu.Lock()
	until := t.pauseUntil
	t.mu.Unlock()
	if !lastAt.IsZero() && lastAt.Before(until) {
		until = lastAt
	}
	if d := time.Until(until); d > 0 {
		tm := time.NewTimer(d)
		defer tm.Stop()
		select {
		case <-tm.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// waitRate blocks for the rate limiter's token. It fails when ctx ends
// first (and gives the token back); unlike rate.Limiter.Wait it does not
// fail early when the token would come after ctx's deadline, so a
// command is expired only once its deadline has passed.
func (t *throttle) waitRate(ctx context.Context) error {
	if t.limiter == nil {
		return nil
	}
	r := t.limiter.Reserve()
	d := r.Delay()
	if d == 0 {
		return nil
	}
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-tm.C:
		return nil
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
	if until := time.Now().Add(d); until.After(t.pauseUntil) {
		t.pauseUntil = until
	}
	t.mu.Unlock()
	if t.limiter != nil {
		if l := t.limiter.Limit() / 2; l >= t.max/64 {
			t.limiter.SetLimit(l)
		}
	}
}

// succeeded lets a halved rate grow back by a twentieth of the configured
// one per successful call.
func (t *throttle) succeeded() {
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

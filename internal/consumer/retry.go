package consumer

import (
	"time"

	"github.com/cenkalti/backoff/v4"
)

// schedule decides when a retryable command is tried again. It wraps
// backoff/v4's jittered exponential backoff with the contract's two extra
// rules: Retry-After is a floor, and the give-up time is a ceiling that is
// met with one last attempt rather than overshot.
type schedule struct {
	b        *backoff.ExponentialBackOff
	giveUpAt time.Time
}

// newSchedule starts the backoff of a delivery after the given number of
// earlier steps: the attempts earlier deliveries made, as the state bucket
// counts them, or at least the deliveries before this one.
func newSchedule(cfg *Config, storedAt time.Time, steps int) *schedule {
	b := &backoff.ExponentialBackOff{
		InitialInterval:     cfg.RetryInitial,
		RandomizationFactor: backoff.DefaultRandomizationFactor,
		Multiplier:          backoff.DefaultMultiplier,
		MaxInterval:         cfg.RetryMax,
		MaxElapsedTime:      0, // the give-up rule below replaces it
		Stop:                backoff.Stop,
		Clock:               backoff.SystemClock,
	}
	b.Reset()
	// A redelivered command continues where the previous delivery left
	// off instead of hammering DLF from the initial interval again. One
	// delivery may make several attempts before a wait long enough to be
	// handed back (found by review: counting deliveries alone restarted
	// the backoff near its start after every such wait).
	for i := 0; i < steps && i < 64; i++ {
		b.NextBackOff()
	}
	return &schedule{b: b, giveUpAt: storedAt.Add(cfg.RetryMaxElapsed)}
}

// next returns how long to wait before the next attempt, or ok=false when
// the command has run out of time and must end as retries_exhausted.
func (s *schedule) next(now time.Time, retryAfter time.Duration) (wait time.Duration, ok bool) {
	if !now.Before(s.giveUpAt) {
		return 0, false
	}
	// backoff/v4 jitters around the capped interval, so a wait can exceed
	// the cap by half; the contract says "at most RETRY_MAX_INTERVAL".
	wait = min(s.b.NextBackOff(), s.b.MaxInterval)
	if retryAfter > wait {
		wait = retryAfter
	}
	if left := s.giveUpAt.Sub(now); wait > left {
		wait = left
	}
	return wait, true
}

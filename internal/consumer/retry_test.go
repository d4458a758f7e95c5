package consumer

import (
	"testing"
	"time"
)

func TestScheduleBoundsAndRetryAfter(t *testing.T) {
	t.Parallel()
	cfg := &Config{RetryInitial: 500 * time.Millisecond, RetryMax: 30 * time.Second, RetryMaxElapsed: 10 * time.Minute}
	stored := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s := newSchedule(cfg, stored, 0)
	now := stored
	// Jittered exponential growth: each wait within ±50% of its nominal
	// interval, the nominal one growing 1.5x up to the cap.
	nominal := cfg.RetryInitial
	for i := 0; i < 30; i++ {
		w, ok := s.next(now, 0)
		if !ok {
			t.Fatalf("gave up at step %d", i)
		}
		lo, hi := time.Duration(float64(nominal)*0.5), min(time.Duration(float64(nominal)*1.5), cfg.RetryMax)
		if w < lo || w > hi {
			t.Errorf("step %d: wait %s outside [%s, %s]", i, w, lo, hi)
		}
		nominal = time.Duration(float64(nominal) * 1.5)
		if nominal > cfg.RetryMax {
			nominal = cfg.RetryMax
		}
	}

	// Retry-After is a floor over the backoff.
	s = newSchedule(cfg, stored, 0)
	if w, _ := s.next(stored, 7*time.Second); w != 7*time.Second {
		t.Errorf("Retry-After 7s gave wait %s", w)
	}
	// A short Retry-After does not shorten the backoff.
	s = newSchedule(cfg, stored, 0)
	if w, _ := s.next(stored, time.Millisecond); w < 250*time.Millisecond {
		t.Errorf("tiny Retry-After shortened the backoff to %s", w)
	}
}

func TestScheduleGiveUpRule(t *testing.T) {
	t.Parallel()
	cfg := &Config{RetryInitial: 10 * time.Second, RetryMax: 30 * time.Second, RetryMaxElapsed: time.Minute}
	stored := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s := newSchedule(cfg, stored, 0)
	// 5s before the give-up time a 10s+ wait is shortened so the last
	// attempt starts exactly when the time is up.
	now := stored.Add(55 * time.Second)
	w, ok := s.next(now, 0)
	if !ok || w != 5*time.Second {
		t.Fatalf("wait = %s ok=%v, want 5s", w, ok)
	}
	// Retry-After beyond the give-up time is shortened too.
	s = newSchedule(cfg, stored, 0)
	if w, ok := s.next(stored.Add(50*time.Second), time.Hour); !ok || w != 10*time.Second {
		t.Fatalf("wait = %s ok=%v, want 10s", w, ok)
	}
	// At or after the give-up time: exhausted.
	if _, ok := s.next(stored.Add(time.Minute), 0); ok {
		t.Fatal("not exhausted at RETRY_MAX_ELAPSED")
	}
	if _, ok := s.next(stored.Add(time.Hour), 0); ok {
		t.Fatal("not exhausted an hour late")
	}
}

func TestScheduleContinuesAcrossDeliveries(t *testing.T) {
	t.Parallel()
	cfg := &Config{RetryInitial: time.Second, RetryMax: time.Hour, RetryMaxElapsed: 24 * time.Hour}
	stored := time.Now()
	first, _ := newSchedule(cfg, stored, 0).next(stored, 0)
	fifth, _ := newSchedule(cfg, stored, 4).next(stored, 0)
	// Delivery 5 starts at the 5th interval: 1.5^4 ≈ 5x the first nominal.
	if fifth < 2*time.Second || first > 1500*time.Millisecond {
		t.Errorf("delivery 1 wait %s, delivery 5 wait %s: no continuation", first, fifth)
	}
}

// A delivery makes attempts in-process until a wait is long enough to be
// handed back; the next delivery, told how many attempts were made,
// continues from there rather than from the second interval (found by
// review).
func TestScheduleContinuesAfterAHandedBackWait(t *testing.T) {
	t.Parallel()
	cfg := &Config{RetryInitial: 500 * time.Millisecond, RetryMax: 30 * time.Second, RetryMaxElapsed: 10 * time.Minute, ShortWaitMax: 5 * time.Second}
	stored := time.Now()
	s := newSchedule(cfg, stored, 0)
	attempts, handedBack := 0, time.Duration(0)
	for handedBack == 0 {
		w, _ := s.next(stored, 0)
		attempts++
		if w > cfg.ShortWaitMax {
			handedBack = w
		}
	}
	// The next nominal interval is 1.5 times the last one, and jitter is
	// ±50%: at least half the handed-back wait.
	next, _ := newSchedule(cfg, stored, attempts).next(stored, 0)
	if next < handedBack/2 {
		t.Errorf("after %d attempts and a wait of %s handed back, the next delivery waits %s", attempts, handedBack, next)
	}
}

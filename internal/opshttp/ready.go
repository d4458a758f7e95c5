package opshttp

import "sync"

// Readiness is a ReadyFunc that follows start-up. The operations server
// answers before the worker exists, so /readyz must have something to
// say while NATS connects and JetStream is set up: Readiness reports not
// ready with the start-up step as the reason until Delegate hands the
// question to the worker. It is safe for concurrent use.
type Readiness struct {
	mu       sync.Mutex
	step     string
	delegate ReadyFunc
}

// NewReadiness reports not ready, "starting: <step>", until Starting or
// Delegate says otherwise.
func NewReadiness(step string) *Readiness {
	return &Readiness{step: step}
}

// Starting names the start-up step now under way. It has no effect once
// Delegate was called.
func (r *Readiness) Starting(step string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.step = step
}

// Delegate answers every later question with fn.
func (r *Readiness) Delegate(fn ReadyFunc) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.delegate = fn
}

// Ready is the ReadyFunc to serve.
func (r *Readiness) Ready() (bool, string) {
	r.mu.Lock()
	fn, step := r.delegate, r.step
	r.mu.Unlock()
	if fn != nil {
		return fn() // outside the lock: fn may take its time
	}
	return false, "starting: " + step
}

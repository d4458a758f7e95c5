package emulator

import (
	"time"

	"go.uber.org/zap"
)

// Option configures an Emulator in New.
type Option func(*Emulator)

// WithCredentials makes the emulator require SDK-HMAC-SHA256 signed requests
// (as the API gateway does for AK/SK callers) and accept this AK/SK pair.
// It may be given several times to accept several pairs. A signed request
// must also carry a non-empty X-Project-Id header (our assumption, see the
// package documentation).
func WithCredentials(ak, sk string) Option {
	return func(e *Emulator) { e.initAuth = e.initAuth.withCredential(ak, credential{sk: sk}) }
}

// WithTemporaryCredentials is WithCredentials for temporary credentials: a
// request signed with ak must also carry X-Security-Token equal to
// securityToken.
func WithTemporaryCredentials(ak, sk, securityToken string) Option {
	return func(e *Emulator) {
		e.initAuth = e.initAuth.withCredential(ak, credential{sk: sk, securityToken: securityToken})
	}
}

// WithAuthToken makes the emulator accept requests whose X-Auth-Token equals
// token. Combined with WithCredentials, a request passes with either.
func WithAuthToken(token string) Option {
	return func(e *Emulator) { e.initAuth.token = token }
}

// WithClock sets the clock used to check X-Sdk-Date and to stamp recorded
// requests. The default is time.Now.
func WithClock(now func() time.Time) Option {
	return func(e *Emulator) {
		if now != nil {
			e.now = now
		}
	}
}

// WithLogger sets the logger. Lifecycle events are logged at info, each
// request only at debug. The default discards everything.
func WithLogger(l *zap.Logger) Option {
	return func(e *Emulator) {
		if l != nil {
			e.log = l
		}
	}
}

// WithSeed seeds the random source that decides which stop calls
// Faults.ErrorRate fails, so a test sees the same sequence on every run.
// Without it the source is seeded randomly.
func WithSeed(seed uint64) Option {
	return func(e *Emulator) {
		e.seed = seed
		e.seeded = true
	}
}

// WithRequestLogSize sets how many recent stop requests Requests keeps
// (default DefaultRequestLogSize); 0 or less keeps none.
func WithRequestLogSize(n int) Option {
	return func(e *Emulator) { e.reqLogSize = n }
}

package secretfile

import (
	"errors"
	"time"
)

const (
	// DefaultPollInterval is how often the file is re-read even when no
	// filesystem event arrived.
	DefaultPollInterval = 10 * time.Second

	// defaultDebounce is how long to gather a burst of events before one
	// re-read.
	defaultDebounce = 100 * time.Millisecond
)

// Option configures Watch.
type Option func(*options)

type options struct {
	poll     time.Duration
	debounce time.Duration
	onChange func()

	// noFSNotify turns the fsnotify watch off, leaving the poll only. Tests
	// use it to exercise the fallback.
	noFSNotify bool
	// afterRead runs after every successful re-read, changed or not, so
	// tests can wait for one instead of guessing.
	afterRead func()
}

func defaultOptions() options {
	return options{poll: DefaultPollInterval, debounce: defaultDebounce}
}

func (o *options) validate() error {
	if o.poll <= 0 {
		return errors.New("secretfile: poll interval must be positive")
	}
	if o.debounce <= 0 {
		return errors.New("secretfile: debounce must be positive")
	}
	return nil
}

// WithPollInterval sets how often the file is re-read regardless of
// filesystem events (default DefaultPollInterval). It bounds how stale the
// value can get when events are lost. It must be positive.
func WithPollInterval(d time.Duration) Option {
	return func(o *options) { o.poll = d }
}

// WithOnChange registers fn to be called after every change of the value,
// once the new value is visible through Get and Version. fn runs on the
// watching goroutine: it must return quickly and must not call Close on the
// same Value.
func WithOnChange(fn func()) Option {
	return func(o *options) { o.onChange = fn }
}

package consumer

import (
	"fmt"

	"github.com/nats-io/nats.go/jetstream"
)

// unfitError is a consumer setting under which a running worker must not
// pull (consumerUnfit); it wraps ErrMismatch.
type unfitError struct{ err error }

func (e *unfitError) Error() string { return e.err.Error() }
func (e *unfitError) Unwrap() error { return e.err }

func unfit(format string, args ...any) error {
	return &unfitError{fmt.Errorf("%w: "+format, append([]any{ErrMismatch}, args...)...)}
}

// pushConsumer is the error for a consumer under the worker's name that
// nats.go will not bind for pulls (err says why).
func pushConsumer(cfg Config, err error) error {
	return unfit("consumer %s on %s is a push consumer; the worker needs a pull consumer (%v)",
		cfg.ConsumerName, cfg.StopStream, err)
}

// consumerUnfit returns why the consumer configured as info would lose,
// strand or never get commands, nil when it would not: a push consumer,
// acks other than explicit, a filter that does not deliver STOP_SUBJECT,
// bodies withheld, a delivery count after which JetStream never delivers
// a command again, priority groups or a max_expires that refuse every
// pull. Start-up refuses such a consumer; a running worker reads the
// consumer again every consumerInfoEvery and stops pulling while it is so:
// an operator's `nats consumer edit` makes no pull fail (found by review:
// with headers_only, every command arrived empty and was rejected, acked
// and dead-lettered without its body).
func consumerUnfit(cfg Config, info jetstream.ConsumerConfig) error {
	if info.DeliverSubject != "" {
		return unfit("consumer %s on %s is a push consumer (deliver subject %q); the worker needs a pull consumer",
			cfg.ConsumerName, cfg.StopStream, info.DeliverSubject)
	}
	if info.AckPolicy != jetstream.AckExplicitPolicy {
		return unfit("consumer %s has ack policy %s; the worker needs explicit acks", cfg.ConsumerName, info.AckPolicy)
	}
	filters := info.FilterSubjects
	if info.FilterSubject != "" {
		filters = append(filters, info.FilterSubject)
	}
	if len(filters) > 0 && !anySubjectCovers(filters, cfg.StopSubject) {
		return unfit("consumer %s filters %v, which does not deliver %q", cfg.ConsumerName, filters, cfg.StopSubject)
	}
	switch {
	case info.HeadersOnly:
		return unfit("consumer %s delivers headers only; every command would arrive without its body", cfg.ConsumerName)
	case info.MaxDeliver > 0:
		return unfit("consumer %s delivers a command at most %d times (max_deliver); the worker returns commands to retry them, gives up by RETRY_MAX_ELAPSED, and needs -1",
			cfg.ConsumerName, info.MaxDeliver)
	case info.PriorityPolicy != jetstream.PriorityPolicyNone || len(info.PriorityGroups) > 0:
		return unfit("consumer %s has priority groups %v; the worker's pulls name none and would all be refused",
			cfg.ConsumerName, info.PriorityGroups)
	case info.MaxRequestExpires > 0 && info.MaxRequestExpires < pullWait:
		// A smaller max_batch only makes the pulls smaller (see reserve).
		return unfit("consumer %s lets a pull wait at most %s (max_expires); the worker's pulls wait %s",
			cfg.ConsumerName, info.MaxRequestExpires, pullWait)
	}
	return nil
}

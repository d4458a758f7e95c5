package stopcli

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// waitRanOut is what ends the run when --wait runs out; its text names the
// flag.
type waitRanOut time.Duration

func (w waitRanOut) Error() string { return fmt.Sprintf("--wait %s ran out", time.Duration(w)) }

// needs is what the NATS user of `worker stop` must be allowed.
const needs = "a scheduler's user publishes stop commands and reads the outcome stream: stream info, " +
	"and an ordered consumer it creates, pulls from and deletes; see deploy/nats/nats-server.conf"

// session is one run's connection and the contexts that end it.
type session struct {
	parent context.Context // ends on Ctrl-C or SIGTERM
	ctx    context.Context // also ends when --wait runs out or the server refuses a permission
	nc     *nats.Conn
	wait   time.Duration
	// idGiven: the command id came from --id, so it may be one the worker
	// decided before.
	idGiven bool
}

// violation returns the permissions violation the server reported, or nil.
func (s *session) violation() error {
	if cause := context.Cause(s.ctx); errors.Is(cause, nats.ErrPermissionViolation) {
		return cause
	}
	if s.nc != nil {
		if err := s.nc.LastError(); errors.Is(err, nats.ErrPermissionViolation) {
			return err
		}
	}
	return nil
}

// ranOut returns the cause when --wait ran out, or nil.
func (s *session) ranOut() error {
	var w waitRanOut
	if cause := context.Cause(s.ctx); errors.As(cause, &w) {
		return cause
	}
	return nil
}

// beforePublish words err, the failure of step, when nothing was published.
func (s *session) beforePublish(step string, err error) error {
	if v := s.violation(); v != nil {
		return fmt.Errorf("%s: nothing was published: the NATS user may not read the outcome stream (%s): %w", step, needs, v)
	}
	if s.parent.Err() != nil {
		return fmt.Errorf("interrupted (%s): nothing was published", step)
	}
	if w := s.ranOut(); w != nil {
		err = w
	}
	return fmt.Errorf("%s: %w: nothing was published", step, err)
}

// publishFailed words err, the failure of the publish to subject.
func (s *session) publishFailed(subject, id string, err error) error {
	if v := s.violation(); v != nil {
		return fmt.Errorf("publish to %s: the NATS user may not do this (%s): %w", subject, needs, v)
	}
	// Without an acknowledgement, the command may or may not be stored.
	if s.parent.Err() != nil {
		return fmt.Errorf("interrupted while publishing command %s to %s: it may have been stored, and may then still be processed", id, subject)
	}
	if w := s.ranOut(); w != nil {
		return fmt.Errorf("publish to %s: %w before JetStream acknowledged command %s: it may have been stored, and may then still be processed", subject, w, id)
	}
	return fmt.Errorf("publish to %s: %w", subject, err)
}

// duplicated says that the command published under id was a duplicate.
func duplicated(id string, ack *jetstream.PubAck) string {
	return fmt.Sprintf("command id %s was published already, within the stop stream's duplicate window (stream %s, sequence %d): "+
		"JetStream kept that command and stored nothing new", id, ack.Stream, ack.Sequence)
}

// waitFailed words the end of the wait for the outcome of command id,
// acknowledged with ack, read from since when it was a duplicate, when the
// outcome stream's oldest outcome is from first (zero: not known); r is
// the reader, nil when it could not be created.
func (s *session) waitFailed(id string, ack *jetstream.PubAck, since, first time.Time, r *outcomeReader) error {
	published := fmt.Sprintf("command %s was published (stream %s, sequence %d)", id, ack.Stream, ack.Sequence)
	if ack.Duplicate {
		published = duplicated(id, ack)
	}
	if v := s.violation(); v != nil {
		return fmt.Errorf("%s, but waiting for its outcome failed: the NATS user may not do this (%s): %w", published, needs, v)
	}
	if s.parent.Err() != nil {
		return fmt.Errorf("interrupted while waiting for the outcome: %s; that command may still be processed", published)
	}
	var msg string
	switch {
	case ack.Duplicate && first.After(since):
		// The stream's limits dropped outcomes of the time read: that
		// command's may be among them (found by review: "may not have
		// been processed yet" hid it).
		msg = fmt.Sprintf("%s; no outcome for it came within --wait %s, and the outcome stream no longer holds outcomes stored before %s (its limits dropped them): that command may have been decided already",
			published, s.wait, first.UTC().Format(time.RFC3339))
	case ack.Duplicate:
		msg = fmt.Sprintf("%s; no outcome for it came within --wait %s (outcomes stored since %s were read): that command may not have been processed yet",
			published, s.wait, since.Format(time.RFC3339))
	default:
		// Most often DLF is failing and the worker retries the command
		// (for up to RETRY_MAX_ELAPSED), or no worker runs: it is
		// stored and may still be stopped (found by review: only the
		// reused-id case below was named, also without --id).
		msg = fmt.Sprintf("%s; no outcome for it came within --wait %s: it may still be processed (a worker retrying it, or none running)",
			published, s.wait)
		if s.idGiven {
			// An id decided before the duplicate window is acked
			// without a new outcome (contract section 6) for as long as
			// the state bucket remembers it: say so, as nothing else
			// will.
			msg += "; or the worker decided this id before, and gives it no new outcome while its state bucket remembers it (STATE_TTL): leave --id out to send a new command"
		}
	}
	if err := r.err(); err != nil {
		msg += fmt.Sprintf("; reading the outcome stream last failed: %v", err)
	}
	return errors.New(msg)
}

package consumer

import (
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// The worker uses existing streams and the state bucket as they are
// (contract section 2), but some settings make one unable to work, and
// several of those lose commands without a trace: no outcome, no dead
// letter, no error anywhere. A review found start-up accepting them; the
// checks here refuse them, each naming the setting, its value and why, so
// that the operator learns at start rather than from a missing audit
// record.

// Sizes the outcome and dead-letter streams must be able to store.
const (
	// maxCommandBytes is the largest valid command body (contract
	// section 3). Only a rejected command can be larger.
	maxCommandBytes = 64 << 10
	// deadHeaderRoom is room for a dead letter's headers: Nats-Msg-Id
	// and Dlf-Error-Code (128 bytes each), Dlf-Error-Msg (the 1024 bytes
	// kept of DLF's error_msg) and Dlf-Detail (that message again, with
	// its code and some 150 bytes of text), the rest names, numbers,
	// times and the stop subject: about 3 KiB together. Headers are not
	// escaped (headerSafe only replaces CR and LF).
	deadHeaderRoom = 8 << 10
	// minDeadMsgSize is what a dead letter of any valid command (and of
	// a rejected one up to the same size) may need.
	minDeadMsgSize = maxCommandBytes + deadHeaderRoom
	// minOutcomeMsgSize bounds an outcome with every field at its limit,
	// each byte of free text counted six times (encoding/json writes <,
	// > and & and control characters as \u00XX): reason (1024 bytes,
	// contract section 3), error_msg (1024), detail (error_msg again
	// with error_code, and at most 256 bytes of its own),
	// error_code and dlf_request_id (128 each) make 6 × 3712 = 22,272
	// bytes; command_id, project_id, workspace and instance_id (384
	// bytes together), script_name (128 letters, 4 bytes each in UTF-8,
	// none escaped), worker_id (a host name and a suffix), the keys,
	// times and numbers and the Nats-Msg-Id header add under 2 KiB.
	// 32 KiB keeps room for the fields the contract says may be added
	// (TestOutcomeBoundCoversTheWorstOutcome).
	minOutcomeMsgSize = 32 << 10
)

// streamRoles says which of the worker's streams name is. One stream may
// serve more than one role when the names are configured alike; it must
// then fit each.
type streamRoles struct{ stop, outcome, dead bool }

func rolesOf(name string, cfg *Config) streamRoles {
	return streamRoles{stop: name == cfg.StopStream, outcome: name == cfg.OutcomeStream, dead: name == cfg.DeadStream}
}

// checkStreamFit refuses an existing stream (stop, outcome or dead, by its
// name) that cannot work as it is, with an error wrapping ErrMismatch per
// problem found, and warns about settings that work but drop commands in
// circumstances the worker cannot see. maxPayload is the server's
// max_payload (0: unknown).
func checkStreamFit(sc jetstream.StreamConfig, cfg *Config, maxPayload int64, log *zap.Logger) error {
	r := rolesOf(sc.Name, cfg)
	errs := checkWritable(sc, "stream "+sc.Name, r.uses())
	if r.stop {
		errs = append(errs, checkStopLimits(sc, cfg, log)...)
		errs = append(errs, checkTransform(sc, []string{cfg.StopSubject},
			fmt.Sprintf("the consumer's filter %q", cfg.StopSubject))...)
	}
	if r.outcome {
		errs = append(errs, checkMsgSize(sc, minOutcomeMsgSize, maxPayload, "outcome")...)
		errs = append(errs, checkTransform(sc, outcomeSubjects(cfg.OutcomePrefix),
			fmt.Sprintf("the auditors' %q", cfg.OutcomePrefix+".*"))...)
	}
	if r.dead {
		// Above that, a rejected command's dead letter too large for the
		// limit is cut to fit it (publishDead), as to max_payload.
		errs = append(errs, checkMsgSize(sc, minDeadMsgSize, maxPayload, "dead letter")...)
	}
	return errors.Join(errs...)
}

// use says what the worker (or a scheduler) publishes to a stream, and
// what becomes of that without a stored-ack or in a mirror.
type use struct {
	what   string // what the stream holds
	noAck  string // why a publish without a stored-ack fails the worker
	mirror string // why a mirror cannot serve
}

// uses says how the worker uses the stream; a stream in several roles is
// described by the first.
func (r streamRoles) uses() use {
	switch {
	case r.stop:
		return use{what: "stop commands",
			noAck:  "a scheduler publishing a command (or a redrive) never learns that it was stored",
			mirror: "a mirror takes no publishes, so no stop command can be stored in it"}
	case r.outcome:
		return use{what: "outcomes",
			noAck:  "no outcome the worker publishes is ever confirmed, and it acks a command only once its outcome is: every command would be returned again and again",
			mirror: "a mirror takes no publishes, so no outcome can be stored in it"}
	default:
		return use{what: "dead letters",
			noAck:  "no dead letter the worker publishes is ever confirmed, and it acks a failed command only once its dead letter is: every such command would be returned again and again",
			mirror: "a mirror takes no publishes, so no dead letter can be stored in it"}
	}
}

// checkWritable refuses a stream (which names it) that cannot store what
// is published to it with a stored-ack.
func checkWritable(sc jetstream.StreamConfig, which string, u use) []error {
	var errs []error
	if sc.Sealed {
		errs = append(errs, fmt.Errorf("%w: %s is sealed (sealed: true): it stores nothing new, so no more %s can be stored",
			ErrMismatch, which, u.what))
	}
	if sc.NoAck {
		errs = append(errs, fmt.Errorf("%w: %s does not acknowledge publishes (no_ack: true): %s",
			ErrMismatch, which, u.noAck))
	}
	if sc.Mirror != nil {
		errs = append(errs, fmt.Errorf("%w: %s is a mirror of %q (mirror): %s",
			ErrMismatch, which, sc.Mirror.Name, u.mirror))
	}
	return errs
}

// checkStopLimits refuses limits under which the stop stream drops
// commands nobody has decided: JetStream removes them without telling
// anyone, and they get no outcome and no dead letter.
func checkStopLimits(sc jetstream.StreamConfig, cfg *Config, log *zap.Logger) []error {
	var errs []error
	// A command ends within RETRY_MAX_ELAPSED + DLF_TIMEOUT of being
	// stored (contract section 6); between attempts it waits in the
	// stream, and one that ages out there is never redelivered.
	bound := cfg.RetryMaxElapsed + cfg.CallTimeout
	switch {
	case sc.MaxAge > 0 && sc.MaxAge < bound:
		errs = append(errs, fmt.Errorf("%w: stream %s drops messages after %s (max_age), less than RETRY_MAX_ELAPSED + DLF_TIMEOUT (%s): a command waiting for its next attempt would age out with no outcome and no dead letter",
			ErrMismatch, sc.Name, sc.MaxAge, bound))
	case sc.MaxAge > 0:
		// Long enough for the retries, but not for a backlog no worker
		// takes (all down, the circuit open): accepted, with a warning.
		log.Warn("the stop stream has a max_age: commands not taken by a worker within it are dropped without an outcome or a dead letter",
			zap.String("stream", sc.Name), zap.Duration("max_age", sc.MaxAge), zap.Duration("retry_max_elapsed_plus_dlf_timeout", bound))
	}
	// Under discard old a full stream makes room by dropping its oldest
	// message, a command still waiting; under discard new the publish
	// fails instead, and the scheduler knows.
	if sc.Discard == jetstream.DiscardOld && (sc.MaxMsgs > 0 || sc.MaxBytes > 0) {
		errs = append(errs, fmt.Errorf("%w: stream %s has discard old with max_msgs %d and max_bytes %d: when full it drops its oldest command with no outcome and no dead letter; discard new makes the publish fail instead",
			ErrMismatch, sc.Name, sc.MaxMsgs, sc.MaxBytes))
	}
	// The per-subject limit drops the oldest message of the subject even
	// under discard new, unless discard_new_per_subject says otherwise;
	// every command has the same subject.
	if sc.MaxMsgsPerSubject > 0 && !sc.DiscardNewPerSubject {
		errs = append(errs, fmt.Errorf("%w: stream %s keeps %d messages per subject (max_msgs_per_subject) without discard_new_per_subject: when full it drops the oldest command with no outcome and no dead letter, even under discard new",
			ErrMismatch, sc.Name, sc.MaxMsgsPerSubject))
	}
	return errs
}

// checkMsgSize refuses a stream whose max_msg_size is below need, what a
// message (an outcome, a dead letter) may take: a command whose message
// cannot be stored is never acknowledged and returns for ever. A limit at
// or above the server's max_payload limits nothing the server does not.
func checkMsgSize(sc jetstream.StreamConfig, need int64, maxPayload int64, noun string) []error {
	if sc.MaxMsgSize <= 0 {
		return nil
	}
	limit := int64(sc.MaxMsgSize)
	if maxPayload > 0 && maxPayload < need {
		need = maxPayload
	}
	if limit < need {
		return []error{fmt.Errorf("%w: stream %s limits its messages to %d bytes (max_msg_size); the worker's %ss may take up to %d, and a command whose %s cannot be stored is returned again and again",
			ErrMismatch, sc.Name, limit, noun, need, noun)}
	}
	return nil
}

// checkTransform refuses a stream subject transform that rewrites a
// subject the stream must capture: the message would be stored under
// another subject, which reader (a filter on the original) never sees.
// Transforms of individual sources are not the worker's concern: the
// worker and the schedulers publish to the stream itself.
func checkTransform(sc jetstream.StreamConfig, must []string, reader string) []error {
	tr := sc.SubjectTransform
	if tr == nil || tr.Destination == "" || tr.Source == tr.Destination {
		return nil // the server applies no transform, or one that changes nothing
	}
	src := tr.Source
	if src == "" {
		src = ">" // the server reads no source as every subject
	}
	for _, s := range must {
		if subjectMatches(src, s) {
			return []error{fmt.Errorf("%w: stream %s rewrites subjects matching %q to %q (subject_transform), %q among them: it would be stored under another subject, which %s never sees",
				ErrMismatch, sc.Name, src, tr.Destination, s, reader)}
		}
	}
	return nil
}

// checkBucketFit refuses a state bucket (its stream's config sc) that
// cannot work, and warns when its TTL is not STATE_TTL.
func checkBucketFit(sc jetstream.StreamConfig, cfg *Config, log *zap.Logger) error {
	which := fmt.Sprintf("state bucket %s (stream %s)", cfg.StateBucket, sc.Name)
	errs := checkWritable(sc, which, use{what: "state records",
		// Before each call the worker waits for the stored-ack of its
		// record of the call (markSent).
		noAck: "no record the worker writes is ever confirmed, and it calls DLF for a command only once its record of the call is: no command would ever be called",
		// nats.go sends a mirrored bucket's writes to the origin but
		// reads the mirror, which lags them.
		mirror: "its writes go to the origin and its reads lag them, and the worker must read back what it wrote (compare-and-set, the records of calls sent)"})
	// The bucket's TTL is its stream's max_age, and decides how long a
	// key lives; STATE_TTL only prunes entries inside a document. Its
	// rule is the one config validation gives STATE_TTL; a TTL equal to
	// STATE_TTL (a bucket the worker made) was judged there, and tests
	// that age state out quickly set a short one on purpose.
	switch ttl := sc.MaxAge; {
	case ttl > 0 && ttl < cfg.RetryMaxElapsed && ttl != cfg.StateTTL:
		errs = append(errs, fmt.Errorf("%w: %s forgets keys after %s (ttl, its max_age), less than RETRY_MAX_ELAPSED (%s): a command's state must outlive its retries",
			ErrMismatch, which, ttl, cfg.RetryMaxElapsed))
	case ttl != cfg.StateTTL && len(errs) == 0:
		log.Warn("the state bucket's TTL differs from STATE_TTL; the bucket's is what decides how long a key is kept (0: for ever)",
			zap.String("bucket", cfg.StateBucket), zap.Duration("bucket_ttl", ttl), zap.Duration("state_ttl", cfg.StateTTL))
	}
	return errors.Join(errs...)
}

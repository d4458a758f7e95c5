package consumer

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// Statuses an outcome can carry; each is the last token of its subject.
const (
	StatusStopped  = "stopped"
	StatusFailed   = "failed"
	StatusRejected = "rejected"
	StatusExpired  = "expired"
)

var allStatuses = []string{StatusStopped, StatusFailed, StatusRejected, StatusExpired}

// ErrMismatch is wrapped by every start-up error about an existing stream
// or consumer that cannot work as it is.
var ErrMismatch = errors.New("existing JetStream resource does not fit")

// Setup creates the streams and the durable consumer that do not exist yet
// and checks the ones that do. Existing ones are never changed: an operator
// may have tuned them, and replicas starting together must not fight.
func Setup(ctx context.Context, js jetstream.JetStream, cfg Config, log *zap.Logger) (jetstream.Consumer, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	streams := []struct {
		name      string
		subjects  []string
		retention jetstream.RetentionPolicy
		must      []string // subjects the stream has to capture
	}{
		{cfg.StopStream, []string{cfg.StopSubject}, jetstream.WorkQueuePolicy, []string{cfg.StopSubject}},
		{cfg.OutcomeStream, []string{cfg.OutcomePrefix + ".*"}, jetstream.LimitsPolicy, outcomeSubjects(cfg.OutcomePrefix)},
		{cfg.DeadStream, []string{cfg.DeadSubject}, jetstream.LimitsPolicy, []string{cfg.DeadSubject}},
	}
	for _, s := range streams {
		if err := ensureStream(ctx, js, s.name, s.subjects, s.retention, &cfg, s.must, log); err != nil {
			return nil, err
		}
	}
	if !cfg.DisableState {
		if _, err := ensureState(ctx, js, &cfg, log); err != nil {
			return nil, err
		}
	}
	return ensureConsumer(ctx, js, cfg, log)
}

func outcomeSubjects(prefix string) []string {
	out := make([]string, len(allStatuses))
	for i, s := range allStatuses {
		out[i] = prefix + "." + s
	}
	return out
}

func ensureStream(ctx context.Context, js jetstream.JetStream, name string, subjects []string,
	retention jetstream.RetentionPolicy, cfg *Config, must []string, log *zap.Logger) error {
	s, err := js.Stream(ctx, name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		_, err = js.CreateStream(ctx, jetstream.StreamConfig{
			Name:      name,
			Subjects:  subjects,
			Retention: retention,
			Storage:   jetstream.FileStorage,
			Replicas:  cfg.Replicas,
			// Duplicates left zero: JetStream's default window (2 minutes).
		})
		if err == nil {
			log.Info("created stream", zap.String("stream", name), zap.Strings("subjects", subjects))
			return nil
		}
		if !errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			return fmt.Errorf("create stream %s: %w", name, err)
		}
		// Another replica won the race; use what it made.
		s, err = js.Stream(ctx, name)
	}
	if errors.Is(err, nats.ErrNoResponders) {
		// Nothing answers the JetStream API (found by review: the bare
		// "no responders" sent operators looking for a missing stream).
		return fmt.Errorf("look up stream %s: JetStream is not enabled on the NATS server or for this account, or the JetStream domain differs: %w", name, err)
	}
	if err != nil {
		return fmt.Errorf("look up stream %s: %w", name, err)
	}
	// Before the subjects: a mirror has none, and its mismatch is being
	// a mirror.
	if err := checkStreamFit(s.CachedInfo().Config, cfg, js.Conn().MaxPayload(), log); err != nil {
		return err
	}
	have := s.CachedInfo().Config.Subjects
	for _, want := range must {
		if !anySubjectCovers(have, want) {
			return fmt.Errorf("%w: stream %s has subjects %v, which do not capture %q", ErrMismatch, name, have, want)
		}
	}
	if got := s.CachedInfo().Config.Retention; got != retention {
		log.Warn("existing stream has another retention than the worker would create; using it as it is",
			zap.String("stream", name), zap.Stringer("retention", got), zap.Stringer("expected", retention))
	}
	return nil
}

func ensureConsumer(ctx context.Context, js jetstream.JetStream, cfg Config, log *zap.Logger) (jetstream.Consumer, error) {
	c, err := js.Consumer(ctx, cfg.StopStream, cfg.ConsumerName)
	if errors.Is(err, jetstream.ErrConsumerNotFound) {
		c, err = js.CreateConsumer(ctx, cfg.StopStream, jetstream.ConsumerConfig{
			Name:          cfg.ConsumerName,
			Durable:       cfg.ConsumerName,
			AckPolicy:     jetstream.AckExplicitPolicy,
			AckWait:       cfg.AckWait,
			MaxDeliver:    -1, // giving up is decided by RETRY_MAX_ELAPSED, never by a count
			MaxAckPending: cfg.maxAckPending(),
			FilterSubject: cfg.StopSubject,
			DeliverPolicy: jetstream.DeliverAllPolicy,
		})
		if err == nil {
			log.Info("created consumer", zap.String("stream", cfg.StopStream), zap.String("consumer", cfg.ConsumerName))
		} else if errors.Is(err, jetstream.ErrConsumerExists) {
			c, err = js.Consumer(ctx, cfg.StopStream, cfg.ConsumerName)
		}
	}
	if errors.Is(err, jetstream.ErrNotPullConsumer) {
		return nil, pushConsumer(cfg, err)
	}
	if err != nil {
		return nil, fmt.Errorf("bind consumer %s on %s: %w", cfg.ConsumerName, cfg.StopStream, err)
	}
	info := c.CachedInfo().Config
	if err := consumerUnfit(cfg, info); err != nil {
		return nil, err
	}
	// JetStream would add it to the delay of every command the worker
	// returns to retry later (found by review). Refused at start only: a
	// running worker's heartbeats follow one added meanwhile (noteLimits).
	if len(info.BackOff) > 0 {
		return nil, fmt.Errorf("%w: consumer %s has a redelivery backoff %v, which JetStream adds to the delay of every command the worker returns to retry later; the worker paces retries itself",
			ErrMismatch, cfg.ConsumerName, info.BackOff)
	}
	if info.MaxAckPending > 0 && info.MaxAckPending < cfg.heldLimit() {
		log.Warn("consumer max-ack-pending is below what one worker holds; replicas will be starved",
			zap.Int("max_ack_pending", info.MaxAckPending), zap.Int("held_limit", cfg.heldLimit()))
	}
	return c, nil
}

// anySubjectCovers reports whether one of the patterns matches subject,
// with NATS wildcards: '*' one token, '>' one or more trailing tokens.
func anySubjectCovers(patterns []string, subject string) bool {
	for _, p := range patterns {
		if subjectMatches(p, subject) {
			return true
		}
	}
	return false
}

func subjectMatches(pattern, subject string) bool {
	pt := strings.Split(pattern, ".")
	st := strings.Split(subject, ".")
	for i, p := range pt {
		if p == ">" {
			return len(st) > i
		}
		if i >= len(st) {
			return false
		}
		if p != "*" && p != st[i] {
			return false
		}
	}
	return len(pt) == len(st)
}

package consumer

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// The state bucket makes "one outcome per command" hold beyond the
// stream's duplicate window, and lets the worker recognise a stop that
// happened although its answer was lost. It is a JetStream key-value
// bucket, so replicas share it without any locking of our own.
//
// Two kinds of key:
//
//	cmd.<base64url(command id)>  the command's progress: calls made, whether
//	                             one went unanswered, and whether it is decided
//	inst.<instance key>          an instance some command stopped
//
// Command ids may hold ':' and "..", which KV keys may not, hence base64.

// Phases of a command record.
const (
	phaseCalling  = "calling"  // a call is (or was, if we crashed) on the wire
	phaseAnswered = "answered" // the last call got an answer; retrying
	phaseDecided  = "decided"  // outcome stored; the command is done
)

type cmdRecord struct {
	Phase      string `json:"p"`
	Attempts   int    `json:"a"`
	Unanswered bool   `json:"u,omitempty"` // some call was sent and got no answer
	Status     string `json:"s,omitempty"`
	Cause      string `json:"c,omitempty"`
}

type instRecord struct {
	CommandID string `json:"c"`
	StoppedAt string `json:"t"`
}

type stateStore struct {
	js     jetstream.JetStream
	kv     jetstream.KeyValue
	prefix string // "$KV.<bucket>."
}

func cmdKey(id string) string { return "cmd." + base64.RawURLEncoding.EncodeToString([]byte(id)) }
func instKey(k string) string { return "inst." + k }

// ensureState binds the bucket, creating it when missing. An existing
// bucket is used as it is (an operator may have tuned its TTL).
func ensureState(ctx context.Context, js jetstream.JetStream, cfg *Config, log *zap.Logger) (*stateStore, error) {
	kv, err := js.KeyValue(ctx, cfg.StateBucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		kv, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:      cfg.StateBucket,
			Description: "dlf-stop worker: per-command state and stopped instances",
			History:     1,
			TTL:         cfg.StateTTL,
			Storage:     jetstream.FileStorage,
			Replicas:    cfg.Replicas,
		})
		if err == nil {
			log.Info("created state bucket", zap.String("bucket", cfg.StateBucket), zap.Duration("ttl", cfg.StateTTL))
		} else if errors.Is(err, jetstream.ErrBucketExists) || errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			kv, err = js.KeyValue(ctx, cfg.StateBucket)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("bind state bucket %s: %w", cfg.StateBucket, err)
	}
	return &stateStore{js: js, kv: kv, prefix: "$KV." + cfg.StateBucket + "."}, nil
}

// lookup reads the command record and, when instance is not empty, the
// instance record, concurrently: one round trip on the common path.
func (s *stateStore) lookup(ctx context.Context, id, instance string) (cmd *cmdRecord, stoppedBy *instRecord, err error) {
	type res struct {
		e   jetstream.KeyValueEntry
		err error
	}
	instCh := make(chan res, 1)
	if instance != "" {
		go func() {
			e, err := s.kv.Get(ctx, instKey(instance))
			instCh <- res{e, err}
		}()
	}
	e, err := s.kv.Get(ctx, cmdKey(id))
	switch {
	case err == nil:
		cmd = &cmdRecord{}
		if jerr := json.Unmarshal(e.Value(), cmd); jerr != nil {
			cmd = nil // an unreadable record is no record; never block a command on it
		}
	case !errors.Is(err, jetstream.ErrKeyNotFound):
		return nil, nil, fmt.Errorf("read command state: %w", err)
	}
	if instance == "" {
		return cmd, nil, nil
	}
	r := <-instCh
	switch {
	case r.err == nil:
		stoppedBy = &instRecord{}
		if jerr := json.Unmarshal(r.e.Value(), stoppedBy); jerr != nil {
			stoppedBy = nil
		}
	case !errors.Is(r.err, jetstream.ErrKeyNotFound):
		return nil, nil, fmt.Errorf("read instance state: %w", r.err)
	}
	return cmd, stoppedBy, nil
}

// putAsync stores a record without waiting; the caller awaits the future
// together with its other publishes.
func (s *stateStore) putAsync(key string, v any) (jetstream.PubAckFuture, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	m := nats.NewMsg(s.prefix + key)
	m.Data = b
	return s.js.PublishMsgAsync(m)
}

// put stores a record and waits for the stored-ack.
func (s *stateStore) put(ctx context.Context, key string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	m := nats.NewMsg(s.prefix + key)
	m.Data = b
	_, err = s.js.PublishMsg(ctx, m)
	return err
}

// awaitAll waits for every future's stored-ack.
func awaitAll(ctx context.Context, futures []jetstream.PubAckFuture) error {
	for _, f := range futures {
		select {
		case <-f.Ok():
		case err := <-f.Err():
			return err
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

func nowString(t time.Time) string { return FormatTime(t) }

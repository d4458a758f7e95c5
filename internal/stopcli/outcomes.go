package stopcli

import (
	"context"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

const (
	// inactiveThreshold is how long the server keeps a consumer of
	// `worker stop` that nobody pulls from: one left behind by a run that
	// was killed, or lost its connection at the end, goes away on its
	// own. It is longer than a pull request lives (30 s), so a consumer in
	// use is never taken for idle; a deleted one is re-created anyway.
	inactiveThreshold = time.Minute
	// cleanupWithin bounds stopping the consumer and deleting it at the
	// end: the ordered consumer's Stop waits for a re-creation in
	// progress, which retries for as long as NATS cannot be reached.
	cleanupWithin = 2 * time.Second
)

// outcomeReader waits for the outcome event of one command in the outcome
// stream, read through an ordered consumer. Unlike a core subscription it
// misses nothing stored while the connection was down: after a reconnect
// (a server restart, a dropped link, lame duck mode) the ordered consumer
// re-creates itself from the last message it saw.
type outcomeReader struct {
	js     jetstream.JetStream
	stream string
	cons   jetstream.Consumer
	cc     jetstream.ConsumeContext
	// got receives the body of the first outcome whose Nats-Msg-Id is the
	// command id.
	got chan []byte

	mu      sync.Mutex
	lastErr error // the last error the ordered consumer reported
}

// readOutcomes creates an ordered consumer on stream, filtered to filter,
// that starts where from says, and consumes it until stop. The consumer
// is created and its first pull request sent before it returns, so a user
// that may do neither learns it from the server before anything else
// happens.
func readOutcomes(ctx context.Context, js jetstream.JetStream, stream, filter, id string, from jetstream.OrderedConsumerConfig) (*outcomeReader, error) {
	from.FilterSubjects = []string{filter}
	from.InactiveThreshold = inactiveThreshold
	cons, err := js.OrderedConsumer(ctx, stream, from)
	if err != nil {
		return nil, err
	}
	r := &outcomeReader{js: js, stream: stream, cons: cons, got: make(chan []byte, 1)}
	r.cc, err = cons.Consume(func(m jetstream.Msg) {
		if m.Headers().Get(jetstream.MsgIDHeader) != id {
			return
		}
		select {
		case r.got <- m.Data():
		default: // the first one is enough
		}
	}, jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
		r.mu.Lock()
		r.lastErr = err
		r.mu.Unlock()
	}))
	if err != nil {
		r.deleteConsumer(time.Now().Add(cleanupWithin))
		return nil, err
	}
	return r, nil
}

// err returns the last error the ordered consumer reported, or nil (also
// for a nil reader).
func (r *outcomeReader) err() error {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lastErr
}

// stop ends the reading and deletes the consumer, both within
// cleanupWithin; what is not done by then is left to inactiveThreshold.
// A nil reader is stopped already.
func (r *outcomeReader) stop() {
	if r == nil {
		return
	}
	deadline := time.Now().Add(cleanupWithin)
	stopped := make(chan struct{})
	go func() {
		r.cc.Stop()
		close(stopped)
	}()
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	select {
	case <-stopped:
		r.deleteConsumer(deadline)
	case <-timer.C:
	}
}

func (r *outcomeReader) deleteConsumer(deadline time.Time) {
	if !r.js.Conn().IsConnected() {
		return
	}
	info := r.cons.CachedInfo()
	if info == nil {
		return
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	_ = r.js.DeleteConsumer(ctx, r.stream, info.Name)
}

package consumer

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// stateWriter stores the decision record of a command without a goroutine
// waiting for it. The write is an ordinary JetStream publish with a
// compare-and-set header and a reply subject; the stored-ack (or the
// refusal) arrives on one shared subscription whose handler runs the
// command's continuation, which acks it.
//
// Why not kv.Update: a goroutine parked on a request and woken by its
// reply costs, on a two-core machine, about three times what storing the
// message costs the server. The decision write is the main per-command
// step the reliability features add to a first delivery that DLF answers
// 204, and the budget for them is a fifth of the throughput.
//
// Writes and "sent" marks are not published by the command's goroutine but
// queued, and one goroutine (syncLoop) publishes everything queued at once,
// the marks' flush right behind. Published one by one from many
// goroutines, each small message tended to go out in a write system call
// of its own and to wake the server's reader for itself; in a burst they
// share them (about 8 µs of CPU per command on the benchmark, a tenth of
// the reliability features' cost).
type stateWriter struct {
	nc     *nats.Conn
	prefix string // $KV.<bucket>.
	inbox  string
	sub    *nats.Subscription

	mu      sync.Mutex
	seq     uint64
	pending map[string]*pendingWrite // by reply token
	stop    chan struct{}
	done    sync.WaitGroup

	// What syncLoop publishes next: marks (each waiting for the flush
	// after it) and writes (waiting for their stored-ack).
	syncMu   sync.Mutex
	syncers  []syncer
	writes   []*nats.Msg
	syncKick chan struct{}

	afterMarks func() // a test's hook between the marks' publish and their flush
}

// syncer is a put waiting in putSynced for the flush after it.
type syncer struct {
	subject string
	value   []byte
	done    chan error
}

type pendingWrite struct {
	key      string
	deadline time.Time
	then     func(rev uint64, err error)
}

// errWrongRevision is a compare-and-set refusal: another writer updated
// the key since it was read.
var errWrongRevision = errors.New("state key changed since it was read")

// writeSweep is how often writes without an answer are looked for.
const writeSweep = time.Second

func newStateWriter(nc *nats.Conn, bucket string) (*stateWriter, error) {
	w := &stateWriter{
		nc:       nc,
		prefix:   "$KV." + bucket + ".",
		inbox:    nc.NewRespInbox(),
		pending:  map[string]*pendingWrite{},
		stop:     make(chan struct{}),
		syncKick: make(chan struct{}, 1),
	}
	sub, err := nc.Subscribe(w.inbox+".*", w.answer)
	if err != nil {
		return nil, fmt.Errorf("state writes: %w", err)
	}
	// Answers are tiny and their handler never blocks; a burst of them
	// must not be dropped as a slow consumer.
	_ = sub.SetPendingLimits(-1, -1)
	w.sub = sub
	w.done.Add(2)
	go w.sweep()
	go w.syncLoop()
	return w, nil
}

// close fails every write still without an answer and stops the writer.
func (w *stateWriter) close() {
	close(w.stop)
	w.done.Wait()
	_ = w.sub.Unsubscribe()
	w.mu.Lock()
	left := w.pending
	w.pending = map[string]*pendingWrite{}
	w.mu.Unlock()
	for _, p := range left {
		p.then(0, errors.New("write state: worker stopped before the answer"))
	}
}

// write stores value under key if the key is still at revision rev (0:
// the key must not exist). then runs exactly once, on the answer's
// goroutine or the sweeper's, so it must not block: slow work goes to a
// goroutine of its own.
func (w *stateWriter) write(key string, value []byte, rev uint64, timeout time.Duration, then func(rev uint64, err error)) {
	m := nats.NewMsg(w.prefix + key)
	m.Data = value
	m.Header.Set(jetstream.ExpectedLastSubjSeqHeader, strconv.FormatUint(rev, 10))
	w.mu.Lock()
	w.seq++
	token := strconv.FormatUint(w.seq, 36)
	w.pending[token] = &pendingWrite{key: key, deadline: time.Now().Add(timeout), then: then}
	w.mu.Unlock()
	m.Reply = w.inbox + "." + token
	w.syncMu.Lock()
	w.writes = append(w.writes, m)
	w.syncMu.Unlock()
	w.kick()
}

func (w *stateWriter) kick() {
	select {
	case w.syncKick <- struct{}{}:
	default:
	}
}

// put stores value under key without a compare-and-set and without asking
// for the stored-ack: for records whose loss costs little and whose
// writers never conflict. A put lost with a broken connection or a
// crashed server is not noticed.
func (w *stateWriter) put(key string, value []byte) {
	_ = w.nc.Publish(w.prefix+key, value)
}

// putSynced is put, returning once the server has read the put: a flush
// round trip answers after everything this connection sent before it, and
// a message the server has read is stored unless the server itself fails.
// That is cheaper than a stored-ack, and enough for a mark that must not
// be overtaken by the call it announces.
//
// Puts waiting at once share one round trip (syncLoop): under load the
// answer to a flush queues behind everything else the server sends this
// connection, and a round trip per command would cost each of them that
// wait and the server a PING each.
func (w *stateWriter) putSynced(ctx context.Context, key string, value []byte) error {
	done := make(chan error, 1)
	w.syncMu.Lock()
	w.syncers = append(w.syncers, syncer{subject: w.prefix + key, value: value, done: done})
	w.syncMu.Unlock()
	w.kick()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("write state %s: %w", key, err)
		}
		return nil
	case <-ctx.Done():
	}
	// A put given up must not go out later: it would overwrite whatever
	// the caller writes under the key next (a decided index, say). Still
	// queued, it is taken back; already taken, it is published by the time
	// its answer comes, which is then waited for (at most a flush).
	w.syncMu.Lock()
	for i, s := range w.syncers {
		if s.done == done {
			w.syncers = slices.Delete(w.syncers, i, i+1)
			w.syncMu.Unlock()
			return fmt.Errorf("write state %s: %w", key, ctx.Err())
		}
	}
	w.syncMu.Unlock()
	<-done
	return fmt.Errorf("write state %s: %w", key, ctx.Err())
}

// errReconnected fails the puts of a flush answered after a reconnect.
var errReconnected = errors.New("NATS reconnected before the flush; the write may be lost")

// syncLoop publishes what is queued: writes at once, marks with a flush
// right behind them. One flush is on the wire at a time, waited for on a
// goroutine of its own so that writes go out meanwhile; marks queued during
// it wait for the next one.
//
// A flush answered on a connection made after the marks were sent proves
// nothing: they may have died with the old one. So the marks of a flush
// fail when the connection's reconnect count changed between their publish
// and the flush's answer. (It is read per flush, not per mark: reading it
// takes the connection's lock, which every publish takes too.)
func (w *stateWriter) syncLoop() {
	defer w.done.Done()
	flushed := make(chan struct{}, 1)
	flushing := false
	for {
		select {
		case <-w.stop:
			if flushing {
				<-flushed
			}
			w.syncMu.Lock()
			left := w.syncers
			w.syncers = nil
			w.syncMu.Unlock()
			for _, s := range left {
				s.done <- errors.New("worker stopped before the flush")
			}
			return // queued writes are failed by close, with every pending write
		case <-w.syncKick:
		case <-flushed:
			flushing = false
		}
		w.syncMu.Lock()
		writes := w.writes
		w.writes = nil
		var marks []syncer
		if !flushing {
			marks = w.syncers
			w.syncers = nil
		}
		w.syncMu.Unlock()
		for _, m := range writes {
			if err := w.nc.PublishMsg(m); err != nil {
				if p := w.take(m.Reply[len(w.inbox)+1:]); p != nil {
					p.then(0, fmt.Errorf("write state %s: %w", p.key, err))
				}
			}
		}
		if len(marks) == 0 {
			continue
		}
		before := w.nc.Stats().Reconnects
		sent := marks[:0] // in place: sent never overtakes the loop
		for _, s := range marks {
			if err := w.nc.Publish(s.subject, s.value); err != nil {
				s.done <- err
				continue
			}
			sent = append(sent, s)
		}
		if w.afterMarks != nil {
			w.afterMarks()
		}
		flushing = true
		go func() {
			err := w.nc.FlushTimeout(publishTimeout)
			if err == nil && w.nc.Stats().Reconnects != before {
				err = errReconnected
			}
			for _, s := range sent {
				s.done <- err
			}
			flushed <- struct{}{}
		}()
	}
}

func (w *stateWriter) take(token string) *pendingWrite {
	w.mu.Lock()
	defer w.mu.Unlock()
	p := w.pending[token]
	delete(w.pending, token)
	return p
}

// pubAck is the part of JetStream's publish answer the writer reads.
type pubAck struct {
	Seq   uint64 `json:"seq"`
	Error *struct {
		Code        int    `json:"code"`
		ErrCode     int    `json:"err_code"`
		Description string `json:"description"`
	} `json:"error"`
}

// jsWrongLastSequence is JetStream's error code for a failed
// expected-last-subject-sequence check.
const jsWrongLastSequence = 10071

func (w *stateWriter) answer(m *nats.Msg) {
	p := w.take(m.Subject[len(w.inbox)+1:])
	if p == nil {
		return // answered after the sweeper gave up on it
	}
	if status := m.Header.Get("Status"); status != "" {
		// 503: no stream listens on the subject (bucket deleted, or
		// no leader at the moment).
		p.then(0, fmt.Errorf("write state %s: status %s %s", p.key, status, m.Header.Get("Description")))
		return
	}
	ack, err := parsePubAck(m.Data)
	switch {
	case err != nil:
		p.then(0, fmt.Errorf("write state %s: unreadable answer: %w", p.key, err))
	case ack.Error != nil && ack.Error.ErrCode == jsWrongLastSequence:
		p.then(0, fmt.Errorf("write state %s: %w", p.key, errWrongRevision))
	case ack.Error != nil:
		p.then(0, fmt.Errorf("write state %s: %s (%d)", p.key, ack.Error.Description, ack.Error.ErrCode))
	case ack.Seq == 0:
		p.then(0, fmt.Errorf("write state %s: answer without a sequence", p.key))
	default:
		p.then(ack.Seq, nil)
	}
}

// sweep fails writes whose answer did not come in time: lost with a
// broken connection or a stream leader that changed. Such a write may
// still have been stored; the caller treats it like any failed write and
// the next delivery reads what is really there.
func (w *stateWriter) sweep() {
	defer w.done.Done()
	t := time.NewTicker(writeSweep)
	defer t.Stop()
	for {
		select {
		case <-w.stop:
			return
		case now := <-t.C:
			var late []*pendingWrite
			w.mu.Lock()
			for token, p := range w.pending {
				if now.After(p.deadline) {
					late = append(late, p)
					delete(w.pending, token)
				}
			}
			w.mu.Unlock()
			for _, p := range late {
				p.then(0, fmt.Errorf("write state %s: no answer in time", p.key))
			}
		}
	}
}

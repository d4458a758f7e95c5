package consumer

import (
	"context"
	"errors"
	"fmt"
	"runtime"
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
// queued, and one goroutine (syncLoop) publishes everything queued at once.
// Published one by one from many goroutines, each small message tended to
// go out in a write system call of its own and to wake the server's reader
// for itself; in a burst they share them (about 8 µs of CPU per command on
// the benchmark, a tenth of the reliability features' cost).
type stateWriter struct {
	nc     *nats.Conn
	prefix string // $KV.<bucket>.
	inbox  string
	sub    *nats.Subscription

	mu      sync.Mutex
	seq     uint64
	reply   []byte                   // where send builds a reply subject
	pending map[string]*pendingWrite // by reply token
	stop    chan struct{}
	done    sync.WaitGroup

	// What syncLoop publishes next, each write waiting for its stored-ack.
	syncMu   sync.Mutex
	writes   []*nats.Msg
	syncKick chan struct{}

	beforeBurst func() // a test's hook, run before each burst is taken
}

type pendingWrite struct {
	key      string
	timeout  time.Duration // the answer is waited for this long from when it was queued, and again once published
	deadline time.Time
	then     func(rev uint64, err error)
	// done takes the answer instead of then, for a caller that waits
	// for it (putAcked): a closure over a channel cost two allocations
	// more on every "sent" mark.
	done chan writeAnswer
	// sending: syncLoop is publishing it. The sweeper leaves it be
	// until the publish returned, so that a write is never reported
	// failed and then sent (a publish can stall, on the connection's
	// lock, behind a socket the server stopped reading).
	sending bool
}

type writeAnswer struct {
	rev uint64
	err error
}

// finish hands the write's answer to its caller.
func (p *pendingWrite) finish(rev uint64, err error) {
	if p.done != nil {
		p.done <- writeAnswer{rev, err}
		return
	}
	p.then(rev, err)
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
		p.finish(0, errors.New("write state: worker stopped before the answer"))
	}
}

// write stores value under key if the key is still at revision rev (0:
// the key must not exist). then runs exactly once, on the answer's
// goroutine or the sweeper's, so it must not block: slow work goes to a
// goroutine of its own.
func (w *stateWriter) write(key string, value []byte, rev uint64, timeout time.Duration, then func(rev uint64, err error)) {
	q := w.queued(key, value, rev, pendingWrite{key: key, timeout: timeout, then: then})
	w.send(&q.m, &q.p)
}

// queued builds the write of value under key over revision rev, waiting
// as p says.
func (w *stateWriter) queued(key string, value []byte, rev uint64, p pendingWrite) *queuedWrite {
	return &queuedWrite{m: nats.Msg{Subject: w.prefix + key, Data: value, Header: revHeader(rev)}, p: p}
}

// queuedWrite is a write's message and its pending answer, allocated
// together: every command makes two. Never pooled: syncLoop may still
// touch the pending answer after the write was answered.
type queuedWrite struct {
	m nats.Msg
	p pendingWrite
}

// answerChans holds the channels on which putAcked waits, each empty and
// known to no write: one made for every "sent" mark was a tenth of the
// allocations the mark adds to a command.
var answerChans = sync.Pool{New: func() any { return make(chan writeAnswer, 1) }}

// zeroRev is the header of a write to a key that must not exist yet, as
// most are (a command's first mark, an instance's first decision). It is
// shared, as nats.go only reads a message's header (and nothing here may
// set one on a message that carries it): a header of its own
// cost each write three allocations, a tenth of what the state bucket
// adds to a command's.
var zeroRev = nats.Header{jetstream.ExpectedLastSubjSeqHeader: {"0"}}

// revHeader is the compare-and-set header of a write over revision rev.
func revHeader(rev uint64) nats.Header {
	if rev == 0 {
		return zeroRev
	}
	return nats.Header{jetstream.ExpectedLastSubjSeqHeader: {strconv.FormatUint(rev, 10)}}
}

// send queues m, a publish to the bucket, for syncLoop, with a reply
// subject on which its stored-ack comes back to p.
func (w *stateWriter) send(m *nats.Msg, p *pendingWrite) {
	p.deadline = time.Now().Add(p.timeout)
	w.mu.Lock()
	w.seq++
	// One allocation for the reply subject; its token, a substring, keys
	// the pending write.
	w.reply = strconv.AppendUint(append(append(w.reply[:0], w.inbox...), '.'), w.seq, 36)
	m.Reply = string(w.reply)
	w.pending[m.Reply[len(w.inbox)+1:]] = p
	w.mu.Unlock()
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

// putAcked is put, returning once JetStream has stored the put: for a
// "sent" mark, which must be stored before the call it announces leaves.
//
// A flush round trip is cheaper (about 6 µs of CPU per command on the
// benchmark) but proves only that the server read the put: a bucket
// stream that lost its leader, refused the write, or a server that
// crashed, lost marks it had read, and calls went out unmarked. CI saw
// it: a restarted cluster node took 18 marks with it, and the DLF.6205 of
// each redelivery was dead-lettered although its stop had happened.
//
// A put given up while still queued is taken back: it would overwrite
// what the caller writes under the key next. One already sent is waited
// for, at most the publish timeout, for the same reason.
//
// The put is a compare-and-set on rev, the key's revision as the caller
// last read or wrote it (0: it must not exist), and returns the new one.
func (w *stateWriter) putAcked(ctx context.Context, key string, value []byte, rev uint64) (uint64, error) {
	done := answerChans.Get().(chan writeAnswer)
	q := w.queued(key, value, rev, pendingWrite{key: key, timeout: publishTimeout, done: done})
	m := &q.m
	w.send(m, &q.p)
	select {
	case a := <-done:
		answerChans.Put(done) // answered once, and taken from pending first
		return a.rev, a.err
	case <-ctx.Done():
	}
	w.syncMu.Lock()
	for i, q := range w.writes {
		if q == m {
			w.writes = slices.Delete(w.writes, i, i+1)
			w.syncMu.Unlock()
			if w.take(m.Reply[len(w.inbox)+1:]) != nil {
				// Nothing else can answer it now. Taken by another
				// (the sweeper, close), it is answered on done later:
				// the channel is left to the garbage collector.
				answerChans.Put(done)
			}
			return 0, fmt.Errorf("write state %s: %w", key, ctx.Err())
		}
	}
	w.syncMu.Unlock()
	<-done
	answerChans.Put(done)
	return 0, fmt.Errorf("write state %s: %w", key, ctx.Err())
}

// syncLoop publishes what is queued, everything queued at once.
func (w *stateWriter) syncLoop() {
	defer w.done.Done()
	for {
		select {
		case <-w.stop:
			return // queued writes are failed by close, with every pending write
		case <-w.syncKick:
		}
		if w.beforeBurst != nil {
			w.beforeBurst()
		}
		// Let the goroutines that are about to queue a write run first:
		// woken at once, this loop took 1.4 writes a burst on the
		// benchmark, and paid a wake-up and a publish round of its own
		// for nearly every one; after yielding, 14. When nothing else
		// is runnable, Gosched returns at once.
		runtime.Gosched()
		w.syncMu.Lock()
		writes := w.writes
		w.writes = nil
		w.syncMu.Unlock()
		for _, m := range writes {
			// A write the sweeper failed while it was queued (this loop
			// stalled in a publish) is not sent: its caller was told it
			// failed, and may write the key next.
			token := m.Reply[len(w.inbox)+1:]
			w.mu.Lock()
			p := w.pending[token]
			if p != nil {
				p.sending = true
			}
			w.mu.Unlock()
			if p == nil {
				continue
			}
			err := w.nc.PublishMsg(m)
			w.mu.Lock()
			p.sending = false
			p.deadline = time.Now().Add(p.timeout)
			w.mu.Unlock()
			if err != nil {
				if p := w.take(token); p != nil {
					p.finish(0, fmt.Errorf("write state %s: %w", p.key, err))
				}
			}
		}
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

// JetStream's error codes for a failed expected-last-subject-sequence
// check: a stream of one replica answers the first, a replicated stream's
// leader the second when it refuses the write before proposing it.
const (
	jsWrongLastSequence         = 10071
	jsWrongLastSequenceConstant = 10164
)

// wrongRevision says whether a JetStream error code is a compare-and-set
// refusal.
func wrongRevision(code int) bool {
	return code == jsWrongLastSequence || code == jsWrongLastSequenceConstant
}

func (w *stateWriter) answer(m *nats.Msg) {
	p := w.take(m.Subject[len(w.inbox)+1:])
	if p == nil {
		return // answered after the sweeper gave up on it
	}
	if status := m.Header.Get("Status"); status != "" {
		// 503: no stream listens on the subject (bucket deleted, or
		// no leader at the moment).
		p.finish(0, fmt.Errorf("write state %s: status %s %s", p.key, status, m.Header.Get("Description")))
		return
	}
	ack, err := parsePubAck(m.Data)
	switch {
	case err != nil:
		p.finish(0, fmt.Errorf("write state %s: unreadable answer: %w", p.key, err))
	case ack.Error != nil && wrongRevision(ack.Error.ErrCode):
		p.finish(0, fmt.Errorf("write state %s: %w", p.key, errWrongRevision))
	case ack.Error != nil:
		p.finish(0, fmt.Errorf("write state %s: %s (%d)", p.key, ack.Error.Description, ack.Error.ErrCode))
	case ack.Seq == 0:
		p.finish(0, fmt.Errorf("write state %s: answer without a sequence", p.key))
	default:
		p.finish(ack.Seq, nil)
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
				if now.After(p.deadline) && !p.sending {
					late = append(late, p)
					delete(w.pending, token)
				}
			}
			w.mu.Unlock()
			for _, p := range late {
				p.finish(0, fmt.Errorf("write state %s: no answer in time", p.key))
			}
		}
	}
}

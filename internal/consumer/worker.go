package consumer

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/command"
	"github.com/dlf-stop/worker/internal/dlf"
)

// Stopper is the one DLF operation the loop needs; *dlf.Client satisfies it.
type Stopper interface {
	Stop(ctx context.Context, r dlf.StopRequest) (*dlf.Response, error)
}

// Option configures injected dependencies of a Worker.
type Option func(*Worker)

// WithClock replaces time.Now, for tests of time-dependent rules.
func WithClock(now func() time.Time) Option { return func(w *Worker) { w.now = now } }

// Worker consumes stop commands. Create it with New, run it with Run.
//
// Shutdown has two phases. When Run's context ends the worker stops
// fetching (soft stop): calls on the wire may finish and their commands are
// decided normally, while commands waiting to retry are returned at once.
// After ShutdownTimeout every call still running is cancelled (hard stop)
// and its command is returned too. Returned means Nak without delay, so
// another replica takes it immediately.
type Worker struct {
	cfg  Config
	js   jetstream.JetStream
	cons jetstream.Consumer
	dlf  Stopper
	log  *zap.Logger
	m    *Metrics
	pub  publisher
	now  func() time.Time

	// The bound consumer's ack wait (the shortest of its back-off, when it
	// has one) and pull batch limit (0: none), read again at every bind
	// and every consumerInfoEvery (watchLimits): an operator may recreate
	// or edit the consumer under a running worker, and heartbeats spaced
	// for the old ack wait would let JetStream hand a command that is
	// being worked on to another worker.
	ackWait atomic.Int64
	pullMax atomic.Int64
	slots   chan struct{} // DLF calls in flight
	held    chan struct{} // commands held by this worker
	waiting atomic.Int64  // commands sleeping in-process before a retry

	state *stateStore // nil when DisableState
	// stateCheckedAt (unix nanoseconds) rate-limits looking for a state
	// bucket that has gone missing (see checkState).
	stateCheckedAt atomic.Int64
	// marksRefused: the last "sent" mark the bucket was asked to store
	// was not stored, so calls are held back until one is (see
	// callUnmarked). pullsUnanswered: the last pull got no answer from
	// the server. Readiness reports both while they are recent.
	marksRefused    lapse
	pullsUnanswered lapse
	// publishRefused: the last command decided could not store its
	// outcome or dead letter (a stream deleted, say): it and those after
	// it wait in the stream.
	publishRefused lapse
	// stateUnread: the last command whose state was looked up was
	// returned because the bucket could not be read (direct gets turned
	// off, a leader lost for long): it and those after it wait.
	stateUnread lapse
	circ        *circuit
	thr         *throttle
	sib         siblings // calls on the wire and stops not yet recorded, per instance

	// unfit is why the consumer, as last read, would lose or strand
	// commands (consumerUnfit); nil while it fits. Nothing is pulled
	// meanwhile.
	unfit atomic.Pointer[string]
	// storedUnread: reads of stop commands by their sequence failed (see
	// bodyWithheld); none is tried again until it says, as each failed one
	// may wait out its timeout.
	storedUnread unreadPause

	ready atomic.Bool
	// bindFailed: the last bind of the consumer failed (the stream or
	// the consumer gone and not made again). The handle bound before may
	// still pull, but the worker is not ready until a pull is answered
	// (found by review: /readyz said ready between a failed bind and the
	// pull that failed after it).
	bindFailed atomic.Bool
	// shuttingDown is set as Run's context ends: the pull on the wire
	// keeps ready set for up to a second after that (see pull).
	shuttingDown atomic.Bool
	soft         context.Context // Run's context: ends at soft stop
	stopping     <-chan struct{} // soft.Done()
	hard         context.Context // cancelled at hard stop
	// pullsClosed is closed once no pull request of this worker can
	// receive a message any more; commands returned at shutdown wait for
	// it (see closePulls).
	pullsClosed chan struct{}
	wg          sync.WaitGroup
}

// New builds a Worker on a consumer bound by Setup.
func New(js jetstream.JetStream, cons jetstream.Consumer, stopper Stopper, cfg Config,
	log *zap.Logger, m *Metrics, opts ...Option) (*Worker, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("consumer config: %w", err)
	}
	switch {
	case js == nil:
		return nil, errors.New("consumer: nil JetStream")
	case cons == nil:
		return nil, errors.New("consumer: nil Consumer")
	case stopper == nil:
		return nil, errors.New("consumer: nil Stopper")
	case log == nil:
		return nil, errors.New("consumer: nil logger")
	case m == nil:
		return nil, errors.New("consumer: nil metrics")
	}
	w := &Worker{
		cfg:   cfg,
		js:    js,
		cons:  cons,
		dlf:   stopper,
		log:   log,
		m:     m,
		pub:   publisher{js: js, outcomePrefix: cfg.OutcomePrefix, deadSubject: cfg.DeadSubject, deadStream: cfg.DeadStream},
		now:   time.Now,
		slots: make(chan struct{}, cfg.Concurrency),
		held:  make(chan struct{}, cfg.heldLimit()),
		thr:   newThrottle(&cfg),
		sib:   newSiblings(cfg.StateTTL),

		pullsClosed: make(chan struct{}),
	}
	w.circ = newCircuit(&w.cfg, log, func(open bool) {
		if open {
			m.circuitOpen.Set(1)
		} else {
			m.circuitOpen.Set(0)
		}
	})
	w.bind(cons)
	for _, o := range opts {
		o(w)
	}
	return w, nil
}

// Ready reports whether the worker is connected with its consumer bound
// and the DLF circuit closed.
func (w *Worker) Ready() bool {
	ok, _ := w.Readiness()
	return ok
}

// bind makes c the consumer the worker pulls from, and notes its limits.
// Only the fetching goroutine (and New) calls it.
func (w *Worker) bind(c jetstream.Consumer) {
	w.cons = c
	w.bindFailed.Store(false)
	w.noteLimits(c.CachedInfo())
}

// noteLimits records the settings of the consumer in info that heartbeats
// and pulls follow.
func (w *Worker) noteLimits(info *jetstream.ConsumerInfo) {
	wait := w.cfg.AckWait
	var most int64
	if info != nil {
		if info.Config.AckWait > 0 {
			wait = info.Config.AckWait
		}
		for _, b := range info.Config.BackOff {
			if b > 0 && b < wait {
				wait = b // JetStream redelivers after BackOff[n] instead
			}
		}
		most = int64(info.Config.MaxRequestBatch)
		w.setUnfit(consumerUnfit(w.cfg, info.Config))
	}
	if old := time.Duration(w.ackWait.Swap(int64(wait))); old != 0 && old != wait {
		w.log.Info("consumer ack wait changed; heartbeats follow", zap.Duration("was", old), zap.Duration("now", wait))
	}
	w.pullMax.Store(most)
}

// setUnfit records whether the consumer loses commands as it is now
// configured (err, from consumerUnfit), and says so in
// the log when that changes.
func (w *Worker) setUnfit(err error) {
	if err == nil {
		if w.unfit.Swap(nil) != nil {
			w.log.Info("the consumer fits again; pulling")
		}
		return
	}
	why := err.Error()
	if old := w.unfit.Swap(&why); old == nil || *old != why {
		w.log.Error("the consumer no longer fits; nothing is pulled until an operator puts it right", zap.Error(err))
	}
}

// Why bodyWithheld returns a delivery.
const (
	bodyKept       = ""
	bodyHeadersOff = "consumer_unfit"  // the stored message has a body the delivery lacks
	bodyUnreadable = "body_unreadable" // the stored message could not be read
)

// bodyWithheld says whether, and why, a delivery without a body but with
// the size header of a headers-only consumer is to be returned rather than
// decided. The stored message says whether its body was withheld, not the
// header alone (a publisher may set any header) nor the consumer's
// settings, which may have changed since the delivery (found by review: a
// headers_only switched off again before the worker read the consumer let
// such deliveries be decided as empty commands, acked and dead-lettered
// without their bodies). The consumer is read too, so that an unfit one
// stops the pulls at once rather than when watchLimits notices.
//
// A message that cannot be read is returned too (bodyUnreadable): going by
// the consumer's settings instead lost commands when they had been put
// right meanwhile (found by review, for a user without the right to read
// the stream). So an empty command whose publisher set the size header
// itself waits while reads fail: for good if the worker lacks the right.
// After a failed read none is tried for a pause that doubles from 1 s to
// 30 s while they keep failing, so that a batch does not wait out one
// timeout per delivery, and one timeout holds little back (found by
// review: a fixed 30 s pause held such a command for 30 s after one
// timeout).
func (w *Worker) bodyWithheld(msg jetstream.Msg, seq uint64) string {
	size := msg.Headers().Get(nats.MsgSize)
	if size == "" || size == "0" || len(msg.Data()) != 0 {
		return bodyKept
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if c, err := w.js.Consumer(ctx, w.cfg.StopStream, w.cfg.ConsumerName); err == nil {
		w.noteLimits(c.CachedInfo())
	}
	if w.storedUnread.pausing(time.Now()) {
		return bodyUnreadable
	}
	var stored *jetstream.RawStreamMsg
	s, err := w.js.Stream(ctx, w.cfg.StopStream)
	if err == nil {
		stored, err = s.GetMsg(ctx, seq)
	}
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		// Gone meanwhile (acked by another delivery), or a replica not
		// caught up yet: the return settles it either way.
		return bodyUnreadable
	case err != nil:
		pause := w.storedUnread.failed(time.Now())
		w.log.Warn("a command arrived without its body and could not be read by its sequence to tell a withheld body "+
			"from an empty command; returning it (the read timed out, or the worker lacks $JS.API.STREAM.MSG.GET and "+
			"$JS.API.DIRECT.GET on the stop stream)",
			zap.String("stream", w.cfg.StopStream), zap.Uint64("stream_seq", seq), zap.Duration("next_read_in", pause), zap.Error(err))
		return bodyUnreadable
	}
	w.storedUnread.succeeded()
	if len(stored.Data) != 0 {
		return bodyHeadersOff
	}
	return bodyKept
}

// unreadPause spaces reads after failed ones (see bodyWithheld).
type unreadPause struct {
	mu    sync.Mutex
	until time.Time
	last  time.Duration
}

func (p *unreadPause) pausing(now time.Time) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return now.Before(p.until)
}

func (p *unreadPause) failed(now time.Time) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.last = min(max(2*p.last, time.Second), 30*time.Second)
	p.until = now.Add(p.last)
	return p.last
}

func (p *unreadPause) succeeded() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.last, p.until = 0, time.Time{}
}

// errUnfit ends a pull while the consumer would lose commands.
var errUnfit = errors.New("the consumer no longer fits")

// waitFit returns once the consumer fits again (watchLimits reads it) or
// ctx ends.
func (w *Worker) waitFit(ctx context.Context) error {
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for w.unfit.Load() != nil {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
	return nil
}

// consumerInfoEvery is how often the consumer's settings are read again:
// an operator's `nats consumer edit` of its ack wait makes no pull fail,
// so nothing else would notice it.
const consumerInfoEvery = 10 * time.Second

// watchLimits reads the consumer's settings every consumerInfoEvery until
// ctx ends, on a goroutine of its own: whatever the fetching goroutine
// waits for (a pull, room to hold more, an open circuit), held commands
// heartbeat meanwhile and must follow an edited ack wait (found by
// review: waits that did not pull never read it). A failed read changes
// nothing (a pull fails too, if the consumer is gone, and binds it again).
func (w *Worker) watchLimits(ctx context.Context) {
	every := consumerInfoEvery
	if w.cfg.infoEvery > 0 {
		every = w.cfg.infoEvery
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		ictx, cancel := context.WithTimeout(ctx, 2*time.Second)
		c, err := w.js.Consumer(ictx, w.cfg.StopStream, w.cfg.ConsumerName)
		cancel()
		switch {
		case err == nil:
			w.noteLimits(c.CachedInfo())
		case errors.Is(err, jetstream.ErrNotPullConsumer):
			// Made again as a push consumer: as unfit as at start.
			w.setUnfit(pushConsumer(w.cfg, err))
		case errors.Is(err, jetstream.ErrConsumerNotFound) || errors.Is(err, jetstream.ErrStreamNotFound):
			// An unfit consumer deleted (as the README tells operators
			// to do after a max_deliver): the unfit one is gone, and
			// fetch, no longer waiting, binds again and creates a new
			// one (found by review: it waited for ever).
			w.setUnfit(nil)
		}
	}
}

// ackWaitNow is the ack wait of the consumer as last bound.
func (w *Worker) ackWaitNow() time.Duration { return time.Duration(w.ackWait.Load()) }

// lapse is a condition that holds from when it was last seen until it
// is cleared, or until it has not been seen again for a while: for a
// readiness reason that what renews it may stop renewing (a worker left
// with no command to mark, or no slot to pull for).
type lapse struct{ at atomic.Int64 } // unix nanoseconds; 0: cleared

// seen records the condition now; it reports whether it was clear before.
func (l *lapse) seen() (wasClear bool) { return l.at.Swap(time.Now().UnixNano()) == 0 }

// clear ends it; a load first, as clear runs on every command.
func (l *lapse) clear() {
	if l.at.Load() != 0 {
		l.at.Store(0)
	}
}

// within says whether it was seen less than d ago and not cleared since.
func (l *lapse) within(d time.Duration) bool {
	at := l.at.Load()
	return at != 0 && time.Since(time.Unix(0, at)) < d
}

// marksRefusedShown is how long a refused mark keeps the worker unready:
// two of the longest redelivery delays and a margin for the redelivery.
// Commands waiting for a stored mark come back within that and mark again,
// so while the bucket refuses, the refusal stays fresh.
func (w *Worker) marksRefusedShown() time.Duration { return 2*w.cfg.RetryMax + stateCheckEvery }

// CredentialsChanged tells the worker that the DLF credentials were
// replaced (a rotated AK/SK or token file). An open circuit probes at once
// instead of after its backoff, which may have grown to
// RETRY_MAX_INTERVAL: the operator who fixed the credentials should not
// wait that long to see the worker resume. It is safe to call at any time,
// from any goroutine.
func (w *Worker) CredentialsChanged() { w.circ.credentialsChanged() }

// Readiness is Ready with the reason when not ready, for /readyz.
func (w *Worker) Readiness() (bool, string) {
	unfit := w.unfit.Load()
	switch {
	case w.shuttingDown.Load():
		return false, "shutting down"
	case !w.js.Conn().IsConnected():
		return false, "NATS not connected"
	case unfit != nil:
		return false, "the consumer no longer fits, nothing is pulled: " + *unfit
	case w.circ.Open():
		return false, "DLF circuit open: DLF fails systemically, commands wait in the stream"
	case w.pullsUnanswered.within(pullSilenceShown):
		return false, "the NATS server does not answer pull requests"
	case w.marksRefused.within(w.marksRefusedShown()):
		return false, "the state bucket does not store the calls' marks: commands wait in the stream"
	case w.publishRefused.within(w.marksRefusedShown()):
		return false, "outcomes or dead letters cannot be stored: commands wait in the stream"
	case w.stateUnread.within(w.marksRefusedShown()):
		return false, "the state bucket cannot be read: commands wait in the stream"
	case !w.ready.Load():
		return false, "consumer not bound"
	}
	return true, ""
}

// Run consumes until ctx ends, then shuts down as described on Worker and
// returns nil. Run may be called once.
func (w *Worker) Run(ctx context.Context) error {
	hard, hardStop := context.WithCancel(context.WithoutCancel(ctx))
	defer hardStop()
	// The graceful part of shutdown is bounded from the moment ctx ends:
	// the pull on the wire runs out first (see pull).
	graceOver := make(chan struct{})
	go func() {
		defer close(graceOver)
		select {
		case <-ctx.Done():
		case <-hard.Done():
			return
		}
		t := time.NewTimer(w.cfg.ShutdownTimeout)
		defer t.Stop()
		select {
		case <-t.C:
			hardStop()
		case <-hard.Done():
		}
	}()
	defer func() { hardStop(); <-graceOver }()
	w.hard = hard
	defer context.AfterFunc(ctx, func() { w.shuttingDown.Store(true) })()
	w.soft = ctx
	w.stopping = ctx.Done()
	if !w.cfg.DisableState {
		// Bound by the hard stop, not by ctx: a stop signal alone lets it
		// finish, and fetch then returns at once; a JetStream that stalls
		// here keeps the stop no longer than SHUTDOWN_TIMEOUT (found by
		// review: up to 30 s, and then an error).
		bctx, cancel := context.WithTimeout(hard, 30*time.Second)
		st, err := ensureState(bctx, w.js, &w.cfg, w.log)
		cancel()
		if err != nil && ctx.Err() != nil {
			w.log.Info("worker stopped while setting up the state bucket", zap.Error(err))
			return nil
		}
		if err != nil {
			return err
		}
		if st.reader, err = newBatchReader(w.js.Conn(), w.cfg.StateBucket); err != nil {
			return err
		}
		defer st.reader.close() // after every handler is done (deferred before wg.Wait returns)
		if st.writer, err = newStateWriter(w.js.Conn(), w.cfg.StateBucket); err != nil {
			return err
		}
		defer st.writer.close()
		st.leader = newLeaderReader(w.js.Conn(), w.cfg.StateBucket)
		w.state = st
	}

	watched := make(chan struct{})
	go func() {
		defer close(watched)
		w.watchLimits(ctx)
	}()
	w.fetch(ctx)
	<-watched

	w.closePulls()
	w.wg.Wait()
	w.log.Info("worker stopped")
	return nil
}

// fetch pulls messages while ctx lives, rebinding after errors.
func (w *Worker) fetch(ctx context.Context) {
	retry := backoff.NewExponentialBackOff()
	retry.InitialInterval = 100 * time.Millisecond
	retry.MaxInterval = 5 * time.Second
	retry.MaxElapsedTime = 0
	for ctx.Err() == nil {
		if w.waitCircuit(ctx) != nil {
			return
		}
		w.ready.Store(!w.bindFailed.Load())
		pulled, err := w.pull(ctx)
		w.ready.Store(false)
		if ctx.Err() != nil {
			return
		}
		if pulled {
			retry.Reset()
		}
		if errors.Is(err, errCircuitOpen) {
			continue
		}
		if errors.Is(err, errUnfit) {
			if w.waitFit(ctx) != nil {
				return
			}
			continue
		}
		wait := retry.NextBackOff()
		w.log.Warn("pulling failed; binding the consumer again", zap.Error(err), zap.Duration("in", wait))
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		w.rebind(ctx)
	}
}

// rebind binds the consumer again, creating it if it is gone. A consumer
// that no longer fits (edited to a setting Setup refuses) is named in the
// log; the worker keeps trying, as an operator may fix it.
func (w *Worker) rebind(ctx context.Context) {
	c, err := ensureConsumer(ctx, w.js, w.cfg, w.log)
	if err != nil {
		w.bindFailed.Store(true)
		var ue *unfitError
		if errors.As(err, &ue) {
			// Pulling on would lose or strand commands (found by review:
			// the old binding was kept and pulled from).
			w.setUnfit(err)
		} else if ctx.Err() == nil {
			w.log.Warn("binding the consumer failed", zap.Error(err))
		}
		return
	}
	w.bind(c)
}

// closePulls runs once fetching has ended, and lets the commands returned
// at shutdown go back to JetStream. The last pull ran out at the server
// (see pull), so no nak can be redelivered into it; should nats.go have
// ended it itself (the server's answer lost), the request lives on at the
// server until its UNSUB arrives, which nats.go sends from its own
// goroutine just after it closes the batch. A nak that overtook that UNSUB
// would be redelivered into the dead request and sit out a whole ack wait
// (seen in CI when pulls were cancelled at shutdown). The flush round trip
// gives that goroutine its one remaining step: in a test of nats.go alone,
// naks sent at once were stuck 12 times in 300, naks after the batch
// closed 5 and 11 times, naks after the batch and a flush never in 900.
func (w *Worker) closePulls() {
	if err := w.js.Conn().FlushTimeout(time.Second); err != nil {
		w.log.Debug("flush after the last pull failed", zap.Error(err))
	}
	close(w.pullsClosed)
}

// awaitPullsClosed holds a command returned at shutdown until closePulls.
func (w *Worker) awaitPullsClosed() {
	if w.soft != nil && w.soft.Err() != nil {
		<-w.pullsClosed
	}
}

// pullWait bounds one pull request. Short, so a request lost with a
// restarted node or a consumer leader change is replaced at once, and so
// that a pull on the wire at shutdown, which the worker lets run out (see
// pull), adds at most this much to it. An idle worker pulls once per
// pullWait.
const pullWait = time.Second

// pull fetches only as many messages as there are free held slots, so
// every message the client receives goes at once to a handler that
// heartbeats it. (A prefetching iterator would buffer messages behind busy
// slots without heartbeats; during a long 429 pause they outlived their ack
// wait and were delivered a second time while the first copy waited.)
//
// A pull that ends by expiring, or because the consumer's leader changed
// (the next pull reaches the new one), is followed by the next at once.
// Any other error ends pull, so that fetch waits and binds the consumer
// again: the server answers some at once (no responders once the consumer
// is gone, which a worker whose held slots were full never heard of), and
// pulling again at once would spin. pulled says whether some pull went
// through, to restart fetch's backoff.
//
// When ctx ends, the pull on the wire is not cut short but runs out, and
// what it brings after that is handed back. Cut short, the commands that
// nats.go had buffered for it would be dropped, and those the server sent
// before it heard of the cut would land nowhere: the server counts them
// delivered, so they would wait out a whole ack wait at every rolling
// restart. A pull that ran out is over at the server too, so nothing more
// can land in it. Not even a hard stop (SHUTDOWN_TIMEOUT) cuts it: it has
// at most pullWait to run, or a second more should the server's answer at
// its end be lost.
//
// A pull's end is the server's: FetchMaxWait asks the server to end it
// after pullWait and lets nats.go wait a second longer for that answer. A
// pull given a context with a deadline instead is ended by nats.go itself,
// a tenth of its time after the server's end, and on a link slower than
// that what the server sent last arrives after the end, for nobody.
func (w *Worker) pull(ctx context.Context) (pulled bool, err error) {
	for {
		if ctx.Err() != nil { // reserve's select may take a free slot first
			return pulled, ctx.Err()
		}
		if w.circ.Open() {
			return pulled, errCircuitOpen
		}
		if w.unfit.Load() != nil {
			return pulled, errUnfit
		}
		n, err := w.reserve(ctx)
		if err != nil {
			return pulled, err
		}
		if w.circ.Open() { // it opened while reserve waited for room
			w.unreserve(n)
			return pulled, errCircuitOpen
		}
		if w.unfit.Load() != nil { // the consumer was found unfit meanwhile (found by review)
			w.unreserve(n)
			return pulled, errUnfit
		}
		expires := time.Now().Add(pullWait)
		batch, err := w.cons.Fetch(n, jetstream.FetchMaxWait(pullWait))
		if err != nil {
			w.unreserve(n)
			return pulled, err
		}
		got, received := 0, 0
		var handedBack map[uint64]bool
		for msg := range batch.Messages() {
			received++
			if stopping := ctx.Err() != nil; stopping || w.circ.openNow() {
				reason := "circuit_open"
				if stopping {
					reason = "shutdown"
				}
				w.m.returned.WithLabelValues(reason).Inc()
				handedBack = w.handBack(msg, expires, handedBack)
				continue
			}
			got++
			w.m.held.Inc()
			w.wg.Add(1)
			w.handle(msg)
		}
		w.unreserve(n - got)
		if w.circ.Open() {
			return pulled, errCircuitOpen
		}
		switch err := batch.Error(); {
		case ctx.Err() != nil || pullExpired(err):
			pulled = true
			if ctx.Err() == nil && w.bindFailed.Swap(false) {
				w.ready.Store(true) // the consumer answers after all
			}
			// The server ends an empty pull at expires with a 408; one
			// that ended later, by nats.go's own timer a second after,
			// got no answer at all: a link that lost the server without
			// a reset, which the pings notice only after PingInterval
			// times MaxPingsOut. Said on /readyz meanwhile.
			silent := err == nil && received == 0 && ctx.Err() == nil &&
				!time.Now().Before(expires.Add(pullAnswerGrace))
			if !silent {
				w.pullsUnanswered.clear()
			} else if w.pullsUnanswered.seen() {
				w.log.Warn("the NATS server did not answer a pull request; is the link silent?")
			}
		case errors.Is(err, jetstream.ErrConsumerLeadershipChanged):
			w.log.Debug("pull ended with a consumer leader change; pulling again", zap.Error(err))
		default:
			return pulled, err
		}
	}
}

// pullAnswerGrace is how late after its expiry an empty pull may end and
// still count as answered by the server: nats.go ends an unanswered one a
// second after its expiry, and a round trip longer than this (or a
// fetching goroutine kept off the CPU that long) would read as silence.
const pullAnswerGrace = 900 * time.Millisecond

// pullSilenceShown is how long an unanswered pull keeps the worker
// unready: pulling on a silent link renews it every pullWait plus a
// second; a worker that stopped pulling (every slot held) is not kept
// unready for a pull long past.
const pullSilenceShown = 3 * (pullWait + time.Second)

// handBackMargin is how long after a pull's end, by this worker's clock,
// a command handed back twice may be offered again.
const handBackMargin = 500 * time.Millisecond

// handBack returns a command that the pull on the wire delivered after the
// circuit opened: an open circuit takes nothing new (contract section 6),
// so another replica takes it, or this one once DLF is back; or after the
// worker began to stop. The pull is not cut short instead: nats.go drops
// what a cancelled fetch has buffered, and the server still counts it
// delivered, so it would come back only after the ack wait.
//
// It goes back at once, for a replica that is pulling. Should it come back
// to this same pull (no other replica was waiting), it goes back again
// delayed until the pull has expired (at expires), so that the two do not
// hand it to and fro. seen holds the stream sequences handed back so far.
func (w *Worker) handBack(msg jetstream.Msg, expires time.Time, seen map[uint64]bool) map[uint64]bool {
	var seq uint64
	if md, err := msg.Metadata(); err == nil {
		seq = md.Sequence.Stream
	}
	var delay time.Duration
	if seen[seq] || seq == 0 {
		// The server counts the pull's time from when the request
		// reached it, a link's latency after expires was taken.
		delay = max(time.Until(expires), 0) + handBackMargin
	}
	if err := msg.NakWithDelay(delay); err != nil {
		w.log.Debug("could not hand back a command fetched as the circuit opened or the worker stopped; it returns after the ack wait", zap.Error(err))
	}
	if seen == nil {
		seen = map[uint64]bool{}
	}
	seen[seq] = true
	return seen
}

// reserve blocks for one free held slot, then takes every other free one
// up to the pull batch.
func (w *Worker) reserve(ctx context.Context) (int, error) {
	select {
	case w.held <- struct{}{}:
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	n, most := 1, w.cfg.pullBatch()
	if m := int(w.pullMax.Load()); m > 0 && m < most {
		most = m // the consumer refuses larger pulls (max_batch)
	}
	for n < most {
		select {
		case w.held <- struct{}{}:
			n++
			continue
		default:
		}
		break
	}
	return n, nil
}

func (w *Worker) unreserve(n int) {
	for i := 0; i < n; i++ {
		<-w.held
	}
}

var errCircuitOpen = errors.New("DLF circuit open")

// waitCircuit returns once the circuit is closed. While it is open the
// worker fetches nothing, except that when it holds no command at all it
// takes one, to serve as the probe: without it a worker whose held
// commands had all run out of time would never probe again and stay
// paused after DLF recovered.
func (w *Worker) waitCircuit(ctx context.Context) error {
	tick := time.NewTicker(w.cfg.RetryInitial)
	defer tick.Stop()
	rebind := backoff.NewExponentialBackOff()
	rebind.InitialInterval = w.cfg.RetryInitial
	rebind.MaxInterval = 30 * time.Second
	rebind.MaxElapsedTime = 0
	var nextRebind time.Time
	for w.circ.Open() {
		if len(w.held) == 0 && w.unfit.Load() == nil {
			err := w.fetchProbe()
			switch {
			case err == nil:
				rebind.Reset()
				nextRebind = time.Time{}
			case ctx.Err() == nil && !time.Now().Before(nextRebind):
				// The consumer may be gone: with nothing held, this is
				// the only fetch, so nothing else would bind it again,
				// and the worker would stay paused for good.
				wait := rebind.NextBackOff()
				nextRebind = time.Now().Add(wait)
				w.log.Warn("fetching a probe command failed; binding the consumer again", zap.Error(err), zap.Duration("next_try_in", wait))
				w.rebind(ctx)
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-w.circ.changedCh():
		case <-tick.C:
		}
	}
	return ctx.Err()
}

// fetchProbe takes at most one message and handles it. It fails as pull
// does: not when the request merely expired or met a leader change. Like
// pull's, its request runs out at shutdown rather than being cut short
// (the message it brings then is returned by handle).
func (w *Worker) fetchProbe() error {
	batch, err := w.cons.Fetch(1, jetstream.FetchMaxWait(pullWait))
	if err != nil {
		return err
	}
	for msg := range batch.Messages() {
		w.held <- struct{}{}
		w.m.held.Inc()
		w.wg.Add(1)
		w.handle(msg)
	}
	if err := batch.Error(); !pullExpired(err) && !errors.Is(err, jetstream.ErrConsumerLeadershipChanged) {
		return err
	}
	return nil
}

// pullExpired tells whether a pull ended as pulls do: it filled up
// (nil) or its time ran out.
func pullExpired(err error) bool {
	return err == nil || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout)
}

// handle starts the work on one fetched message, on the fetching
// goroutine: the message is held (and heartbeated) until release. With the
// state bucket, the command's goroutine starts only once its lookup is
// answered, so no goroutine sleeps on the batched read.
func (w *Worker) handle(msg jetstream.Msg) {
	hb := startHeartbeat(msg, &w.ackWait)
	release := func() {
		hb.stop()
		<-w.held
		w.m.held.Dec()
		w.wg.Done()
	}
	j, panicked := w.prepare(msg)
	if panicked {
		// Off this goroutine: what follows a panic may publish and
		// return the command, which at shutdown waits for the pulls that
		// this goroutine closes once it returns.
		go func() {
			defer release()
			hb.stop() // as afterPanic does for a job
			w.afterPanic(msg, nil)
		}()
		return
	}
	if j == nil {
		release()
		return
	}
	j.release, j.hb = release, hb
	if w.state == nil {
		go w.run(j, nil, nil)
		return
	}
	w.state.lookupThen(j.stateKeys(), func(recs []*stateRecord, err error) { go w.run(j, recs, err) })
}

// run processes a prepared job on its own goroutine and lets go of the
// message afterwards, unless the state writer still has to record the
// decision (it releases the message then).
func (w *Worker) run(j *job, recs []*stateRecord, lerr error) {
	defer func() {
		if r := recover(); r != nil {
			w.recovered(j.msg, j, r)
		}
		if !j.handedOff {
			j.release()
		}
	}()
	w.process(j, recs, lerr)
}

// stateCheckEvery bounds how often a failing state bucket is looked for.
const stateCheckEvery = 5 * time.Second

// checkState runs when the state bucket could not be read. If the bucket
// is gone (an operator deleted it), it is created again, as at start-up:
// otherwise every command would be returned for ever and nothing would
// say why but a warning per command. At most one check runs per
// stateCheckEvery, off the caller's goroutine.
func (w *Worker) checkState() {
	now := time.Now().UnixNano()
	last := w.stateCheckedAt.Load()
	if now-last < int64(stateCheckEvery) || !w.stateCheckedAt.CompareAndSwap(last, now) {
		return
	}
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		ctx, cancel := context.WithTimeout(w.hard, 10*time.Second)
		defer cancel()
		_, err := w.js.KeyValue(ctx, w.cfg.StateBucket)
		if !errors.Is(err, jetstream.ErrBucketNotFound) {
			return // there, or NATS itself is failing: nothing to create
		}
		w.log.Warn("state bucket is missing; creating it again", zap.String("bucket", w.cfg.StateBucket))
		if _, err := ensureState(ctx, w.js, &w.cfg, w.log); err != nil {
			w.log.Error("could not create the state bucket again", zap.Error(err))
		}
	}()
}

// recovered handles a panic while processing j's message (a panic that
// came before the job existed goes to afterPanic with j nil). A panic is
// a bug, and it may strike the same command on every delivery. So the
// command is returned with a delay that grows like a failing call's
// backoff, and once RETRY_MAX_ELAPSED has passed since it was stored it is
// given up like one (failed, retries_exhausted, dead-lettered) instead of
// being returned for ever.
// A command already decided when it panicked is only returned, as giving
// it up could contradict a decision that may already be stored.
//
// Nothing is recorded in the state bucket here: what the job says it did
// may not be what happened before the panic. If a call was on its way,
// the delivery's "sent" mark says so to the next one, which counts it as
// unanswered: the safe side (a DLF.6205 then means stopped).
func (w *Worker) recovered(msg jetstream.Msg, j *job, r any) {
	w.logPanic(r)
	w.afterPanic(msg, j)
}

// logPanic counts and logs a panic; called in the deferred recover, so
// the stack is the panic's.
func (w *Worker) logPanic(r any) {
	w.m.panics.Inc()
	w.log.Error("panic while processing a command", zap.Any("panic", r), zap.Stack("stack"))
}

// afterPanic returns or gives up the command that panicked (see
// recovered). It may publish and return the command, which at shutdown
// waits for the pulls to close: it never runs on the fetching goroutine,
// which closes them.
func (w *Worker) afterPanic(msg jetstream.Msg, j *job) {
	// No heartbeat may follow the nak below (see giveBack); what is left
	// to do here takes far less than an ack wait.
	if j != nil && j.hb != nil {
		j.hb.stop()
	}
	meta, err := msg.Metadata()
	if err != nil {
		_ = msg.NakWithDelay(w.cfg.RetryInitial)
		w.m.returned.WithLabelValues("panic").Inc()
		return
	}
	if w.soft != nil && w.soft.Err() != nil {
		w.awaitPullsClosed()
		_ = msg.Nak() // shutting down: another worker takes it at once
		w.m.returned.WithLabelValues("shutdown").Inc()
		return
	}
	// The injected clock may be what panicked: this path reads time.Now.
	now := time.Now()
	giveUpAt := meta.Timestamp.Add(w.cfg.RetryMaxElapsed)
	// One delivery more is always allowed, so a panic that struck once (a
	// command first seen after its time was up) does not end a command.
	if now.Before(giveUpAt) || meta.NumDelivered < 2 || (j != nil && j.decided) {
		delay := max(min(w.redeliveryDelay(meta.NumDelivered), giveUpAt.Sub(now)), 0)
		w.log.Warn("returning the command that panicked", zap.Uint64("delivery", meta.NumDelivered),
			zap.Duration("delay", delay), zap.Time("given_up_at", giveUpAt))
		_ = msg.NakWithDelay(delay)
		w.m.returned.WithLabelValues("panic").Inc()
		return
	}
	w.giveUpAfterPanics(msg, meta, j, now)
}

func (w *Worker) giveUpAfterPanics(msg jetstream.Msg, meta *jetstream.MsgMetadata, j *job, now time.Time) {
	// Storing the outcome, the dead letter and the decision may hold the
	// command for long (a bucket refusing the record, see
	// recordDecisionLater): heartbeats again meanwhile, or the ack wait
	// would hand it to another delivery. Whatever returns the command
	// stops them first (giveBack); a write handed to the state writer
	// stops them when it lets go of the command; otherwise the command
	// is done when this returns.
	hb := startHeartbeat(msg, &w.ackWait)
	defer func() {
		if r := recover(); r != nil {
			hb.stop()
			w.m.panics.Inc()
			w.log.Error("panic while giving up a command that panicked; returning it", zap.Any("panic", r))
			_ = msg.NakWithDelay(w.cfg.RetryMax)
			w.m.returned.WithLabelValues("panic").Inc()
		}
	}()
	if j == nil {
		// Its body could not even be read: it is named by its envelope.
		c := command.EnvelopeCommand(command.Meta{MsgID: msg.Headers().Get(nats.MsgIdHdr),
			Stream: meta.Stream, Seq: meta.Sequence.Stream})
		j = &job{msg: msg, meta: meta, cmd: c, sid: stateID(c, meta.Timestamp), release: func() {},
			log: w.log.With(zap.String("command_id", c.ID), zap.Uint64("delivery", meta.NumDelivered))}
		j.out = Outcome{CommandID: c.ID, ReceivedAt: FormatTime(meta.Timestamp), WorkerID: w.cfg.WorkerID}
	}
	prev := j.release
	j.release = func() { hb.stop(); prev() }
	j.hb = hb
	defer func() {
		if !j.handedOff {
			hb.stop()
		}
	}()
	w.finishAt(j, now, StatusFailed, CauseRetriesExhausted, fmt.Sprintf(
		"processing failed with an internal error on every delivery (%d) for RETRY_MAX_ELAPSED; the worker log has the panic",
		meta.NumDelivered))
}

// heartbeat tells JetStream, every interval, that a held command is still
// being worked on, so a long call or a short in-process wait never lets
// the ack wait expire and hand the command to another replica.
type heartbeat struct {
	mu      sync.Mutex
	t       *time.Timer
	stopped bool
}

// startHeartbeat sends InProgress for msg every third of the ack wait in
// ackWait (nanoseconds), read again before each beat, so that a changed ack
// wait applies to commands already held. (A pointer, not a closure: this
// runs for every command, and a closure cost two allocations each.)
func startHeartbeat(msg jetstream.Msg, ackWait *atomic.Int64) *heartbeat {
	h := &heartbeat{}
	var beat func()
	beat = func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		if h.stopped {
			return
		}
		_ = msg.InProgress()
		h.t = time.AfterFunc(beatEvery(ackWait), beat)
	}
	h.mu.Lock()
	h.t = time.AfterFunc(beatEvery(ackWait), beat)
	h.mu.Unlock()
	return h
}

// beatEvery is a third of the ack wait in ackWait, or a second when none
// is known.
func beatEvery(ackWait *atomic.Int64) time.Duration {
	if d := time.Duration(ackWait.Load()) / 3; d > 0 {
		return d
	}
	return time.Second
}

// stop ends the beats; once it returns, none is being sent and none
// will be.
func (h *heartbeat) stop() {
	h.mu.Lock()
	h.stopped = true
	h.t.Stop()
	h.mu.Unlock()
}

// redeliveryDelay is how long a command returned for the n-th time waits:
// RETRY_INITIAL_INTERVAL, doubling per delivery up to RETRY_MAX_INTERVAL.
// It spaces out a command that fails for a reason outside DLF (a panic, a
// stream that refuses its outcome or dead letter) instead of looping.
func (w *Worker) redeliveryDelay(n uint64) time.Duration {
	delay := w.cfg.RetryInitial
	for i := uint64(1); i < n && delay < w.cfg.RetryMax; i++ {
		delay *= 2
	}
	return min(delay, w.cfg.RetryMax)
}

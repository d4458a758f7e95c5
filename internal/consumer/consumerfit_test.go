package consumer

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/testutil"
)

// editConsumer changes the worker's consumer in place, as `nats consumer
// edit` does.
func (e *env) editConsumer(t *testing.T, change func(*jetstream.ConsumerConfig)) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := e.js.Consumer(ctx, "DLF_STOP", "dlf-stop-worker")
	if err != nil {
		t.Fatal(err)
	}
	cfg := c.CachedInfo().Config
	change(&cfg)
	if _, err := e.js.UpdateConsumer(ctx, "DLF_STOP", cfg); err != nil {
		t.Fatal(err)
	}
}

// unfitFor waits until r says, on /readyz, that its consumer no longer
// fits for the reason want.
func (r *running) unfitFor(t *testing.T, want string) {
	t.Helper()
	testutil.Eventually(t, 10*time.Second, func() error {
		if ok, why := r.w.Readiness(); ok || !strings.Contains(why, "no longer fits") || !strings.Contains(why, want) {
			return fmt.Errorf("readiness %v %q", ok, why)
		}
		return nil
	})
}

// A consumer edited while the worker runs into one that would lose or
// strand commands is read again every consumerInfoEvery: the worker stops
// pulling and says why until it is put right, then goes on. Found by
// review: with headers_only, every command arrived empty and was rejected,
// acked and dead-lettered without its body; with a max_deliver, a command
// returned for a retry that many times was never delivered again.
func TestConsumerEditedToLoseCommandsIsNotPulled(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name       string
		why        string
		edit, undo func(*jetstream.ConsumerConfig)
	}{
		{"headers only", "headers only",
			func(c *jetstream.ConsumerConfig) { c.HeadersOnly = true },
			func(c *jetstream.ConsumerConfig) { c.HeadersOnly = false }},
		{"max deliver", "max_deliver",
			func(c *jetstream.ConsumerConfig) { c.MaxDeliver = 2 },
			func(c *jetstream.ConsumerConfig) { c.MaxDeliver = -1 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel() // each on a server of its own
			e := newEnv(t, nil)
			e.emu.AddRunning(proj, "", "s1", "i-1")
			r := e.startWorker(func(c *Config) { c.infoEvery = 100 * time.Millisecond })
			r.waitStarted(t)
			e.editConsumer(t, tc.edit)
			r.unfitFor(t, tc.why)
			// The pull on the wire when the edit was read runs out
			// (pullWait); no other may follow.
			testutil.Eventually(t, 5*time.Second, func() error {
				if n := e.consumerInfo(t).NumWaiting; n != 0 {
					return fmt.Errorf("%d pulls waiting", n)
				}
				return nil
			})
			e.publish(body(t, map[string]any{"command_id": "c1", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
			// A worker that pulled would have done so within a pull's
			// wait: watched that long, nothing may come.
			for end := time.Now().Add(pullWait + 500*time.Millisecond); time.Now().Before(end); {
				if info := e.consumerInfo(t); info.Delivered.Consumer != 0 || info.NumWaiting != 0 {
					t.Fatalf("pulled while the consumer was unfit: %d delivered, %d pulls waiting",
						info.Delivered.Consumer, info.NumWaiting)
				}
				time.Sleep(50 * time.Millisecond) // polling for something that must not happen
			}
			e.editConsumer(t, tc.undo)
			if o := e.single(t); o.CommandID != "c1" || o.Status != StatusStopped {
				t.Errorf("outcome %+v; want c1 stopped", o)
			}
			e.noDeadLetters(t)
			if ok, why := r.w.Readiness(); !ok {
				t.Errorf("still not ready: %s", why)
			}
		})
	}
}

// An unfit consumer that an operator deletes, as the README says to after a
// max_deliver, is created again by the worker, which goes on (found by
// review: it waited for ever for the deleted consumer to fit).
func TestUnfitConsumerDeletedIsCreatedAgain(t *testing.T) {
	t.Parallel() // a server of its own, nothing timed against other tests
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "", "s1", "i-1")
	r := e.startWorker(func(c *Config) { c.infoEvery = 100 * time.Millisecond })
	r.waitStarted(t)
	e.editConsumer(t, func(c *jetstream.ConsumerConfig) { c.MaxDeliver = 2 })
	r.unfitFor(t, "max_deliver")
	testutil.Eventually(t, 5*time.Second, func() error {
		if n := e.consumerInfo(t).NumWaiting; n != 0 {
			return fmt.Errorf("%d pulls waiting", n)
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.js.DeleteConsumer(ctx, "DLF_STOP", "dlf-stop-worker"); err != nil {
		t.Fatal(err)
	}
	e.publish(body(t, map[string]any{"command_id": "c1", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	if o := e.single(t); o.CommandID != "c1" || o.Status != StatusStopped {
		t.Errorf("outcome %+v; want c1 stopped", o)
	}
	if info := e.consumerInfo(t); info.Config.MaxDeliver != -1 {
		t.Errorf("consumer created again with max_deliver %d, want -1", info.Config.MaxDeliver)
	}
}

// A delivery whose body a headers-only consumer withheld, before the
// worker read the edited consumer again, is returned, not decided as an
// empty command.
func TestBodyWithheldByAHeadersOnlyConsumerIsReturned(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "", "s1", "i-1")
	r := e.startWorker(func(c *Config) { c.RetryMax = 200 * time.Millisecond })
	r.waitStarted(t)
	e.editConsumer(t, func(c *jetstream.ConsumerConfig) { c.HeadersOnly = true })
	e.publish(body(t, map[string]any{"command_id": "c1", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	r.unfitFor(t, "headers only")
	if n := len(e.out.outcomes(t)); n != 0 {
		t.Fatalf("%d outcomes for a command whose body was withheld", n)
	}
	// Counted once the delivery is returned, just after the worker
	// learned the consumer is unfit.
	testutil.Eventually(t, 5*time.Second, func() error {
		if n := testutilCount(r.w.m.returned.WithLabelValues("consumer_unfit")); n < 1 {
			return fmt.Errorf("returned for an unfit consumer counted %v, want at least 1", n)
		}
		return nil
	})
	e.editConsumer(t, func(c *jetstream.ConsumerConfig) { c.HeadersOnly = false })
	if o := e.single(t); o.CommandID != "c1" || o.Status != StatusStopped {
		t.Errorf("outcome %+v; want c1 stopped", o)
	}
	e.noDeadLetters(t)
}

// relayConsumer hands each fetched message to see before the worker gets
// it.
type relayConsumer struct {
	jetstream.Consumer
	see func(jetstream.Msg)
}

func (c relayConsumer) Fetch(n int, opts ...jetstream.FetchOpt) (jetstream.MessageBatch, error) {
	b, err := c.Consumer.Fetch(n, opts...)
	if err != nil {
		return nil, err
	}
	return relay(b, func(m jetstream.Msg) jetstream.Msg { c.see(m); return m }), nil
}

// A delivery whose body a headers-only consumer withheld is returned even
// when the consumer no longer withholds bodies by the time the worker
// looks (found by review: it read the consumer, found it fit, and decided
// the delivery as an empty command; the command was acked and
// dead-lettered without its body, and its instance never stopped). So it
// is when the worker may not read the stored message (found by review of
// that fix: it then went by the consumer's settings, and lost the command
// the same way).
func TestBodyWithheldUnderASettingUndoneSinceIsReturned(t *testing.T) {
	t.Parallel()
	for _, readsRefused := range []bool{false, true} {
		t.Run(fmt.Sprintf("reads_refused=%v", readsRefused), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, nil)
			e.emu.AddRunning(proj, "", "s1", "i-1")
			undone := make(chan error, 1)
			var once sync.Once
			undo := func(m jetstream.Msg) {
				if len(m.Data()) != 0 {
					return
				}
				once.Do(func() {
					// Put right before the worker sees the delivery.
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					defer cancel()
					c, err := e.js.Consumer(ctx, "DLF_STOP", "dlf-stop-worker")
					if err == nil {
						cfg := c.CachedInfo().Config
						cfg.HeadersOnly = false
						_, err = e.js.UpdateConsumer(ctx, "DLF_STOP", cfg)
					}
					undone <- err
				})
			}
			r := e.startWorker(func(c *Config) { c.RetryMax = 200 * time.Millisecond }, func(w *Worker) {
				w.cons = relayConsumer{w.cons, undo}
				if readsRefused {
					w.js = refusedStopReads{w.js, nil}
				}
			})
			r.waitStarted(t)
			e.editConsumer(t, func(c *jetstream.ConsumerConfig) { c.HeadersOnly = true })
			e.publish(body(t, map[string]any{"command_id": "c1", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
			select {
			case err := <-undone:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("no delivery without its body")
			}
			if o := e.single(t); o.CommandID != "c1" || o.Status != StatusStopped {
				t.Errorf("outcome %+v; want c1 stopped", o)
			}
			e.noDeadLetters(t)
		})
	}
}

// refusedStopReads is a JetStream whose reads of stop commands by their
// sequence fail, as for a NATS user without the right to them: every one,
// or while left, when set, counts down above zero.
type refusedStopReads struct {
	jetstream.JetStream
	left *atomic.Int32
}

func (r refusedStopReads) Stream(ctx context.Context, name string) (jetstream.Stream, error) {
	s, err := r.JetStream.Stream(ctx, name)
	if err != nil || name != "DLF_STOP" {
		return s, err
	}
	return refusedGets{s, r.left}, nil
}

type refusedGets struct {
	jetstream.Stream
	left *atomic.Int32
}

func (g refusedGets) GetMsg(ctx context.Context, seq uint64, opts ...jetstream.GetMsgOpt) (*jetstream.RawStreamMsg, error) {
	if g.left == nil || g.left.Add(-1) >= 0 {
		return nil, context.DeadlineExceeded // what a refused request meets
	}
	return g.Stream.GetMsg(ctx, seq, opts...)
}

// One read of the stop stream that timed out holds an empty command with a
// publisher-set size header back for a moment only, and is counted as an
// unreadable body, not as an unfit consumer (found by review: one timeout
// held it for 30 s, logged as a headers-only consumer).
func TestOneFailedReadBackHoldsLittleBack(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	var left atomic.Int32
	left.Store(1)
	r := e.startWorker(nil, func(w *Worker) { w.js = refusedStopReads{w.js, &left} })
	r.waitStarted(t)
	start := time.Now()
	e.publish(nil, nats.Header{nats.MsgSize: []string{"120"}, nats.MsgIdHdr: []string{"empty-1"}})
	if o := e.single(t); o.CommandID != "empty-1" || o.Status != StatusRejected {
		t.Errorf("outcome %+v; want empty-1 rejected", o)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("decided %s after one failed read; want about the first pause, 1 s", took.Round(time.Millisecond))
	}
	if n := testutilCount(r.w.m.returned.WithLabelValues("body_unreadable")); n < 1 {
		t.Errorf("returned as unreadable %v times, want at least 1", n)
	}
	if n := testutilCount(r.w.m.returned.WithLabelValues("consumer_unfit")); n != 0 {
		t.Errorf("returned as from an unfit consumer %v times", n)
	}
	e.stopStreamEmpty(t)
}

// An empty command whose publisher set the size header itself is decided
// as the empty command it is (rejected, dead-lettered as it was stored),
// not returned for ever as a body withheld: the stored message has no
// body either.
func TestEmptyCommandWithASizeHeaderIsRejected(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	r := e.startWorker(nil)
	r.waitStarted(t)
	e.publish(nil, nats.Header{nats.MsgSize: []string{"120"}, nats.MsgIdHdr: []string{"empty-1"}})
	if o := e.settled(t); o.CommandID != "empty-1" || o.Status != StatusRejected || o.Cause != CauseInvalidCommand {
		t.Errorf("outcome %+v; want empty-1 rejected as an invalid command", o)
	}
	if d := e.dead.wait(t, 1, 10*time.Second)[0]; len(d.Data()) != 0 {
		t.Errorf("dead letter body %q; want the empty command", d.Data())
	}
	if n := testutilCount(r.w.m.returned.WithLabelValues("consumer_unfit")); n != 0 {
		t.Errorf("returned %v times as withheld", n)
	}
}

// A worker whose consumer cannot be bound again (its stream deleted) is not
// ready at any moment, not even between the failed bind and the pull that
// fails after it (found by review: /readyz answered 200 a few times in
// 20 s of polling).
func TestWorkerThatCannotBindIsNeverReady(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	r := e.startWorker(nil)
	r.waitStarted(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.js.DeleteStream(ctx, "DLF_STOP"); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, func() error {
		if !r.w.bindFailed.Load() {
			return fmt.Errorf("no failed bind yet")
		}
		return nil
	})
	// Through several rounds of binding and pulling (fetch waits 0.1 s,
	// growing, between them), as fast as a probe could ask.
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end); {
		if ok, _ := r.w.Readiness(); ok {
			t.Fatal("ready while the consumer cannot be bound")
		}
	}
}

// A stop signal while the worker sets up its state bucket against a
// JetStream that does not answer ends Run within SHUTDOWN_TIMEOUT, with
// nil (a requested stop), not after the set-up's own 30 s.
func TestStopWhileTheBucketSetUpStallsEndsInTime(t *testing.T) {
	t.Parallel() // a server of its own, nothing timed against other tests
	e := newEnv(t, nil)
	r := e.startWorker(nil)
	r.waitStarted(t)
	r.stop(t)

	// A server whose JetStream API is a subscriber that never answers.
	s := testutil.RunServer(t, &server.Options{Host: "127.0.0.1", Port: -1})
	nc, js := testutil.ConnectJS(t, s.ClientURL())
	sub, err := nc.Subscribe("$JS.API.>", func(*nats.Msg) {})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	cfg := e.cfg
	cfg.ShutdownTimeout = 300 * time.Millisecond
	m, err := NewMetrics(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	w, err := New(e.js, r.w.cons, r.client, cfg, e.log, m)
	if err != nil {
		t.Fatal(err)
	}
	w.js = js // everything Run asks of JetStream now goes unanswered
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	time.AfterFunc(200*time.Millisecond, cancel)
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run = %v; want nil for a requested stop", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return within 5 s of the stop")
	}
}

// A worker whose held slots are all taken, waiting for room to pull, does
// not pull once room frees if the consumer was found unfit meanwhile
// (found by review: the check came only before the wait for room).
func TestFullWorkerDoesNotPullAfterTheConsumerTurnedUnfit(t *testing.T) {
	t.Parallel() // a server of its own, nothing timed against other tests
	e := newEnv(t, nil)
	e.emu.SetFaults(emulator.Faults{Latency: 1500 * time.Millisecond})
	r := e.startWorker(func(c *Config) {
		c.Concurrency, c.heldFloor, c.CallTimeout, c.infoEvery = 1, 1, time.Minute, 100*time.Millisecond
	})
	r.waitStarted(t)
	e.publishMany(t, 4, "slow") // as many as it holds
	testutil.Eventually(t, 10*time.Second, func() error {
		if n := len(r.w.held); n != cap(r.w.held) {
			return fmt.Errorf("holds %d of %d", n, cap(r.w.held))
		}
		return nil
	})
	e.editConsumer(t, func(c *jetstream.ConsumerConfig) { c.MaxDeliver = 2 })
	r.unfitFor(t, "max_deliver")
	e.publish(body(t, map[string]any{"command_id": "fifth", "project_id": proj, "script_name": "s1", "instance_id": "i-5"}), nil)
	// The slow calls end one after another (one slot, 1.5 s each); the
	// room each leaves must not be pulled into.
	testutil.Eventually(t, 30*time.Second, func() error {
		if n := len(e.out.outcomes(t)); n < 4 {
			return fmt.Errorf("%d of the 4 held decided", n)
		}
		return nil
	})
	if n := e.consumerInfo(t).Delivered.Consumer; n != 4 {
		t.Errorf("%d deliveries; want the 4 held before the consumer turned unfit", n)
	}
}

// An unfit consumer made again under the worker's name as a push consumer
// is as unfit as one at start: said on /readyz, nothing pulled (found by
// review: "consumer not bound", and the worker kept pulling and binding).
func TestConsumerMadeAgainAsPushIsUnfit(t *testing.T) {
	t.Parallel() // a server of its own, nothing timed against other tests
	e := newEnv(t, nil)
	r := e.startWorker(func(c *Config) { c.infoEvery = 100 * time.Millisecond })
	r.waitStarted(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.js.DeleteConsumer(ctx, "DLF_STOP", "dlf-stop-worker"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.js.CreateOrUpdatePushConsumer(ctx, "DLF_STOP", jetstream.ConsumerConfig{
		Durable: "dlf-stop-worker", DeliverSubject: "push.deliver", AckPolicy: jetstream.AckExplicitPolicy,
	}); err != nil {
		t.Fatal(err)
	}
	r.unfitFor(t, "push consumer")
}

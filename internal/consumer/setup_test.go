package consumer

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/testutil"
)

func TestSubjectMatches(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		pattern, subject string
		want             bool
	}{
		{"dlf.stop.request", "dlf.stop.request", true},
		{"dlf.stop.*", "dlf.stop.request", true},
		{"dlf.>", "dlf.stop.request", true},
		{">", "dlf", true},
		{"dlf.stop", "dlf.stop.request", false},
		{"dlf.stop.request.x", "dlf.stop.request", false},
		{"dlf.*.x", "dlf.stop.request", false},
		{"dlf.stop.outcome.*", "dlf.stop.outcome.stopped", true},
	} {
		if got := subjectMatches(tc.pattern, tc.subject); got != tc.want {
			t.Errorf("subjectMatches(%q, %q) = %v", tc.pattern, tc.subject, got)
		}
	}
}

// A server without JetStream is named as such, not as a request nobody
// answered (found by review).
func TestSetupNamesAServerWithoutJetStream(t *testing.T) {
	t.Parallel() // a server of its own, nothing timed against other tests
	s := testutil.RunServer(t, &server.Options{Host: "127.0.0.1", Port: -1})
	_, js := testutil.ConnectJS(t, s.ClientURL())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := Setup(ctx, js, Config{}, zap.NewNop())
	if err == nil || !strings.Contains(err.Error(), "JetStream is not enabled") {
		t.Fatalf("Setup: %v; want it to say JetStream is not enabled", err)
	}
}

// Existing resources are used as they are; ones that cannot work stop the
// worker at start with an error naming the mismatch.
func TestSetupChecksExistingResources(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// A tuned existing stream is not overwritten.
	s, err := e.js.UpdateStream(ctx, jetstream.StreamConfig{Name: "DLF_STOP_OUTCOMES",
		Subjects: []string{"dlf.stop.outcome.*"}, MaxAge: time.Hour, Storage: jetstream.FileStorage})
	if err != nil {
		t.Fatal(err)
	}
	_ = s
	if _, err := Setup(ctx, e.js, e.cfg, e.log); err != nil {
		t.Fatalf("setup on existing resources: %v", err)
	}
	info, err := e.js.Stream(ctx, "DLF_STOP_OUTCOMES")
	if err != nil {
		t.Fatal(err)
	}
	if info.CachedInfo().Config.MaxAge != time.Hour {
		t.Error("setup overwrote the operator's MaxAge")
	}

	// Wrong subjects.
	if _, err := e.js.UpdateStream(ctx, jetstream.StreamConfig{Name: "DLF_STOP_DEAD",
		Subjects: []string{"somewhere.else"}, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}
	_, err = Setup(ctx, e.js, e.cfg, e.log)
	if !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), "DLF_STOP_DEAD") || !strings.Contains(err.Error(), "dlf.stop.dead") {
		t.Fatalf("wrong subjects: %v", err)
	}
	if _, err := e.js.UpdateStream(ctx, jetstream.StreamConfig{Name: "DLF_STOP_DEAD",
		Subjects: []string{"dlf.stop.dead"}, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}

	// A push consumer under the worker's name.
	if err := e.js.DeleteConsumer(ctx, "DLF_STOP", "dlf-stop-worker"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.js.CreateOrUpdatePushConsumer(ctx, "DLF_STOP", jetstream.ConsumerConfig{
		Durable: "dlf-stop-worker", DeliverSubject: "push.here", AckPolicy: jetstream.AckExplicitPolicy}); err != nil {
		t.Fatal(err)
	}
	_, err = Setup(ctx, e.js, e.cfg, e.log)
	if !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), "push consumer") {
		t.Fatalf("push consumer: %v", err)
	}
}

// A consumer that lets pulls wait less than the worker's is refused at
// start, naming the limit: every pull would be refused, for ever.
func TestSetupRefusesAConsumerWhosePullsCannotWait(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.replaceConsumer(t, jetstream.ConsumerConfig{MaxRequestExpires: 500 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := Setup(ctx, e.js, e.cfg, e.log)
	if !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), "max_expires") {
		t.Fatalf("consumer with max_expires 500ms: %v; want a mismatch naming max_expires", err)
	}
}

// Consumer settings under which the worker would lose commands (headers
// only: every body empty, rejected and acked), give them up by a count
// (max_deliver: each return to retry is a delivery), stretch their
// retries past RETRY_MAX_ELAPSED (backoff: JetStream adds it to every
// delayed nak) or never consume (priority groups: every pull without one
// refused) are refused at start, naming the setting (found by review).
func TestSetupRefusesConsumersThatWouldLoseOrStrandCommands(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		c    jetstream.ConsumerConfig
		want string
	}{
		{"headers only", jetstream.ConsumerConfig{HeadersOnly: true}, "headers only"},
		{"max deliver", jetstream.ConsumerConfig{MaxDeliver: 3}, "max_deliver"},
		{"backoff", jetstream.ConsumerConfig{MaxDeliver: -1, BackOff: []time.Duration{2 * time.Second, 25 * time.Second}}, "backoff"},
		{"priority groups", jetstream.ConsumerConfig{PriorityPolicy: jetstream.PriorityPolicyOverflow, PriorityGroups: []string{"g"}}, "priority groups"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, nil)
			e.replaceConsumer(t, tc.c)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := Setup(ctx, e.js, e.cfg, e.log)
			if !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Setup: %v; want a mismatch naming %q", err, tc.want)
			}
		})
	}
}

// An existing consumer that caps pull batches (max_batch) below the
// worker's pull is used with smaller pulls: a larger one is refused every
// time, and the worker would never consume.
func TestConsumerWithSmallMaxBatchIsConsumed(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.replaceConsumer(t, jetstream.ConsumerConfig{MaxRequestBatch: 4})
	e.startWorker(nil)
	e.publishMany(t, 20, "c")
	e.out.wait(t, 20, 20*time.Second)
	allStopped(t, byID(t, e.out.outcomes(t)))
}

// The consumer's ack wait shrinks under a running worker that started
// with a long one: the consumer is deleted and the worker creates it again
// with its own, or an operator edits it in place (which makes no pull
// fail). Heartbeats must follow, or a command held longer than the new ack
// wait (here a slow call) is handed to another delivery and called twice.
func TestHeartbeatsFollowTheConsumersAckWait(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		change func(t *testing.T, e *env)
	}{
		{"recreated", func(t *testing.T, e *env) {
			if err := e.js.DeleteConsumer(context.Background(), "DLF_STOP", "dlf-stop-worker"); err != nil {
				t.Fatal(err)
			}
		}},
		{"edited", func(t *testing.T, e *env) { e.editAckWait(t, 2*time.Second) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, func(c *Config) { c.AckWait, c.CallTimeout = 9*time.Second, 10*time.Second })
			r := e.startWorker(func(c *Config) { c.AckWait, c.infoEvery = 2*time.Second, time.Second })
			r.waitStarted(t)
			if got := r.w.ackWaitNow(); got != 9*time.Second {
				t.Fatalf("ack wait %s at start, want the consumer's 9s", got)
			}
			tc.change(t, e)
			testutil.Eventually(t, 2*consumerInfoEvery, func() error {
				if got := r.w.ackWaitNow(); got != 2*time.Second {
					return fmt.Errorf("ack wait %s, want the consumer's new 2s", got)
				}
				return nil
			})
			e.emu.AddRunning(proj, "", "s1", "slow")
			e.emu.SetFaultsFor(proj, "s1", "slow", emulator.Faults{Latency: 6 * time.Second})
			e.publish(body(t, map[string]any{"command_id": "slow", "project_id": proj, "script_name": "s1", "instance_id": "slow"}), nil)
			e.out.wait(t, 1, 20*time.Second)
			e.stopStreamEmpty(t)
			if n := e.emu.StopCallsFor(proj, "s1", "slow"); n != 1 {
				t.Errorf("one command called %d times: it was redelivered while its call was on the wire", n)
			}
		})
	}
}

// replaceConsumer replaces the worker's consumer by one an operator made:
// the worker's name, explicit acks and its filter, plus what c sets.
func (e *env) replaceConsumer(t *testing.T, c jetstream.ConsumerConfig) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.js.DeleteConsumer(ctx, "DLF_STOP", "dlf-stop-worker"); err != nil {
		t.Fatal(err)
	}
	c.Durable, c.AckPolicy, c.FilterSubject = "dlf-stop-worker", jetstream.AckExplicitPolicy, "dlf.stop.request"
	if _, err := e.js.CreateConsumer(ctx, "DLF_STOP", c); err != nil {
		t.Fatal(err)
	}
}

// editAckWait changes the worker's consumer's ack wait in place, as
// `nats consumer edit --ack-wait` does.
func (e *env) editAckWait(t *testing.T, d time.Duration) {
	t.Helper()
	e.editConsumer(t, func(c *jetstream.ConsumerConfig) { c.AckWait = d })
}

// A worker that does not pull follows an edited ack wait too: one whose
// circuit is open while it holds a command, and one whose every held slot
// waits on a slow call (found by review: only pulls read it again, and
// the old heartbeat spacing let JetStream hand held commands to another
// replica).
func TestAWorkerThatDoesNotPullFollowsAnEditedAckWait(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, e *env) *running
	}{
		{"circuit open", func(t *testing.T, e *env) *running {
			e.emu.SetFaults(emulator.Faults{AuthFail: true})
			r := e.startWorker(nil)
			e.publishMany(t, 1, "held")
			r.waitCircuitOpen(t)
			return r
		}},
		{"every slot held", func(t *testing.T, e *env) *running {
			e.emu.SetFaults(emulator.Faults{Latency: 30 * time.Second})
			r := e.startWorker(func(c *Config) { c.Concurrency, c.heldFloor, c.CallTimeout = 1, 1, time.Minute })
			e.publishMany(t, 6, "slow") // more than the 4 it holds
			testutil.Eventually(t, 10*time.Second, func() error {
				if n := len(r.w.held); n != cap(r.w.held) {
					return fmt.Errorf("holds %d of %d", n, cap(r.w.held))
				}
				return nil
			})
			return r
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, func(c *Config) { c.RetryInitial, c.RetryMax, c.infoEvery = time.Minute, time.Minute, time.Second })
			r := tc.setup(t, e)
			e.editAckWait(t, 3*time.Second)
			testutil.Eventually(t, 2*consumerInfoEvery, func() error {
				if got := r.w.ackWaitNow(); got != 3*time.Second {
					return fmt.Errorf("ack wait %s, want the consumer's new 3s", got)
				}
				return nil
			})
		})
	}
}

// On a server without them, Setup creates the streams, the bucket and the
// consumer as contract section 2 says, with every setting left at its
// default (found by review: the consumer's ack wait and its durable name
// could change with every test passing).
func TestSetupCreatesWhatTheContractNames(t *testing.T) {
	t.Parallel()
	s := testutil.StartNATS(t)
	_, js := testutil.ConnectJS(t, s.ClientURL())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Setup(ctx, js, Config{}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []struct {
		name, subject string
		retention     jetstream.RetentionPolicy
	}{
		{"DLF_STOP", "dlf.stop.request", jetstream.WorkQueuePolicy},
		{"DLF_STOP_OUTCOMES", "dlf.stop.outcome.*", jetstream.LimitsPolicy},
		{"DLF_STOP_DEAD", "dlf.stop.dead", jetstream.LimitsPolicy},
	} {
		st, err := js.Stream(ctx, want.name)
		if err != nil {
			t.Fatalf("stream %s: %v", want.name, err)
		}
		got := st.CachedInfo().Config
		if !slices.Equal(got.Subjects, []string{want.subject}) || got.Retention != want.retention ||
			got.Storage != jetstream.FileStorage || got.Replicas != 1 || got.Duplicates != 2*time.Minute {
			t.Errorf("stream %s: subjects %v, %s, %s, %d replicas, duplicate window %s; want [%s], %s, file, 1, 2m0s",
				want.name, got.Subjects, got.Retention, got.Storage, got.Replicas, got.Duplicates, want.subject, want.retention)
		}
	}
	if _, err := js.KeyValue(ctx, "dlf_stop_state"); err != nil {
		t.Errorf("state bucket: %v", err)
	}
	info, err := c.Info(ctx) // from the server, not what Setup asked for
	if err != nil {
		t.Fatal(err)
	}
	got := info.Config
	if info.Name != "dlf-stop-worker" || got.Durable != "dlf-stop-worker" || got.AckPolicy != jetstream.AckExplicitPolicy ||
		got.AckWait != 30*time.Second || got.MaxDeliver != -1 || got.MaxAckPending < 16*32 ||
		got.FilterSubject != "dlf.stop.request" || got.DeliverSubject != "" {
		t.Errorf("consumer %s: %+v; want durable dlf-stop-worker, explicit ack, ack wait 30s, no max_deliver, "+
			"max-ack-pending well above the default 32 slots, pull, on dlf.stop.request", info.Name, got)
	}
}

package consumer

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/testutil"
)

// gatedConsumer fetches nothing until gate is closed.
type gatedConsumer struct {
	jetstream.Consumer
	gate chan struct{}
}

func (c gatedConsumer) Fetch(n int, opts ...jetstream.FetchOpt) (jetstream.MessageBatch, error) {
	<-c.gate
	return c.Consumer.Fetch(n, opts...)
}

// fetchOnce passes fetches through until one brought a message; later
// ones bring nothing, each after a pull's wait, so that a worker keeps the
// one delivery it got and takes no other.
type fetchOnce struct {
	jetstream.Consumer
	got atomic.Bool
}

func (c *fetchOnce) Fetch(n int, opts ...jetstream.FetchOpt) (jetstream.MessageBatch, error) {
	if c.got.Load() {
		time.Sleep(pullWait) // a pull that found nothing waits this long
		return emptyBatch{}, nil
	}
	b, err := c.Consumer.Fetch(n, opts...)
	if err != nil {
		return nil, err
	}
	return relay(b, func(m jetstream.Msg) jetstream.Msg {
		c.got.Store(true)
		return m
	}), nil
}

// emptyBatch is a pull that ended with nothing.
type emptyBatch struct{ jetstream.MessageBatch }

func (emptyBatch) Messages() <-chan jetstream.Msg {
	c := make(chan jetstream.Msg)
	close(c)
	return c
}

func (emptyBatch) Error() error { return nil }

// Two deliveries of one command at once: worker B (its heartbeats lost)
// has a slow call, worker A gets the command after the ack wait, decides
// it failed and stores the outcome, but cannot store the dead letter (the
// dead-letter stream is gone), so it hands the command back with the
// outcome as a pending entry. B's call ends past the outcome's duplicate
// window: it must follow A's stored outcome and store only what is
// missing, not publish one of its own (found by review: two outcome
// events, the later dead letter following B's).
func TestOverlappingDeliveryFollowsAStoredPendingOutcome(t *testing.T) {
	e := newEnv(t, func(c *Config) {
		c.AckWait, c.CallTimeout = time.Second, 10*time.Second
		c.RetryInitial, c.RetryMax = 100*time.Millisecond, 300*time.Millisecond
	})
	e.updateStream(t, "DLF_STOP_OUTCOMES", func(c *jetstream.StreamConfig) { c.Duplicates = time.Second })
	e.emu.AddRunning(proj, "", "s1", "i-1")
	e.emu.SetFaultsFor(proj, "s1", "i-1", emulator.Faults{ErrorRate: 1, ErrorStatus: 400})
	var bCalls, bAnswered atomic.Int32
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		bCalls.Add(1)
		defer bAnswered.Add(1)
		time.Sleep(4 * time.Second) // past A's decision and the 1 s window
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		_, _ = w.Write([]byte(`{"error_code":"DLF.6201","error_msg":"refused"}`))
	}))
	t.Cleanup(slow.Close)
	gate := make(chan struct{})
	b := e.startWorkerAt(slow.URL, nil, func(w *Worker) { w.cons = deafConsumer{&fetchOnce{Consumer: w.cons}} })
	a := e.startWorker(nil, func(w *Worker) { w.cons = gatedConsumer{w.cons, gate} })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := e.js.DeleteStream(ctx, "DLF_STOP_DEAD"); err != nil {
		t.Fatal(err)
	}
	e.publish(body(t, map[string]any{"command_id": "new", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	testutil.Eventually(t, 10*time.Second, func() error {
		if bCalls.Load() == 0 {
			return errors.New("B has not called yet")
		}
		return nil
	})
	close(gate) // A takes the command once B's lease ran out
	testutil.Eventually(t, 10*time.Second, func() error {
		if n := testutilCount(a.w.m.publishFail.WithLabelValues("dead_letter")); n < 1 {
			return fmt.Errorf("A's dead letter not refused yet")
		}
		return nil
	})
	// B's only delivery, its call answered, ends as a failed dead-letter
	// publish (or, were A done, an ack without an outcome).
	testutil.Eventually(t, 15*time.Second, func() error {
		if bAnswered.Load() == 0 {
			return errors.New("B's call not answered yet")
		}
		if n := testutilCount(b.w.m.publishFail.WithLabelValues("dead_letter")) + testutilCount(b.w.m.skipped); n < 1 {
			return fmt.Errorf("B's delivery has not ended yet")
		}
		return nil
	})
	if _, err := Setup(ctx, e.js, e.cfg, e.log); err != nil { // the dead-letter stream back
		t.Fatal(err)
	}
	e.stopStreamEmpty(t)
	var n int
	for _, o := range e.out.outcomes(t) {
		if o.CommandID == "new" {
			n++
			t.Logf("outcome %s/%s %s attempts=%d", o.Status, o.Cause, o.ErrorCode, o.Attempts)
		}
	}
	if n != 1 {
		t.Errorf("%d outcome events for command new, want 1", n)
	}
}

// A command waiting in the worker to retry (a 503 with Retry-After) whose
// instance another command stops meanwhile ends already_stopped without a
// second call (contract section 6; found by review: the retry called DLF
// and got DLF.6205, which then read as that stop, with attempts 2).
func TestRetryAfterAnotherCommandStoppedTheInstanceMakesNoCall(t *testing.T) {
	t.Parallel() // a server of its own, nothing timed against other tests
	e := newEnv(t, nil)
	e.emu.AddRunning(proj, "", "s1", "i-1")
	var calls atomic.Int32
	target, err := url.Parse(e.emuURL)
	if err != nil {
		t.Fatal(err)
	}
	proxy := httputil.NewSingleHostReverseProxy(target)
	flaky := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) == 1 { // the first command's first call
			w.Header().Set("Retry-After", "2")
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		proxy.ServeHTTP(w, r)
	}))
	t.Cleanup(flaky.Close)
	e.startWorkerAt(flaky.URL, nil)
	e.publish(body(t, map[string]any{"command_id": "y", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	testutil.Eventually(t, 10*time.Second, func() error {
		if calls.Load() == 0 {
			return errors.New("y has not called yet")
		}
		return nil
	})
	e.publish(body(t, map[string]any{"command_id": "x", "project_id": proj, "script_name": "s1", "instance_id": "i-1"}), nil)
	e.out.wait(t, 2, 15*time.Second)
	got := byID(t, e.out.outcomes(t))
	if o := got["x"]; o.Status != StatusStopped || o.Cause != CauseOK {
		t.Errorf("x: %+v; want its own stop", o)
	}
	if o := got["y"]; o.Status != StatusStopped || o.Cause != CauseAlreadyStopped || o.Attempts != 1 || o.HTTPStatus != 503 {
		t.Errorf("y: %+v; want already_stopped after its one call (503)", o)
	}
	if n := e.emu.StopCallsFor(proj, "s1", "i-1"); n != 1 {
		t.Errorf("DLF calls for i-1 = %d, want 1 (x's)", n)
	}
}

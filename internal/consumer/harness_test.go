package consumer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/dlf-stop/worker/internal/dlf"
	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/embedded"
	"github.com/dlf-stop/worker/internal/testutil"
)

// env is one test's world: a real JetStream server on a random port with
// a temp store, the DLF emulator over real HTTP, and collectors reading
// the outcome and dead-letter streams.
type env struct {
	t        testing.TB
	srv      *server.Server
	nc       *nats.Conn
	js       jetstream.JetStream
	emu      *emulator.Emulator
	emuURL   string
	cfg      Config
	log      *zap.Logger
	out      *collector
	dead     *collector
	storeDir string
	// pubs counts outcome events as published, duplicates included: the
	// outcome stream drops a repeat within its two-minute window, so the
	// stored events alone cannot show a worker that decided twice.
	pubs *pubCounter
	// workerNATS, when set, is the URL workers started from now on
	// connect to instead of the server's own (a proxy in front of it).
	workerNATS string
	// workerOpts are added to the NATS options of workers started from
	// now on (a dialer that loses some of their publishes).
	workerOpts []nats.Option
	// creds, when set, signs the calls of workers started from now on.
	creds func() dlf.Credentials
}

// pubCounter counts the messages a core subscription sees.
type pubCounter struct {
	mu sync.Mutex
	n  int
}

func (c *pubCounter) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

func countPubs(t testing.TB, nc *nats.Conn, subject string) *pubCounter {
	t.Helper()
	c := &pubCounter{}
	sub, err := nc.Subscribe(subject, func(*nats.Msg) {
		c.mu.Lock()
		c.n++
		c.mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	_ = sub.SetPendingLimits(-1, -1)
	if err := nc.Flush(); err != nil { // the interest reaches the server before any worker publishes
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	return c
}

func newEnv(t testing.TB, mutate func(*Config)) *env {
	t.Helper()
	return newEnvWith(t, mutate)
}

// newEnvWith is newEnv with emulator options.
func newEnvWith(t testing.TB, mutate func(*Config), emuOpts ...emulator.Option) *env {
	t.Helper()
	e := &env{t: t, storeDir: t.TempDir()}
	if tt, ok := t.(*testing.T); ok {
		e.log = zaptest.NewLogger(tt, zaptest.Level(zap.InfoLevel))
	} else {
		e.log = benchLogger()
	}
	e.startServer(-1)
	e.emu, e.emuURL = emulator.StartForTest(t, emuOpts...)
	e.cfg = Config{
		CallTimeout:     2 * time.Second,
		RetryInitial:    50 * time.Millisecond,
		RetryMax:        200 * time.Millisecond,
		RetryMaxElapsed: 30 * time.Second,
		ShutdownTimeout: 5 * time.Second,
		Concurrency:     8,
		WorkerID:        "test-worker",
	}
	if mutate != nil {
		mutate(&e.cfg)
	}
	e.connect()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := Setup(ctx, e.js, e.cfg, e.log); err != nil {
		t.Fatalf("setup: %v", err)
	}
	c := e.cfg
	c.setDefaults()
	e.out = newCollector(t, e.js, c.OutcomeStream)
	e.dead = newCollector(t, e.js, c.DeadStream)
	e.pubs = countPubs(t, e.nc, c.OutcomePrefix+".*")
	return e
}

func (e *env) startServer(port int) {
	e.t.Helper()
	s, err := embedded.Start(embedded.Options{Port: port, StoreDir: e.storeDir})
	if err != nil {
		e.t.Fatal(err)
	}
	e.srv = s
	e.t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
}

func (e *env) connect() {
	e.t.Helper()
	nc, err := nats.Connect(e.srv.ClientURL(), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		e.t.Fatal(err)
	}
	e.nc, e.js = nc, js
}

// running is a worker started by startWorker.
type running struct {
	once   sync.Once
	w      *Worker
	cancel context.CancelFunc
	done   chan error
	nc     *nats.Conn
	client *dlf.Client
}

// waitStarted waits until the worker has bound its bucket and pulls:
// a test that then limits the bucket below what the worker accepts at
// start must not race its start.
func (r *running) waitStarted(t *testing.T) {
	t.Helper()
	testutil.Eventually(t, 10*time.Second, func() error {
		if !r.w.Ready() {
			return errors.New("the worker has not started yet")
		}
		return nil
	})
}

// stop ends the worker gracefully and waits for Run to return.
func (r *running) stop(t testing.TB) {
	t.Helper()
	r.once.Do(func() { r.shutdown(t) })
}

func (r *running) shutdown(t testing.TB) {
	t.Helper()
	r.cancel()
	select {
	case err := <-r.done:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("worker did not stop within 30s")
	}
	r.nc.Close()
	r.client.CloseIdleConnections()
}

// consumerInfo reads the worker's consumer's info from the server.
func (e *env) consumerInfo(t *testing.T) *jetstream.ConsumerInfo {
	t.Helper()
	c := e.cfg
	c.setDefaults()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cons, err := e.js.Consumer(ctx, c.StopStream, c.ConsumerName)
	if err != nil {
		t.Fatal(err)
	}
	ci, err := cons.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return ci
}

// startWorker runs a worker with its own NATS connection, as a separate
// replica would.
func (e *env) startWorker(mutate func(*Config), opts ...Option) *running {
	e.t.Helper()
	return e.startWorkerAt(e.emuURL, mutate, opts...)
}

// startWorkerAt is startWorker with another DLF endpoint.
func (e *env) startWorkerAt(endpoint string, mutate func(*Config), opts ...Option) *running {
	e.t.Helper()
	cfg := e.cfg
	if mutate != nil {
		mutate(&cfg)
	}
	url := e.srv.ClientURL()
	if e.workerNATS != "" {
		url = e.workerNATS
	}
	nc, err := nats.Connect(url, append([]nats.Option{nats.MaxReconnects(-1), nats.ReconnectWait(50 * time.Millisecond)}, e.workerOpts...)...)
	if err != nil {
		e.t.Fatal(err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cons, err := Setup(ctx, js, cfg, e.log)
	if err != nil {
		e.t.Fatal(err)
	}
	client, err := dlf.NewClient(dlf.Config{Endpoint: endpoint, Timeout: cfg.CallTimeout, MaxConns: cfg.Concurrency, Credentials: e.creds})
	if err != nil {
		e.t.Fatal(err)
	}
	m, err := NewMetrics(prometheus.NewRegistry())
	if err != nil {
		e.t.Fatal(err)
	}
	w, err := New(js, cons, client, cfg, e.log, m, opts...)
	if err != nil {
		e.t.Fatal(err)
	}
	runCtx, runCancel := context.WithCancel(context.Background())
	r := &running{w: w, cancel: runCancel, done: make(chan error, 1), nc: nc, client: client}
	go func() { r.done <- w.Run(runCtx) }()
	e.t.Cleanup(func() { r.stop(e.t) })
	return r
}

// publish stores a command in the stop stream and returns its sequence.
func (e *env) publish(body []byte, hdr nats.Header) uint64 {
	e.t.Helper()
	c := e.cfg
	c.setDefaults()
	m := nats.NewMsg(c.StopSubject)
	m.Data = body
	for k, v := range hdr {
		m.Header[k] = v
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ack, err := e.js.PublishMsg(ctx, m)
	if err != nil {
		e.t.Fatalf("publish: %v", err)
	}
	return ack.Sequence
}

// collector reads every message of a stream with an ordered consumer.
type collector struct {
	mu   sync.Mutex
	msgs []jetstream.Msg
	cc   jetstream.ConsumeContext
}

func newCollector(t testing.TB, js jetstream.JetStream, stream string) *collector {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	oc, err := js.OrderedConsumer(ctx, stream, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	c := &collector{}
	cc, err := oc.Consume(func(m jetstream.Msg) {
		c.mu.Lock()
		c.msgs = append(c.msgs, m)
		c.mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	c.cc = cc
	t.Cleanup(cc.Stop)
	return c
}

func (c *collector) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.msgs)
}

func (c *collector) all() []jetstream.Msg {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]jetstream.Msg(nil), c.msgs...)
}

// wait polls until the collector holds at least n messages.
func (c *collector) wait(t testing.TB, n int, within time.Duration) []jetstream.Msg {
	t.Helper()
	testutil.Eventually(t, within, func() error {
		if got := c.len(); got < n {
			return fmt.Errorf("have %d messages, want %d", got, n)
		}
		return nil
	})
	return c.all()
}

func (c *collector) outcomes(t testing.TB) []Outcome {
	t.Helper()
	var out []Outcome
	for _, m := range c.all() {
		var o Outcome
		if err := json.Unmarshal(m.Data(), &o); err != nil {
			t.Fatalf("outcome is not JSON: %v: %s", err, m.Data())
		}
		out = append(out, o)
	}
	return out
}

// benchLogger logs warnings to stderr when DLF_STOP_BENCH_LOG is set, to
// see why a benchmark stalls; otherwise benchmarks log nothing.
func benchLogger() *zap.Logger {
	if os.Getenv("DLF_STOP_BENCH_LOG") == "" {
		return zap.NewNop()
	}
	l, err := zap.NewDevelopment(zap.IncreaseLevel(zap.InfoLevel))
	if err != nil {
		return zap.NewNop()
	}
	return l
}

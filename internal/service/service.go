package service

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/command"
	"github.com/dlf-stop/worker/internal/config"
	"github.com/dlf-stop/worker/internal/consumer"
	"github.com/dlf-stop/worker/internal/dlf"
	"github.com/dlf-stop/worker/internal/natsconn"
	"github.com/dlf-stop/worker/internal/opshttp"
	"github.com/dlf-stop/worker/internal/secretfile"
)

// Hooks let callers observe start-up; all optional.
type Hooks struct {
	// Serving is called once the operations HTTP server answers, before
	// NATS is connected, with its bound address: /healthz is 200 from
	// then on and /readyz 503 until the worker consumes.
	Serving func(httpAddr string)
	// Started is called once the worker consumes, with the bound address
	// of the operations HTTP server.
	Started func(httpAddr string)
}

// Start-up steps /readyz names while the worker does not exist yet.
const (
	StepConnecting = "connecting to NATS"
	StepSetup      = "setting up JetStream"
)

// Run runs the worker until ctx ends, then shuts down gracefully: stop
// fetching, finish or return in-flight commands within SHUTDOWN_TIMEOUT,
// drain the NATS connection. It returns nil after a clean shutdown.
func Run(ctx context.Context, cfg config.Config, log *zap.Logger, hooks Hooks) error {
	workerID := WorkerID()
	log = log.With(zap.String("worker_id", workerID))
	log.Info("starting", zap.Any("config", cfg.Redacted()))

	// Secrets live only inside these values, never in a log field.
	secretCtx, stopSecrets := context.WithCancel(context.WithoutCancel(ctx))
	defer stopSecrets()
	// The worker is made after the client that needs the credentials; a
	// change that comes before it has no circuit to wake.
	var worker atomic.Pointer[consumer.Worker]
	creds, closeCreds, err := credentials(secretCtx, cfg.DLF, log, secretfile.WithOnChange(func() {
		if w := worker.Load(); w != nil {
			w.CredentialsChanged()
		}
	}))
	if err != nil {
		return err
	}
	// Run returns only once the watchers are gone: one still re-reading
	// would call into a worker that has stopped.
	defer closeCreds()

	client, err := dlf.NewClient(dlf.Config{
		Endpoint:    cfg.DLF.EndpointURL(),
		Credentials: creds,
		Timeout:     cfg.DLF.Timeout,
		MaxConns:    cfg.WorkerConcurrency,
		UserAgent:   "dlf-stop-worker",
	})
	if err != nil {
		return fmt.Errorf("dlf client: %w", err)
	}
	defer client.CloseIdleConnections()

	// The operations server answers from here on, while NATS connects and
	// JetStream is set up (which may take long): /healthz is 200 so a
	// liveness probe does not kill a process that is only waiting, /readyz
	// 503 naming the step. It is shut down last, after the worker stopped
	// and NATS drained (deferred before everything that follows).
	reg := prometheus.NewRegistry()
	// The runtime's own metrics, under the contract's prefix too (every
	// metric name starts dlf_stop_): dlf_stop_go_goroutines,
	// dlf_stop_process_resident_memory_bytes and the like.
	runtimeReg := prometheus.WrapRegistererWithPrefix("dlf_stop_", reg)
	for _, c := range []prometheus.Collector{
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	} {
		if err := runtimeReg.Register(c); err != nil {
			return fmt.Errorf("metrics: %w", err)
		}
	}
	metrics, err := consumer.NewMetrics(reg)
	if err != nil {
		return fmt.Errorf("metrics: %w", err)
	}
	readiness := opshttp.NewReadiness(StepConnecting)
	ops, err := opshttp.Listen(cfg.HTTPAddr, reg, readiness.Ready, log)
	if err != nil {
		return fmt.Errorf("HTTP_ADDR: listen %s: %w", cfg.HTTPAddr, err)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		ops.Serve()
	}()
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = ops.Shutdown(sctx)
		<-served // Serve returns as soon as Shutdown closed the listener
	}()
	log.Info("serving operations HTTP", zap.String("http_addr", ops.Addr()))
	if hooks.Serving != nil {
		hooks.Serving(ops.Addr())
	}

	nc, err := natsconn.Connect(ctx, cfg.NATS, log, "dlf-stop-worker "+workerID)
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("jetstream: %w", err)
	}

	readiness.Starting(StepSetup)
	ccfg := ConsumerConfig(cfg, workerID)
	cons, err := setUp(ctx, nc, js, ccfg, log)
	if err != nil {
		return err
	}

	w, err := consumer.New(js, cons, client, ccfg, log, metrics)
	if err != nil {
		return err
	}
	worker.Store(w)
	readiness.Delegate(w.Readiness)
	log.Info("consuming", zap.String("stream", ccfg.StopStream), zap.String("consumer", ccfg.ConsumerName),
		zap.String("http_addr", ops.Addr()), zap.Int("concurrency", ccfg.Concurrency))
	if hooks.Started != nil {
		hooks.Started(ops.Addr())
	}

	runErr := w.Run(ctx)
	drainNATS(nc, log)
	return runErr
}

// drainNATS flushes acks and naks the loop sent and closes the connection.
func drainNATS(nc interface {
	Drain() error
	IsClosed() bool
}, log *zap.Logger) {
	if err := nc.Drain(); err != nil {
		log.Warn("drain nats", zap.Error(err))
		return
	}
	deadline := time.Now().Add(5 * time.Second)
	for !nc.IsClosed() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
}

// ConsumerConfig maps the environment configuration onto the loop's.
func ConsumerConfig(cfg config.Config, workerID string) consumer.Config {
	s := cfg.Subjects
	return consumer.Config{
		StopStream:      s.StopStream,
		StopSubject:     s.StopSubject,
		ConsumerName:    s.ConsumerName,
		OutcomeStream:   s.OutcomeStream,
		OutcomePrefix:   s.OutcomeSubjectPrefix,
		DeadStream:      s.DeadStream,
		DeadSubject:     s.DeadSubject,
		Replicas:        s.StreamReplicas,
		Concurrency:     cfg.WorkerConcurrency,
		CallTimeout:     cfg.DLF.Timeout,
		RetryInitial:    cfg.Retry.InitialInterval,
		RetryMax:        cfg.Retry.MaxInterval,
		RetryMaxElapsed: cfg.Retry.MaxElapsed,
		ShutdownTimeout: cfg.ShutdownTimeout,
		Defaults:        command.Defaults{ProjectID: cfg.DLF.ProjectID, Workspace: cfg.DLF.Workspace},
		WorkerID:        workerID,
		StateBucket:     s.StateBucket,
		StateTTL:        cfg.StateTTL,
		RateLimit:       cfg.RateLimit,
		RateBurst:       cfg.RateBurst,
	}
}

// credentials returns the per-request credential source. File-backed
// values are watched, so a rotated secret applies to the next request.
//
// opts apply to every watched file (WithOnChange: a rotation). closeAll
// stops the watchers and waits for them.
func credentials(ctx context.Context, d config.DLF, log *zap.Logger, opts ...secretfile.Option) (src func() dlf.Credentials, closeAll func(), err error) {
	var closers []func()
	closeWatchers := func() {
		for _, c := range closers {
			c()
		}
	}
	defer func() {
		if err != nil {
			closeWatchers() // those started before the one that failed
		}
	}()
	if d.Unauthenticated() {
		log.Warn("no DLF credentials configured: requests go out unsigned (only useful against an emulator)")
		return nil, closeWatchers, nil
	}
	value := func(inline, file, name string) (*secretfile.Value, error) {
		if file == "" {
			return secretfile.Static(inline), nil
		}
		v, err := secretfile.Watch(ctx, file, log, opts...)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		closers = append(closers, v.Close)
		return v, nil
	}
	// An AK and an SK both from files are watched as one pair: a
	// Kubernetes Secret swaps them together, and a request must never be
	// signed with one new key and one old.
	var keys func() (ak, sk string)
	if d.AKFile != "" && d.SKFile != "" {
		p, err := secretfile.WatchPair(ctx, d.AKFile, d.SKFile, log, opts...)
		if err != nil {
			return nil, nil, fmt.Errorf("HUAWEICLOUD_SDK_AK_FILE, HUAWEICLOUD_SDK_SK_FILE: %w", err)
		}
		closers = append(closers, p.Close)
		keys = p.Get
	} else {
		ak, err := value(d.AK, d.AKFile, "HUAWEICLOUD_SDK_AK_FILE")
		if err != nil {
			return nil, nil, err
		}
		sk, err := value(d.SK, d.SKFile, "HUAWEICLOUD_SDK_SK_FILE")
		if err != nil {
			return nil, nil, err
		}
		keys = func() (string, string) { return ak.Get(), sk.Get() }
	}
	token, err := value(d.AuthToken, d.AuthTokenFile, "DLF_AUTH_TOKEN_FILE")
	if err != nil {
		return nil, nil, err
	}
	securityToken := d.SecurityToken
	return func() dlf.Credentials {
		ak, sk := keys()
		return dlf.Credentials{AK: ak, SK: sk, SecurityToken: securityToken, AuthToken: token.Get()}
	}, closeWatchers, nil
}

// WorkerID names this process in outcomes and logs: the host name (the
// pod name on Kubernetes) and a random suffix, so two processes on one
// host differ.
func WorkerID() string {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "worker"
	}
	var b [3]byte
	_, _ = rand.Read(b[:])
	return host + "-" + hex.EncodeToString(b[:])
}

// setUp binds (or creates) the streams, the bucket and the consumer. A
// JetStream request the worker's NATS user may not make is dropped by the
// server, which reports the violation only as an asynchronous error: set-up
// would wait out its whole timeout and then name the timeout alone. Such a
// violation ends it at once, named.
func setUp(ctx context.Context, nc *nats.Conn, js jetstream.JetStream, ccfg consumer.Config, log *zap.Logger) (jetstream.Consumer, error) {
	tctx, cancelTimeout := context.WithTimeout(ctx, 30*time.Second)
	defer cancelTimeout()
	setupCtx, cancel := context.WithCancelCause(tctx)
	defer cancel(nil)
	logged := nc.ErrorHandler()
	nc.SetErrorHandler(func(c *nats.Conn, sub *nats.Subscription, err error) {
		if logged != nil {
			logged(c, sub, err)
		}
		if errors.Is(err, nats.ErrPermissionViolation) {
			cancel(err)
		}
	})
	defer nc.SetErrorHandler(logged)
	cons, err := consumer.Setup(setupCtx, js, ccfg, log)
	if err != nil {
		if cause := context.Cause(setupCtx); errors.Is(cause, nats.ErrPermissionViolation) {
			return nil, fmt.Errorf("set up JetStream: the NATS user may not do what the worker needs (see deploy/nats/nats-server.conf): %w", cause)
		}
		return nil, fmt.Errorf("set up JetStream: %w", err)
	}
	return cons, nil
}

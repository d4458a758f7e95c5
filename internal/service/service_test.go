package service

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/dlf-stop/worker/internal/config"
	"github.com/dlf-stop/worker/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// The operations server answers while the worker is still connecting to
// NATS: /healthz 200, /readyz 503 naming the step, /metrics with the
// worker's metrics. The NATS here accepts the TCP connection and never
// sends INFO, so Run cannot get past natsconn.Connect; the probes are made
// after that connection arrived and Run is checked to be still running
// after them, so they cannot have been answered by a server started later.
func TestOpsAnswerWhileConnecting(t *testing.T) {
	natsURL, dialed := stallingNATS(t)
	r := startRun(t, testConfig(t, natsURL))

	select {
	case <-dialed:
	case <-r.done:
		t.Fatalf("Run returned before dialing NATS: %v", r.err)
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not dial NATS within 10s")
	}
	base := "http://" + r.waitServing(t)

	expect(t, base+"/healthz", http.StatusOK, "ok")
	expect(t, base+"/readyz", http.StatusServiceUnavailable, "not ready: starting: "+StepConnecting)
	expect(t, base+"/metrics", http.StatusOK, "dlf_stop_dlf_calls_in_flight 0")
	metricNamesArePrefixed(t, base+"/metrics")
	r.stillConnecting(t, "connecting to NATS")

	err := r.cancelAndWait(t)
	if err == nil || !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "connect nats") {
		t.Errorf("Run = %v, want the cancelled NATS connect", err)
	}
	if r.started.Load() != 0 {
		t.Error("Started was called although the worker never consumed")
	}
	refused(t, base+"/healthz")
}

// The same while JetStream is being set up: NATS answers, but nothing
// answers the JetStream API (a subscriber takes the requests and never
// replies), so consumer.Setup blocks until Run is cancelled.
func TestOpsAnswerWhileSettingUpJetStream(t *testing.T) {
	ns := testutil.RunServer(t, &server.Options{Host: "127.0.0.1", Port: -1}) // no JetStream
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	apiCalls := make(chan string, 64)
	if _, err := nc.Subscribe("$JS.API.>", func(m *nats.Msg) {
		select {
		case apiCalls <- m.Subject:
		default:
		}
	}); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}

	r := startRun(t, testConfig(t, ns.ClientURL()))
	base := "http://" + r.waitServing(t)
	select {
	case subj := <-apiCalls:
		t.Logf("Run waits on %s", subj)
	case <-r.done:
		t.Fatalf("Run returned before calling the JetStream API: %v", r.err)
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not call the JetStream API within 10s")
	}

	expect(t, base+"/healthz", http.StatusOK, "ok")
	expect(t, base+"/readyz", http.StatusServiceUnavailable, "not ready: starting: "+StepSetup)
	expect(t, base+"/metrics", http.StatusOK, "dlf_stop_dlf_calls_in_flight 0")
	r.stillConnecting(t, "setting up JetStream")

	err = r.cancelAndWait(t)
	if err == nil || !strings.Contains(err.Error(), "set up JetStream") {
		t.Errorf("Run = %v, want the cancelled JetStream set-up", err)
	}
	if r.started.Load() != 0 {
		t.Error("Started was called although the worker never consumed")
	}
	refused(t, base+"/healthz")
}

// With a real JetStream the same server goes ready once the worker
// consumes: Serving comes first, Started once with the same address, and
// after a clean stop the server is gone.
func TestOpsReadyOnceConsuming(t *testing.T) {
	ns := testutil.StartNATS(t)
	r := startRun(t, testConfig(t, ns.ClientURL()))
	addr := r.waitServing(t)
	base := "http://" + addr
	expect(t, base+"/healthz", http.StatusOK, "ok")

	select {
	case got := <-r.startedAddr:
		if got != addr {
			t.Errorf("Started(%q), Serving(%q): want the same address", got, addr)
		}
	case <-r.done:
		t.Fatalf("Run returned before consuming: %v", r.err)
	case <-time.After(30 * time.Second):
		t.Fatal("worker did not start within 30s")
	}
	testutil.Eventually(t, 10*time.Second, func() error {
		code, body, err := get(base + "/readyz")
		if err != nil {
			return err
		}
		if code != http.StatusOK || body != "ready\n" {
			return fmt.Errorf("/readyz = %d %q, want 200 ready", code, body)
		}
		return nil
	})
	expect(t, base+"/metrics", http.StatusOK, "dlf_stop_circuit_open 0")

	if err := r.cancelAndWait(t); err != nil {
		t.Errorf("Run after a clean stop = %v, want nil", err)
	}
	if n := r.started.Load(); n != 1 {
		t.Errorf("Started called %d times, want 1", n)
	}
	refused(t, base+"/healthz")
}

// A taken HTTP_ADDR still fails start-up with the error it always had,
// and now before NATS is dialed: the NATS here never completes a
// handshake, so reaching natsconn.Connect first would end in a connect
// timeout instead of this error.
func TestHTTPAddrInUse(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = taken.Close() })
	natsURL, _ := stallingNATS(t)
	cfg := testConfig(t, natsURL)
	cfg.HTTPAddr = taken.Addr().String()

	r := startRun(t, cfg)
	select {
	case <-r.done:
	case <-time.After(3 * time.Second): // well under natsconn.ConnectTimeout
		t.Fatal("Run did not fail within 3s: it waits on NATS before binding HTTP_ADDR")
	}
	runErr := r.err
	want := "HTTP_ADDR: listen " + cfg.HTTPAddr + ": "
	if runErr == nil || !strings.HasPrefix(runErr.Error(), want) || !errors.Is(runErr, syscall.EADDRINUSE) {
		t.Errorf("Run = %v, want %q... wrapping EADDRINUSE", runErr, want)
	}
	if r.serving.Load() != 0 || r.started.Load() != 0 {
		t.Error("Serving or Started called although HTTP_ADDR could not be bound")
	}
}

func testConfig(t *testing.T, natsURL string) config.Config {
	t.Helper()
	cfg := config.Default()
	cfg.NATS.URL = natsURL
	cfg.DLF.Endpoint = "http://127.0.0.1:9" // never called: no command is published
	cfg.HTTPAddr = "127.0.0.1:0"
	cfg.ShutdownTimeout = 2 * time.Second
	if err := cfg.Validate(); err != nil {
		t.Fatalf("config: %v", err)
	}
	return cfg
}

// run is one Run in a goroutine, with what its hooks saw.
type run struct {
	cancel      context.CancelFunc
	done        chan struct{} // closed when Run returned
	err         error         // what Run returned; read after done
	servingAddr chan string
	startedAddr chan string
	serving     atomic.Int32
	started     atomic.Int32
}

// startRun starts Run; the test's end cancels it and waits for it.
func startRun(t *testing.T, cfg config.Config) *run {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &run{
		cancel:      cancel,
		done:        make(chan struct{}),
		servingAddr: make(chan string, 1),
		startedAddr: make(chan string, 1),
	}
	hooks := Hooks{
		Serving: func(addr string) {
			if r.serving.Add(1) == 1 {
				r.servingAddr <- addr
			}
		},
		Started: func(addr string) {
			if r.started.Add(1) == 1 {
				r.startedAddr <- addr
			}
		},
	}
	log := zaptest.NewLogger(t)
	go func() {
		defer close(r.done)
		r.err = Run(ctx, cfg, log, hooks)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-r.done:
		case <-time.After(15 * time.Second):
			t.Error("Run did not return within 15s of cancel")
		}
	})
	return r
}

// waitServing returns the ops server's address once Serving was called.
func (r *run) waitServing(t *testing.T) string {
	t.Helper()
	select {
	case addr := <-r.servingAddr:
		return addr
	case <-r.done:
		t.Fatalf("Run returned before serving HTTP: %v", r.err)
	case <-time.After(10 * time.Second):
		t.Fatal("ops server not serving within 10s")
	}
	return ""
}

// waitStarted waits until the worker consumes (Started was called).
func (r *run) waitStarted(t *testing.T) {
	t.Helper()
	select {
	case <-r.startedAddr:
	case <-r.done:
		t.Fatalf("Run returned before consuming: %v", r.err)
	case <-time.After(30 * time.Second):
		t.Fatal("worker did not start within 30s")
	}
}

// stillConnecting fails when Run has returned: the probes before it
// must have been answered while Run was still in the named step.
func (r *run) stillConnecting(t *testing.T, step string) {
	t.Helper()
	select {
	case <-r.done:
		t.Fatalf("Run returned (%v) before the probes were done: they were not answered while %s", r.err, step)
	default:
	}
}

// cancelAndWait cancels Run and returns what it returned.
func (r *run) cancelAndWait(t *testing.T) error {
	t.Helper()
	r.cancel()
	select {
	case <-r.done:
		return r.err
	case <-time.After(15 * time.Second):
		t.Fatal("Run did not return within 15s of cancel")
		return nil
	}
}

// stallingNATS listens like a NATS server but never writes a byte, so a
// client hangs in the handshake. dialed is closed at the first connection.
func stallingNATS(t *testing.T) (url string, dialed <-chan struct{}) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	first := make(chan struct{})
	conns := make(chan net.Conn, 16)
	go func() {
		defer close(conns)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			select {
			case <-first:
			default:
				close(first)
			}
			select {
			case conns <- c:
			default:
				_ = c.Close()
			}
		}
	}()
	t.Cleanup(func() {
		_ = l.Close()
		for c := range conns {
			_ = c.Close()
		}
	})
	return "nats://" + l.Addr().String(), first
}

// httpClient opens a connection per request, so none outlives a test.
var httpClient = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}

func get(url string) (int, string, error) {
	resp, err := httpClient.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// expect asserts one answer: the status and a substring of the body.
func expect(t *testing.T, url string, code int, body string) {
	t.Helper()
	gotCode, gotBody, err := get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	if gotCode != code || !strings.Contains(gotBody, body) {
		t.Errorf("GET %s = %d %q, want %d with %q", url, gotCode, gotBody, code, body)
	}
}

// metricNamesArePrefixed asserts that every metric served starts with
// dlf_stop_ (contract section 7), the runtime's own included.
func metricNamesArePrefixed(t *testing.T, url string) {
	t.Helper()
	_, body, err := get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	names := 0
	for _, line := range strings.Split(body, "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		names++
		if !strings.HasPrefix(line, "dlf_stop_") {
			t.Errorf("metric without the dlf_stop_ prefix: %s", line)
		}
	}
	for _, want := range []string{"dlf_stop_go_goroutines ", "dlf_stop_process_resident_memory_bytes "} {
		if !strings.Contains(body, "\n"+want) {
			t.Errorf("%s missing from /metrics", want)
		}
	}
	if names == 0 {
		t.Error("/metrics served no metric")
	}
}

// refused asserts that nothing answers url any more.
func refused(t *testing.T, url string) {
	t.Helper()
	if code, _, err := get(url); err == nil {
		t.Errorf("GET %s = %d after Run returned, want no server", url, code)
	}
}

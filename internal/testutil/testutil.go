package testutil

import (
	"bytes"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/dlf-stop/worker/internal/embedded"
)

// pollEvery is how often Eventually and Consistently look again.
const pollEvery = 10 * time.Millisecond

// Eventually polls fn until it returns nil, and fails the test with fn's
// last error when that has not happened within the given time.
func Eventually(t testing.TB, within time.Duration, fn func() error) {
	t.Helper()
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	tick := time.NewTicker(pollEvery)
	defer tick.Stop()
	for {
		err := fn()
		if err == nil {
			return
		}
		select {
		case <-deadline.C:
			t.Fatalf("condition not met within %s: %v", within, err)
		case <-tick.C:
		}
	}
}

// Consistently fails the test as soon as fn returns an error during d.
func Consistently(t testing.TB, d time.Duration, fn func() error) {
	t.Helper()
	end := time.NewTimer(d)
	defer end.Stop()
	tick := time.NewTicker(pollEvery)
	defer tick.Stop()
	for {
		if err := fn(); err != nil {
			t.Fatal(err)
		}
		select {
		case <-end.C:
			return
		case <-tick.C:
		}
	}
}

// SyncBuffer is a bytes.Buffer that one goroutine (a child process's
// output, a logger) may write while the test reads it.
type SyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String returns everything written so far.
func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// StartNATS runs a JetStream server on a random loopback port, with a
// store directory of the test's own, until the test ends.
func StartNATS(t testing.TB) *server.Server {
	t.Helper()
	ns, err := embedded.Start(embedded.Options{StoreDir: t.TempDir()})
	if err != nil {
		t.Fatalf("start NATS: %v", err)
	}
	t.Cleanup(func() {
		ns.Shutdown()
		ns.WaitForShutdown()
	})
	return ns
}

// WaitFor polls cond until it holds, and fails the test naming what it
// waited for when that has not happened within the given time.
func WaitFor(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	Eventually(t, within, func() error {
		if cond() {
			return nil
		}
		return fmt.Errorf("waiting for %s", what)
	})
}

// RunServer starts a NATS server from opts (without logging or signal
// handling) and shuts it down when the test ends. opts says where it
// listens and what it requires; StartNATS is the plain JetStream case.
func RunServer(t testing.TB, opts *server.Options) *server.Server {
	t.Helper()
	opts.NoLog = true
	opts.NoSigs = true
	s, err := server.NewServer(opts)
	if err != nil {
		t.Fatalf("new NATS server: %v", err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		s.Shutdown()
		t.Fatal("NATS server not ready within 10s")
	}
	t.Cleanup(func() {
		s.Shutdown()
		s.WaitForShutdown()
	})
	return s
}

// ConnectJS connects to url with opts for the rest of the test, and returns
// the connection and its JetStream.
func ConnectJS(t testing.TB, url string, opts ...nats.Option) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return nc, js
}

// ServingAddr finds, among a worker's JSON log lines, the address its
// "serving operations HTTP" line names, or "". Tests start workers with
// HTTP_ADDR=127.0.0.1:0 and read the port here: one picked free
// beforehand may be taken by the time the worker binds it.
func ServingAddr(lines []string) string {
	for _, l := range lines {
		var e struct {
			Msg  string `json:"msg"`
			Addr string `json:"http_addr"`
		}
		if json.Unmarshal([]byte(l), &e) == nil && e.Msg == "serving operations HTTP" && e.Addr != "" {
			return e.Addr
		}
	}
	return ""
}

// Returns fails the test when fn has not returned within the given time.
func Returns(t testing.TB, within time.Duration, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	select {
	case <-done:
	case <-time.After(within):
		t.Fatalf("%s: still blocked after %s", what, within)
	}
}

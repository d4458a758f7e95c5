package embedded_test

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/dlf-stop/worker/internal/embedded"
)

// promptly bounds how long a Start that cannot succeed may take. It is a
// bound well under Start's 10s readiness wait, not a performance figure.
const promptly = 5 * time.Second

// TestStartFailsPromptlyWithReason runs real servers that cannot start and
// checks that Start says why, without waiting out its readiness timeout,
// and leaves no goroutine of the failed server behind.
func TestStartFailsPromptlyWithReason(t *testing.T) {
	tests := []struct {
		name string
		// setup returns the options of a server that cannot start, and
		// the text its error must contain: the cause, as the operating
		// system or the server words it.
		setup func(t *testing.T) (embedded.Options, string)
	}{
		{
			name: "port held by another listener",
			setup: func(t *testing.T) (embedded.Options, string) {
				l, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = l.Close() })
				port := l.Addr().(*net.TCPAddr).Port
				_, want := net.Listen("tcp", l.Addr().String())
				if want == nil {
					t.Fatal("a second listener on a held port was accepted")
				}
				return embedded.Options{Port: port, StoreDir: t.TempDir()}, want.Error()
			},
		},
		{
			name: "store directory under a regular file",
			setup: func(t *testing.T) (embedded.Options, string) {
				file := filepath.Join(t.TempDir(), "file")
				if err := os.WriteFile(file, nil, 0o600); err != nil {
					t.Fatal(err)
				}
				// nats-server's own words; its message names no path.
				return embedded.Options{StoreDir: filepath.Join(file, "store")},
					"Can't start JetStream: storage directory is not a directory"
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ignore := goleak.IgnoreCurrent()
			opts, want := tt.setup(t)

			began := time.Now()
			s, err := embedded.Start(opts)
			took := time.Since(began)

			if err == nil {
				s.Shutdown()
				s.WaitForShutdown()
				t.Fatal("Start succeeded")
			}
			t.Logf("Start returned after %s: %v", took, err)
			if !strings.Contains(err.Error(), want) {
				t.Errorf("Start error = %q, want it to contain %q", err, want)
			}
			if took > promptly {
				t.Errorf("Start returned after %s, want under %s", took, promptly)
			}
			goleak.VerifyNone(t, ignore)
		})
	}
}

// TestStartServesAndShutsDown checks the path every other test relies on:
// a server that can start accepts connections, and its shutdown leaves
// nothing running.
func TestStartServesAndShutsDown(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	s, err := embedded.Start(embedded.Options{StoreDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", s.Addr().String())
	if err != nil {
		s.Shutdown()
		t.Fatalf("dial the started server: %v", err)
	}
	_ = c.Close()
	// A zero port is a random one, as Options says, not nats-server's
	// 4222 (outside the ephemeral range a random port comes from; found
	// by review: nothing checked it).
	if port := s.Addr().(*net.TCPAddr).Port; port == 4222 {
		t.Errorf("a zero Port gave the server 4222, not a random port")
	}
	s.Shutdown()
	s.WaitForShutdown()
	goleak.VerifyNone(t, ignore)
}

// worker dev prefers 4222 but takes a free port when that one is taken
// (contract section 8): PortOrFree gives the port wanted while it can be
// bound, and -1 (a random port) while something listens on it.
func TestPortOrFree(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	if got := embedded.PortOrFree("127.0.0.1", port); got != -1 {
		t.Errorf("PortOrFree(%d) = %d while the port is taken; want -1", port, got)
	}
	_ = l.Close()
	if got := embedded.PortOrFree("127.0.0.1", port); got != port {
		t.Errorf("PortOrFree(%d) = %d once the port is free; want it", port, got)
	}
}

package natsconn

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/dlf-stop/worker/internal/config"
	"github.com/dlf-stop/worker/internal/testutil"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.Cleanup(func(code int) {
		// The auth matrix figure: every connect the tests made, by method
		// (the top-level test) and result.
		matrix.Lock()
		fmt.Printf("auth_matrix accepted=%d refused=%d by_test=%v\n", matrix.accepted, matrix.refused, matrix.byTest)
		matrix.Unlock()
		os.Exit(code)
	}))
}

var matrix struct {
	sync.Mutex
	accepted, refused int
	byTest            map[string]string
}

func countConnect(t *testing.T, accepted bool) {
	name, _, _ := strings.Cut(t.Name(), "/")
	matrix.Lock()
	defer matrix.Unlock()
	if matrix.byTest == nil {
		matrix.byTest = map[string]string{}
	}
	if accepted {
		matrix.accepted++
		matrix.byTest[name] += "+"
	} else {
		matrix.refused++
		matrix.byTest[name] += "-"
	}
}

// runServer starts an embedded NATS server on a random loopback port (or
// opts.Port) and shuts it down when the test ends.
func runServer(t *testing.T, opts *server.Options) *server.Server {
	t.Helper()
	opts.Host = "127.0.0.1"
	if opts.Port == 0 {
		opts.Port = -1
	}
	return testutil.RunServer(t, opts)
}

func serverURL(s *server.Server) string {
	return fmt.Sprintf("nats://%s", s.Addr().String())
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-deadline.C:
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		case <-tick.C:
		}
	}
}

func writeFile(t *testing.T, dir, name string, content []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, content, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// connectAndCheck connects with c and checks the outcome: wantErr "" means
// success (the connection is then used and closed); otherwise the error must
// contain wantErr, start with "connect nats: " and contain none of secrets.
func connectAndCheck(t *testing.T, c config.NATS, wantErr string, secrets ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// An observer, not zaptest: the closed handler may log after the test.
	core, logs := observer.New(zapcore.DebugLevel)
	defer func() {
		for _, e := range logs.All() {
			line := fmt.Sprint(e.Message, " ", e.ContextMap())
			for _, s := range secrets {
				if s != "" && strings.Contains(line, s) {
					t.Errorf("log entry holds a secret: %s", line)
				}
			}
		}
	}()
	nc, err := Connect(ctx, c, zap.New(core), "natsconn-test")
	if wantErr == "" {
		if err != nil {
			t.Fatalf("Connect: %v", err)
		}
		defer nc.Close()
		if err := nc.Publish("hello", []byte("x")); err != nil {
			t.Fatalf("publish: %v", err)
		}
		if err := nc.FlushWithContext(ctx); err != nil {
			t.Fatalf("flush: %v", err)
		}
		if logs.FilterMessage("nats connected").Len() != 1 {
			t.Errorf("connect not logged: %v", logs.All())
		}
		countConnect(t, true)
		return
	}
	if err == nil {
		nc.Close()
		t.Fatalf("Connect succeeded, want error containing %q", wantErr)
	}
	msg := err.Error()
	if !strings.HasPrefix(msg, "connect nats: ") {
		t.Errorf("error %q does not start with %q", msg, "connect nats: ")
	}
	if !strings.Contains(msg, wantErr) {
		t.Errorf("error %q does not contain %q", msg, wantErr)
	}
	for _, s := range secrets {
		if s != "" && strings.Contains(msg, s) {
			t.Errorf("error %q contains the secret %q", msg, s)
		}
	}
	countConnect(t, false)
	t.Logf("refused as expected: %v", err)
}

const (
	goodPassword = "correct-horse-battery-staple"
	badPassword  = "wrong-password-value"
	goodToken    = "s3cr3t-token-0123456789"
	badToken     = "bad-token-9876543210"
)

func TestErrorRedactsURL(t *testing.T) {
	s := runServer(t, &server.Options{Username: "worker", Password: goodPassword})
	url := "nats://worker:" + badPassword + "@" + s.Addr().String()
	_, err := Connect(context.Background(), config.NATS{URL: url}, zap.NewNop(), "t")
	if err == nil {
		t.Fatal("Connect succeeded")
	}
	want := fmt.Sprintf("connect nats: authorization violation (servers nats://[redacted]@%s)", s.Addr())
	if err.Error() != want {
		t.Fatalf("error = %q, want %q", err, want)
	}
	if !errors.Is(err, nats.ErrAuthorization) {
		t.Fatalf("errors.Is(err, nats.ErrAuthorization) = false for %v", err)
	}
}

func TestOptionsBadFiles(t *testing.T) {
	dir := t.TempDir()
	junk := writeFile(t, dir, "junk.pem", []byte("not a certificate\n"))
	missing := filepath.Join(dir, "missing")
	tests := []struct {
		name string
		c    config.NATS
		want string
	}{
		{"CA not PEM", config.NATS{URL: config.DefaultNATSURL, CA: junk}, "NATS_CA: "},
		{"cert not PEM", config.NATS{URL: config.DefaultNATSURL, Cert: junk, Key: junk}, "NATS_CERT, NATS_KEY: "},
		{"CA missing", config.NATS{URL: config.DefaultNATSURL, CA: missing}, "NATS_CA: cannot open"},
		{"password file missing", config.NATS{URL: config.DefaultNATSURL, User: "u", PasswordFile: missing}, "NATS_PASSWORD_FILE: cannot open"},
		{"two methods", config.NATS{URL: config.DefaultNATSURL, Token: goodToken, User: "u", Password: goodPassword}, "NATS_USER, NATS_TOKEN: set only one"},
		{"bad URL", config.NATS{URL: "http://u:" + goodPassword + "@h:1"}, "NATS_URL: "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Options(tt.c, zap.NewNop(), "t")
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Options error = %v, want it to contain %q", err, tt.want)
			}
			for _, s := range []string{goodPassword, goodToken} {
				if strings.Contains(err.Error(), s) {
					t.Fatalf("error %q contains a secret", err)
				}
			}
		})
	}
}

func TestOptionsReconnectForever(t *testing.T) {
	opts, err := Options(config.NATS{URL: config.DefaultNATSURL}, nil, "my-worker")
	if err != nil {
		t.Fatal(err)
	}
	o := nats.GetDefaultOptions()
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			t.Fatal(err)
		}
	}
	if o.MaxReconnect != -1 || !o.AllowReconnect || o.ReconnectWait != ReconnectWait || o.Name != "my-worker" {
		t.Fatalf("MaxReconnect=%d AllowReconnect=%v ReconnectWait=%s Name=%q", o.MaxReconnect, o.AllowReconnect, o.ReconnectWait, o.Name)
	}
	if o.DisconnectedErrCB == nil || o.ReconnectedCB == nil || o.AsyncErrorCB == nil || o.ClosedCB == nil || o.ReconnectErrCB == nil {
		t.Fatal("a connection event handler is missing")
	}
}

// TestPasswordFileRotation restarts the server with a new password: the
// client, which reads NATS_PASSWORD_FILE at every reconnect, gets back in
// with the rotated file, and nothing it logs holds a password.
// A rotated NATS_PASSWORD_FILE is used at the next reconnect, whichever
// changes first: the file (Kubernetes updated the Secret before the server
// took the new password) or the server (the kubelet is up to a minute late
// with the file, and every reconnect meanwhile is refused).
func TestPasswordFileRotation(t *testing.T) {
	t.Run("file first", func(t *testing.T) { testPasswordRotation(t, false) })
	t.Run("server first", func(t *testing.T) { testPasswordRotation(t, true) })
}

func testPasswordRotation(t *testing.T, serverFirst bool) {
	const oldPassword, newPassword = "old-password-0001", "new-password-0002"
	s1, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true, Username: "worker", Password: oldPassword})
	if err != nil {
		t.Fatal(err)
	}
	go s1.Start()
	if !s1.ReadyForConnections(10 * time.Second) {
		t.Fatal("server not ready")
	}
	t.Cleanup(func() { s1.Shutdown(); s1.WaitForShutdown() })
	port := s1.Addr().(*net.TCPAddr).Port

	dir := t.TempDir()
	pwFile := writeFile(t, dir, "password", []byte(oldPassword+"\n"))
	core, logs := observer.New(zapcore.DebugLevel)
	nc, err := Connect(context.Background(), config.NATS{URL: serverURL(s1), User: "worker", PasswordFile: pwFile}, zap.New(core), "rotation")
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()

	// Rotate the way Kubernetes does: write a new file, rename over the old.
	rotate := func() {
		tmp := writeFile(t, dir, "password.new", []byte(newPassword))
		if err := os.Rename(tmp, pwFile); err != nil {
			t.Fatal(err)
		}
	}
	if !serverFirst {
		rotate()
	}
	s1.Shutdown()
	s1.WaitForShutdown()
	waitFor(t, 10*time.Second, "disconnect", func() bool { return !nc.IsConnected() })
	runServer(t, &server.Options{Port: port, Username: "worker", Password: newPassword})
	if serverFirst {
		// nats.go closes a connection for good after two refusals in a row
		// from one server, unless told not to.
		waitFor(t, 20*time.Second, "three refused reconnects", func() bool {
			return logs.FilterMessage("nats error").FilterField(zap.String("error", "nats: authorization violation")).Len() >= 3
		})
		if nc.IsClosed() {
			t.Fatal("connection closed after refused reconnects")
		}
		rotate()
	}
	waitFor(t, 20*time.Second, "reconnect with the rotated password", func() bool {
		return nc.IsConnected() && nc.Stats().Reconnects >= 1
	})
	if err := nc.Flush(); err != nil {
		t.Fatalf("flush after reconnect: %v", err)
	}

	waitFor(t, 5*time.Second, "reconnect log", func() bool {
		return logs.FilterMessage("nats reconnected").Len() > 0
	})
	if logs.FilterMessage("nats disconnected; reconnecting").Len() == 0 {
		t.Error("no disconnect logged")
	}
	for _, e := range logs.All() {
		line := fmt.Sprint(e.Message, " ", e.ContextMap())
		for _, s := range []string{oldPassword, newPassword} {
			if strings.Contains(line, s) {
				t.Errorf("log entry holds a password: %s", line)
			}
		}
		if e.Message == "nats reconnected" || e.Message == "nats disconnected; reconnecting" {
			if e.Level != zapcore.WarnLevel {
				t.Errorf("%q logged at %s, want warn", e.Message, e.Level)
			}
		}
	}
}

func TestPasswordFileUnreadableKeepsLastPassword(t *testing.T) {
	dir := t.TempDir()
	pwFile := writeFile(t, dir, "password", []byte(goodPassword))
	core, logs := observer.New(zapcore.DebugLevel)
	r := newRedactor(config.NATS{})
	pf := &passwordFile{path: pwFile, last: goodPassword, log: zap.New(core), r: r}
	if err := os.Remove(pwFile); err != nil {
		t.Fatal(err)
	}
	if got := pf.read(); got != goodPassword {
		t.Fatalf("read() = %q, want the last password", got)
	}
	if logs.FilterMessage("read NATS_PASSWORD_FILE failed; using the password read before").Len() != 1 {
		t.Fatalf("no warning logged: %v", logs.All())
	}
}

func TestConnectContext(t *testing.T) {
	t.Run("already cancelled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		_, err := Connect(ctx, config.NATS{URL: config.DefaultNATSURL}, zap.NewNop(), "t")
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
	})
	t.Run("cancelled during the handshake", func(t *testing.T) {
		// A listener that accepts and never speaks: nats.go waits for the
		// server's INFO until the context ends.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		accepted := make(chan net.Conn, 1)
		go func() {
			c, err := ln.Accept()
			if err == nil {
				accepted <- c
			}
			close(accepted)
		}()
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() {
			_, err := Connect(ctx, config.NATS{URL: "nats://" + ln.Addr().String()}, zap.NewNop(), "t")
			done <- err
		}()
		c := <-accepted
		if c == nil {
			t.Fatal("no connection accepted")
		}
		defer c.Close()
		start := time.Now()
		cancel()
		err = <-done
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
		if !strings.HasPrefix(err.Error(), "connect nats: context canceled") {
			t.Fatalf("err = %q", err)
		}
		if d := time.Since(start); d >= ConnectTimeout {
			t.Fatalf("Connect returned %s after cancel, not at once", d)
		}
	})
	t.Run("no server", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		_, err = Connect(context.Background(), config.NATS{URL: "nats://" + addr}, zap.NewNop(), "t")
		if err == nil || err.Error() != "connect nats: no servers available for connection (servers nats://"+addr+")" {
			t.Fatalf("err = %v", err)
		}
	})
}

func TestRedactor(t *testing.T) {
	r := newRedactor(config.NATS{
		URL:      "nats://alice:pa%24%24word@h:1, nats://tok3n-value@h:2",
		Password: "inline-password",
		Token:    "abc", // too short to scrub by value
	})
	tests := []struct{ in, want string }{
		{"bad inline-password here", "bad [redacted] here"},
		{`parse "nats://x:y@h:1": bad`, `parse "nats://[redacted]@h:1": bad`},
		{"pa$$word and pa%24%24word", "[redacted] and [redacted]"},
		{"tok3n-value", "[redacted]"},
		{"abc stays", "abc stays"},
	}
	for _, tt := range tests {
		if got := r.scrub(tt.in); got != tt.want {
			t.Errorf("scrub(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

// TestServerThatStopsReadingIsLeft: a server that completes the handshake
// and then reads nothing more. Publishes fill the socket's buffers and the
// next write blocks; the connection must give up after WriteTimeout, not
// after nats.go's default minute, so that a call's "sent" mark, and the
// call, are not held that long (the worker then reconnects, and its writes
// without an answer fail and are retried).
func TestServerThatStopsReadingIsLeft(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	stalled := make(chan net.Conn, 1)
	go func() {
		defer close(stalled)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		_, _ = c.Write([]byte(`INFO {"server_id":"stall","version":"2.15.2","proto":1,"headers":true,"max_payload":1048576}` + "\r\n"))
		// Read CONNECT and PING, answer PONG, then never read again.
		var seen []byte
		buf := make([]byte, 4096)
		for !strings.Contains(string(seen), "PING\r\n") {
			n, err := c.Read(buf)
			if err != nil {
				c.Close()
				return
			}
			seen = append(seen, buf[:n]...)
		}
		_, _ = c.Write([]byte("PONG\r\n"))
		stalled <- c
	}()
	nc, err := Connect(context.Background(), config.NATS{URL: "nats://" + ln.Addr().String()}, zap.NewNop(), "t")
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	c := <-stalled
	if c == nil {
		t.Fatal("the handshake did not complete")
	}
	defer c.Close()

	start := time.Now()
	published := make(chan error, 1)
	go func() {
		payload := make([]byte, 256*1024)
		for {
			if err := nc.Publish("s", payload); err != nil {
				published <- err
				return
			}
		}
	}()
	// Not nc.Status: it waits for the lock the blocked write holds.
	select {
	case err := <-published:
		// The blocked write's own error, or the reconnect buffer's
		// once the connection was given up.
		t.Logf("publishing failed after %s (WriteTimeout %s): %v", time.Since(start).Round(100*time.Millisecond), WriteTimeout, err)
	case <-time.After(WriteTimeout + 15*time.Second):
		t.Fatalf("publishes still blocked %s after the server stopped reading", time.Since(start).Round(time.Second))
	}
	// And the connection is given up, to reconnect.
	testutil.WaitFor(t, 5*time.Second, "the connection left for a reconnect", func() bool {
		return nc.Status() == nats.RECONNECTING
	})
}

//go:build unix

package natsconn

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/dlf-stop/worker/internal/config"
	"github.com/dlf-stop/worker/internal/testutil"
	"github.com/dlf-stop/worker/internal/testutil/natsjwt"
)

// NATS_PASSWORD_FILE is read inside nats.go's reconnect, which holds the
// connection's lock: a FIFO swapped in for the file would freeze every
// publish, ack and the shutdown. It is refused at once instead, and the
// password read before is used.
func TestPasswordFileSwappedForAFIFO(t *testing.T) {
	const password = "fifo-test-password-01"
	s := runServer(t, &server.Options{Username: "worker", Password: password})
	dir := t.TempDir()
	pwFile := writeFile(t, dir, "password", []byte(password+"\n"))
	core, logs := observer.New(zapcore.DebugLevel)
	nc, err := Connect(context.Background(), config.NATS{URL: serverURL(s), User: "worker", PasswordFile: pwFile}, zap.New(core), "fifo")
	if err != nil {
		t.Fatal(err)
	}
	// A cleanup, not a defer: registered before the FIFO's, it runs after
	// the FIFO released a read stuck in it, which holds the lock Close needs.
	t.Cleanup(nc.Close)

	fifo := testutil.FIFO(t, dir, "password.fifo")
	// Held open for writing (without writing) so that a reader blocks in
	// its read; released when the test ends, after the file is made
	// readable again for the reconnects that follow.
	w, err := os.OpenFile(fifo, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(fifo, pwFile); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = os.Rename(writeFile(t, dir, "password.back", []byte(password)), pwFile)
		w.Close()
	})
	if err := nc.ForceReconnect(); err != nil {
		t.Fatal(err)
	}
	// Polled on a goroutine of its own: a reconnect stuck in the read
	// holds the lock that nc.IsConnected waits for.
	var back bool
	testutil.Returns(t, 20*time.Second, "the reconnect (stuck reading the password file?)", func() {
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for deadline := time.Now().Add(15 * time.Second); !back && time.Now().Before(deadline); <-tick.C {
			back = nc.IsConnected() && nc.Stats().Reconnects >= 1
		}
	})
	if !back {
		t.Fatal("not reconnected with the password read before")
	}
	if err := nc.Flush(); err != nil {
		t.Errorf("flush after the reconnect: %v", err)
	}
	if logs.FilterMessage("read NATS_PASSWORD_FILE failed; using the password read before").Len() == 0 {
		t.Errorf("no warning logged: %v", logs.All())
	}
}

// The other files NATS reads again at every reconnect (NATS_CREDS,
// NATS_NKEY, NATS_CA, NATS_CERT, NATS_KEY) are read through the same
// guard: swapped for a FIFO, the reconnect fails and is tried again, and
// nothing waits on the connection's lock meanwhile; put back, the worker
// reconnects (found by review: nats.go read them with os.ReadFile under
// that lock).
func TestAuthAndTLSFilesSwappedForAFIFO(t *testing.T) {
	type setup struct {
		url  string
		c    config.NATS
		swap string // the file swapped for a FIFO
	}
	cases := map[string]func(t *testing.T) setup{
		"creds": func(t *testing.T) setup {
			op := natsjwt.NewOperator(t)
			acct := op.Account(t, true, false)
			opts := &server.Options{}
			op.Configure(t, opts)
			s := runServer(t, opts)
			f, _ := natsjwt.Creds(t, t.TempDir(), "w.creds", acct, nil)
			return setup{serverURL(s), config.NATS{Creds: f}, f}
		},
		"nkey": func(t *testing.T) setup {
			kp, pub := natsjwt.NewKey(t, nkeys.CreateUser)
			s := runServer(t, &server.Options{Nkeys: []*server.NkeyUser{{Nkey: pub}}})
			f, _ := seedFile(t, t.TempDir(), "w.nk", kp)
			return setup{serverURL(s), config.NATS{NKey: f}, f}
		},
	}
	mtls := func(t *testing.T, swap func(ca, cert, key string) string) setup {
		ca := newPKI(t, "trusted")
		serverCert, _, _, _ := ca.issue(t, "server", x509.ExtKeyUsageServerAuth)
		_, cert, key, _ := ca.issue(t, "client", x509.ExtKeyUsageClientAuth)
		s := runServer(t, &server.Options{
			TLSConfig: &tls.Config{
				Certificates: []tls.Certificate{serverCert}, ClientAuth: tls.RequireAndVerifyClientCert,
				ClientCAs: ca.pool, MinVersion: tls.VersionTLS12,
			},
			TLSVerify: true, TLSTimeout: 5,
		})
		return setup{serverURL(s), config.NATS{CA: ca.caFile, Cert: cert, Key: key}, swap(ca.caFile, cert, key)}
	}
	cases["ca"] = func(t *testing.T) setup { return mtls(t, func(ca, _, _ string) string { return ca }) }
	cases["cert"] = func(t *testing.T) setup { return mtls(t, func(_, cert, _ string) string { return cert }) }
	cases["key"] = func(t *testing.T) setup { return mtls(t, func(_, _, key string) string { return key }) }

	for name, mk := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel() // each waits out reconnect attempts
			su := mk(t)
			su.c.URL = su.url
			nc, err := Connect(context.Background(), su.c, zap.NewNop(), "fifo")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(nc.Close) // after the FIFO's cleanup released a stuck read
			content, err := os.ReadFile(su.swap)
			if err != nil {
				t.Fatal(err)
			}
			dir := filepath.Dir(su.swap)
			fifo := testutil.FIFO(t, dir, "swapped.fifo")
			w, err := os.OpenFile(fifo, os.O_RDWR, 0) // a reader would block
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { w.Close() })
			if err := os.Rename(fifo, su.swap); err != nil {
				t.Fatal(err)
			}
			if err := nc.ForceReconnect(); err != nil {
				t.Fatal(err)
			}
			// Two reconnect attempts at least (every 2 s), each reading
			// the FIFO: the lock IsConnected takes must stay free.
			testutil.Returns(t, 15*time.Second, "IsConnected (a reconnect stuck reading the FIFO?)", func() {
				tick := time.NewTicker(10 * time.Millisecond)
				defer tick.Stop()
				for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); <-tick.C {
					nc.IsConnected()
				}
			})
			if nc.IsConnected() {
				t.Fatal("reconnected while the file was a FIFO")
			}
			if err := os.Rename(writeFile(t, dir, "restored", content), su.swap); err != nil {
				t.Fatal(err)
			}
			waitFor(t, 15*time.Second, "the reconnect once the file is back", func() bool { return nc.IsConnected() })
		})
	}
}

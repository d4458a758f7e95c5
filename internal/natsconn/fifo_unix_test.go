//go:build unix

package natsconn

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/dlf-stop/worker/internal/config"
	"github.com/dlf-stop/worker/internal/testutil"
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

package natsconn

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/dlf-stop/worker/internal/config"
)

// The reconnect log names the server it reached, and nats.go's connected
// URL holds the password of a NATS_URL that carries one: only the
// redaction in the reconnect handler keeps it out of a warning (found by
// review: no test reconnected with a password in the URL).
func TestReconnectLogHidesTheURLPassword(t *testing.T) {
	const pw = "url-pw-SECRET-0042"
	first := runServer(t, &server.Options{Username: "worker", Password: pw})
	port := first.Addr().(*net.TCPAddr).Port
	core, logs := observer.New(zapcore.DebugLevel)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	nc, err := Connect(ctx, config.NATS{URL: fmt.Sprintf("nats://worker:%s@127.0.0.1:%d", pw, port)}, zap.New(core), "t")
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	first.Shutdown()
	first.WaitForShutdown()
	waitFor(t, 10*time.Second, "the disconnect", func() bool { return !nc.IsConnected() })
	runServer(t, &server.Options{Port: port, Username: "worker", Password: pw})
	waitFor(t, 20*time.Second, "the reconnect log", func() bool { return logs.FilterMessage("nats reconnected").Len() > 0 })
	for _, e := range logs.All() {
		line := fmt.Sprint(e.Message, " ", e.ContextMap())
		if strings.Contains(line, pw) {
			t.Errorf("log entry holds the URL password: %s", line)
		}
	}
}

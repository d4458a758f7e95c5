package service

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/testutil"
)

// An operator who fixes the credentials of a worker that DLF refuses (its
// circuit open, commands waiting) sees it resume at once, not after the
// probe backoff, which has grown towards RETRY_MAX_INTERVAL by then. Here
// the backoff starts at 20s (so the first probe would come 10s to 30s after
// the circuit opened), and the command published after the 401 must be
// stopped within 5s of the SK file being fixed.
func TestFixedCredentialsEndThePauseAtOnce(t *testing.T) {
	const ak, goodSK = "AKCIRCUITTEST", "sk-good-0123456789"
	emu := emulator.New(emulator.WithCredentials(ak, goodSK))
	base, err := emu.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = emu.Close() })
	emu.AddRunning("p1", "", "s1", "first")
	emu.AddRunning("p1", "", "s1", "second")

	dir := t.TempDir()
	akFile, skFile := filepath.Join(dir, "ak"), filepath.Join(dir, "sk")
	for f, v := range map[string]string{akFile: ak, skFile: "sk-wrong"} {
		if err := os.WriteFile(f, []byte(v+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}

	ns := testutil.StartNATS(t)
	cfg := testConfig(t, ns.ClientURL())
	cfg.DLF.Endpoint = base
	cfg.DLF.AKFile, cfg.DLF.SKFile = akFile, skFile
	cfg.Retry.InitialInterval = 20 * time.Second
	cfg.Retry.MaxInterval = time.Minute
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	r := startRun(t, cfg)
	addr := r.waitServing(t)
	r.waitStarted(t)

	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	outcomes := make(chan *nats.Msg, 10)
	sub, err := nc.ChanSubscribe("dlf.stop.outcome.*", outcomes)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	publish := func(id string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		body := fmt.Sprintf(`{"command_id":%q,"project_id":"p1","script_name":"s1","instance_id":%q}`, id, id)
		if _, err := js.Publish(ctx, cfg.Subjects.StopSubject, []byte(body)); err != nil {
			t.Fatal(err)
		}
	}

	publish("first")
	testutil.Eventually(t, 10*time.Second, func() error {
		code, body, err := get("http://" + addr + "/readyz")
		if err != nil {
			return err
		}
		if code != http.StatusServiceUnavailable || !strings.Contains(body, "circuit open") {
			return fmt.Errorf("/readyz = %d %q, want 503 with the circuit open", code, body)
		}
		return nil
	})
	// Published while the circuit is open: taken as the probe command
	// once "first" was handed back for its own 10s-30s backoff.
	publish("second")

	if err := os.WriteFile(skFile, []byte(goodSK+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	fixed := time.Now()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case m := <-outcomes:
			if id := m.Header.Get(nats.MsgIdHdr); id != "second" {
				continue
			}
			if m.Subject != "dlf.stop.outcome.stopped" {
				t.Fatalf("outcome of the probe command on %s: %s", m.Subject, m.Data)
			}
			t.Logf("stopped %s after the SK file was fixed", time.Since(fixed).Round(time.Millisecond))
			expect(t, "http://"+addr+"/readyz", http.StatusOK, "ready")
			return
		case <-deadline:
			t.Fatalf("no stopped outcome within 5s of the fixed SK file (DLF saw %d stop calls)", emu.StopCalls())
		}
	}
}

// Run returns only once its secret-file watchers are gone: one still
// re-reading could call into the worker after it stopped (found by
// review; goleak, which retries, would not see it).
func TestRunWaitsForItsSecretWatchers(t *testing.T) {
	dir := t.TempDir()
	akFile, skFile := filepath.Join(dir, "ak"), filepath.Join(dir, "sk")
	for _, f := range []string{akFile, skFile} {
		if err := os.WriteFile(f, []byte("v-"+filepath.Base(f)+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	ns := testutil.StartNATS(t)
	cfg := testConfig(t, ns.ClientURL())
	cfg.DLF.AKFile, cfg.DLF.SKFile = akFile, skFile
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	r := startRun(t, cfg)
	r.waitStarted(t)
	watching := func() int { return strings.Count(allStacks(), "internal/secretfile.") }
	if watching() == 0 {
		t.Fatal("no secret-file watcher runs; the test would prove nothing")
	}
	if err := r.cancelAndWait(t); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if n := watching(); n != 0 {
		t.Errorf("%d frames of secret-file watchers still run after Run returned:\n%s", n, allStacks())
	}
}

func allStacks() string {
	buf := make([]byte, 1<<20)
	return string(buf[:runtime.Stack(buf, true)])
}

package service

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/config"
	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/secretfile"
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

// Closing the credentials' watchers waits for a re-read in progress:
// Run closes them on its way out, and one still re-reading could call
// into the worker after it stopped (found by review). A rotation's hook
// holds the watcher in its re-read here; the close must not return
// before the hook does. (An earlier form of this test looked for the
// watchers' frames in all stacks as Run returned, and failed now and
// then on a goroutine that had signalled it was done but not yet
// returned.)
func TestClosingTheWatchersWaitsForAReRead(t *testing.T) {
	dir := t.TempDir()
	akFile, skFile := filepath.Join(dir, "ak"), filepath.Join(dir, "sk")
	for _, f := range []string{akFile, skFile} {
		if err := os.WriteFile(f, []byte("v-"+filepath.Base(f)+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	entered, release := make(chan struct{}, 1), make(chan struct{})
	onChange := func() {
		select {
		case entered <- struct{}{}:
		default:
		}
		<-release
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	d := config.DLF{AKFile: akFile, SKFile: skFile}
	_, closeAll, err := credentials(ctx, d, zap.NewNop(), secretfile.WithPollInterval(20*time.Millisecond), secretfile.WithOnChange(onChange))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(skFile, []byte("rotated\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		close(release)
		t.Fatal("the rotation was not seen")
	}
	cancel()
	closed := make(chan struct{})
	go func() {
		closeAll()
		close(closed)
	}()
	testutil.Consistently(t, 200*time.Millisecond, func() error {
		select {
		case <-closed:
			return errors.New("closing the watchers returned while one was still re-reading")
		default:
			return nil
		}
	})
	close(release)
	testutil.WaitFor(t, 10*time.Second, "the close after the re-read", func() bool {
		select {
		case <-closed:
			return true
		default:
			return false
		}
	})
}

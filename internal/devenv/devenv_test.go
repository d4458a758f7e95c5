package devenv_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.uber.org/goleak"
	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/consumer"
	"github.com/dlf-stop/worker/internal/devenv"
	"github.com/dlf-stop/worker/internal/stopcli"
	"github.com/dlf-stop/worker/internal/testutil"
)

// devRun is devenv.RunWith running in the background.
type devRun struct {
	out    *testutil.SyncBuffer
	cancel context.CancelFunc
	done   chan struct{} // closed when RunWith has returned
	err    error         // what RunWith returned; read only once done is closed
}

// runDev starts RunWith with opts; when the test ends it is cancelled and
// waited for, so no test leaves a dev environment running.
func runDev(t *testing.T, opts devenv.Options) *devRun {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	d := &devRun{out: &testutil.SyncBuffer{}, cancel: cancel, done: make(chan struct{})}
	go func() {
		d.err = devenv.RunWith(ctx, d.out, opts)
		close(d.done)
	}()
	t.Cleanup(func() { _ = d.stop() })
	return d
}

// stop cancels RunWith and returns what it returned. A closed done makes
// a second call (the cleanup's) return at once.
func (d *devRun) stop() error {
	d.cancel()
	select {
	case <-d.done:
		return d.err
	case <-time.After(15 * time.Second):
		return errors.New("RunWith did not return within 15s of cancel")
	}
}

// waitOutput polls until the output contains substr; it fails when RunWith
// returns first or 20s pass.
func (d *devRun) waitOutput(t *testing.T, substr string) {
	t.Helper()
	testutil.Eventually(t, 20*time.Second, func() error {
		t.Helper()
		// Whether RunWith has returned is read before the output, so a
		// miss after it returned is final.
		returned := false
		select {
		case <-d.done:
			returned = true
		default:
		}
		text := d.out.String()
		if strings.Contains(text, substr) {
			return nil
		}
		if returned {
			t.Fatalf("RunWith returned before printing the banner: %v\n%s", d.err, text)
		}
		return fmt.Errorf("no banner; stdout so far:\n%s", text)
	})
}

// outcomeOf waits for the outcome of instance, checking on the way that
// every outcome is published on the subject of its status.
func outcomeOf(t *testing.T, w *testutil.Watcher[consumer.Outcome], instance string) consumer.Outcome {
	t.Helper()
	return w.Wait(t, 15*time.Second, func(o consumer.Outcome) bool { return o.InstanceID == instance })
}

func watchOutcomes(t *testing.T, nc *nats.Conn) *testutil.Watcher[consumer.Outcome] {
	t.Helper()
	w := testutil.Watch[consumer.Outcome](t, nc, "dlf.stop.outcome.*")
	w.Check = func(t testing.TB, subject string, o consumer.Outcome) {
		if subject != "dlf.stop.outcome."+o.Status {
			t.Errorf("outcome with status %q published on %s", o.Status, subject)
		}
	}
	return w
}

// waitHTTP polls url until it answers want, failing after 10s.
func waitHTTP(t *testing.T, client *http.Client, url string, want int) {
	t.Helper()
	testutil.Eventually(t, 10*time.Second, func() error {
		resp, err := client.Get(url)
		if err != nil {
			return err
		}
		_ = resp.Body.Close()
		if resp.StatusCode != want {
			return fmt.Errorf("GET %s: %s, want %d", url, resp.Status, want)
		}
		return nil
	})
}

func TestRunWith(t *testing.T) {
	// Registered first, so it runs after every other cleanup.
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) })

	dev := runDev(t, devenv.Options{NATSPort: -1, HTTPAddr: "127.0.0.1:0", Logger: zap.NewNop()})

	// The banner is printed once the worker consumes.
	dev.waitOutput(t, " stop --script ")
	text := dev.out.String()
	t.Logf("banner:\n%s", text)
	b, err := testutil.ParseDevBanner(text)
	if err != nil {
		t.Fatal(err)
	}
	if len(b.Instances) != 3 {
		t.Errorf("instances = %v, want 3 by default", b.Instances)
	}
	// The worker stop line runs this very binary (here: the test binary).
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if want := "NATS_URL=" + b.NATSURL + " " + exe + " stop --script "; !strings.Contains(text, want) {
		t.Errorf("no worker stop line starting %q", want)
	}
	if !strings.Contains(text, "nats --server "+b.NATSURL+" pub dlf.stop.request '") {
		t.Errorf("nats pub line does not use the NATS URL %s", b.NATSURL)
	}

	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}
	waitHTTP(t, client, "http://"+b.HTTPAddr+"/healthz", http.StatusOK)
	waitHTTP(t, client, "http://"+b.HTTPAddr+"/readyz", http.StatusOK)

	nc, err := nats.Connect(b.NATSURL)
	if err != nil {
		t.Fatalf("connect to the printed NATS URL: %v", err)
	}
	t.Cleanup(nc.Close)
	got := watchOutcomes(t, nc)

	// The nats pub line's payload, sent as the nats CLI sends it (core
	// publish, no message id), stops the instance it names.
	var pub struct {
		ScriptName string `json:"script_name"`
		InstanceID string `json:"instance_id"`
	}
	if err := json.Unmarshal([]byte(b.PubJSON), &pub); err != nil {
		t.Fatalf("nats pub payload is not JSON: %v: %s", err, b.PubJSON)
	}
	if pub.ScriptName != devenv.DemoScript || !slices.Contains(b.Instances, pub.InstanceID) {
		t.Errorf("nats pub payload %s: want script %s and a listed instance", b.PubJSON, devenv.DemoScript)
	}
	if err := nc.Publish("dlf.stop.request", []byte(b.PubJSON)); err != nil {
		t.Fatal(err)
	}
	if o := outcomeOf(t, got, pub.InstanceID); o.Status != "stopped" || o.ProjectID != devenv.DemoProject || o.HTTPStatus != 204 {
		t.Errorf("nats pub line: outcome %+v, want stopped in %s with 204", o, devenv.DemoProject)
	}

	// The worker stop line, run as printed, stops its instance.
	var stdout, stderr bytes.Buffer
	code := stopcli.Run(context.Background(), b.StopArgs, func(k string) (string, bool) {
		if k == "NATS_URL" {
			return b.StopEnv, true
		}
		return "", false
	}, &stdout, &stderr)
	if code != stopcli.ExitStopped || !strings.Contains(stdout.String(), `"status":"stopped"`) {
		t.Errorf("worker stop %v: exit %d, stdout %q, stderr %q; want 0 and a stopped outcome", b.StopArgs, code, stdout.String(), stderr.String())
	}
	stopInstance := ""
	for i, a := range b.StopArgs {
		if a == "--instance" && i+1 < len(b.StopArgs) {
			stopInstance = b.StopArgs[i+1]
		}
	}
	if !slices.Contains(b.Instances, stopInstance) || stopInstance == pub.InstanceID {
		t.Errorf("worker stop line names instance %q; want another listed instance than the nats pub line's", stopInstance)
	}

	// Every other listed instance is running too; an unknown one is not.
	unknown := "00000000-0000-0000-0000-000000000000"
	for i, inst := range append(append([]string(nil), b.Instances...), unknown) {
		if inst == pub.InstanceID || inst == stopInstance {
			continue
		}
		body := fmt.Sprintf(`{"command_id":"devenv-test-%d","script_name":%q,"instance_id":%q}`, i, devenv.DemoScript, inst)
		if err := nc.Publish("dlf.stop.request", []byte(body)); err != nil {
			t.Fatal(err)
		}
		o := outcomeOf(t, got, inst)
		switch {
		case inst == unknown && (o.Status != "failed" || o.ErrorCode != "DLF.6205"):
			t.Errorf("unknown instance: outcome %+v, want failed with DLF.6205", o)
		case inst != unknown && o.Status != "stopped":
			t.Errorf("instance %s: outcome %+v, want stopped", inst, o)
		}
	}

	nc.Close()
	if err := dev.stop(); err != nil {
		t.Errorf("RunWith after cancel: %v, want nil", err)
	}
	if _, err := client.Get("http://" + b.HTTPAddr + "/healthz"); err == nil {
		t.Error("HTTP server still answers after RunWith returned")
	}
}

func TestRunWithInstances(t *testing.T) {
	dev := runDev(t, devenv.Options{NATSPort: -1, HTTPAddr: "127.0.0.1:0", Logger: zap.NewNop(), Instances: 1})
	dev.waitOutput(t, " pub dlf.stop.request ")
	if err := dev.stop(); err != nil {
		t.Errorf("RunWith: %v", err)
	}
	text := dev.out.String()
	n := strings.Count(text[strings.Index(text, "ready to stop:"):strings.Index(text, "Watch outcomes")], "\n  ")
	if n != 1 {
		t.Errorf("listed %d instances, want 1:\n%s", n, text)
	}
}

// Ctrl-C while the worker is still starting, before the banner, is a
// requested stop like any other: worker dev exits 0 (contract section 8;
// found by review: no test stopped it that early).
func TestStopBeforeTheWorkerStartedIsNoError(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var out testutil.SyncBuffer
	if err := devenv.RunWith(ctx, &out, devenv.Options{NATSPort: -1, HTTPAddr: "127.0.0.1:0", Logger: zap.NewNop()}); err != nil {
		t.Errorf("RunWith stopped before the worker started = %v; want nil", err)
	}
}

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

// banner is what the test reads from the dev environment's stdout.
type banner struct {
	natsURL   string
	httpAddr  string // host:port
	instances []string
	pubJSON   string   // payload of the `nats pub` line
	stopEnv   string   // NATS_URL=... of the `worker stop` line
	stopArgs  []string // arguments after `stop` on that line
}

func parseBanner(t *testing.T, text string) banner {
	t.Helper()
	var b banner
	inInstances := false
	for line := range strings.Lines(text) {
		line = strings.TrimRight(line, "\n")
		trimmed := strings.TrimSpace(line)
		f := strings.Fields(line)
		switch {
		case strings.HasPrefix(line, "NATS URL:") && len(f) >= 3:
			b.natsURL = f[2]
		case strings.HasPrefix(line, "HTTP address:") && len(f) >= 3:
			b.httpAddr = strings.TrimPrefix(f[2], "http://")
		case strings.HasPrefix(line, "Running instances ready to stop:"):
			inInstances = true
			continue
		case strings.Contains(line, " pub dlf.stop.request '"):
			i, j := strings.Index(line, "'"), strings.LastIndex(line, "'")
			if j > i {
				b.pubJSON = line[i+1 : j]
			}
		case strings.Contains(line, " stop --script "):
			if len(f) > 0 && strings.HasPrefix(f[0], "NATS_URL=") {
				b.stopEnv = f[0]
			}
			_, after, _ := strings.Cut(line, " stop ")
			b.stopArgs = strings.Fields(after)
		}
		if inInstances {
			if trimmed == "" {
				inInstances = false
			} else {
				b.instances = append(b.instances, trimmed)
			}
		}
	}
	if b.natsURL == "" || b.httpAddr == "" || len(b.instances) == 0 || b.pubJSON == "" || b.stopArgs == nil {
		t.Fatalf("banner incomplete (%+v):\n%s", b, text)
	}
	return b
}

// outcomes collects outcome events from the moment it subscribes.
type outcomes struct {
	ch   chan *nats.Msg
	seen []consumer.Outcome
}

func watchOutcomes(t *testing.T, nc *nats.Conn) *outcomes {
	t.Helper()
	o := &outcomes{ch: make(chan *nats.Msg, 64)}
	sub, err := nc.ChanSubscribe("dlf.stop.outcome.*", o.ch)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return o
}

// wait returns the first outcome for instance, failing the test after 15s.
func (o *outcomes) wait(t *testing.T, instance string) consumer.Outcome {
	t.Helper()
	deadline := time.After(15 * time.Second)
	for {
		for _, e := range o.seen {
			if e.InstanceID == instance {
				return e
			}
		}
		select {
		case m := <-o.ch:
			var e consumer.Outcome
			if err := json.Unmarshal(m.Data, &e); err != nil {
				t.Fatalf("outcome on %s is not JSON: %v: %s", m.Subject, err, m.Data)
			}
			if m.Subject != "dlf.stop.outcome."+e.Status {
				t.Errorf("outcome with status %q published on %s", e.Status, m.Subject)
			}
			o.seen = append(o.seen, e)
		case <-deadline:
			t.Fatalf("no outcome for instance %s within 15s (seen %+v)", instance, o.seen)
		}
	}
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
	b := parseBanner(t, text)
	if len(b.instances) != 3 {
		t.Errorf("instances = %v, want 3 by default", b.instances)
	}
	// The worker stop line runs this very binary (here: the test binary).
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if want := "NATS_URL=" + b.natsURL + " " + exe + " stop --script "; !strings.Contains(text, want) {
		t.Errorf("no worker stop line starting %q", want)
	}
	if !strings.Contains(text, "nats --server "+b.natsURL+" pub dlf.stop.request '") {
		t.Errorf("nats pub line does not use the NATS URL %s", b.natsURL)
	}

	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}
	waitHTTP(t, client, "http://"+b.httpAddr+"/healthz", http.StatusOK)
	waitHTTP(t, client, "http://"+b.httpAddr+"/readyz", http.StatusOK)

	nc, err := nats.Connect(b.natsURL)
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
	if err := json.Unmarshal([]byte(b.pubJSON), &pub); err != nil {
		t.Fatalf("nats pub payload is not JSON: %v: %s", err, b.pubJSON)
	}
	if pub.ScriptName != devenv.DemoScript || !slices.Contains(b.instances, pub.InstanceID) {
		t.Errorf("nats pub payload %s: want script %s and a listed instance", b.pubJSON, devenv.DemoScript)
	}
	if err := nc.Publish("dlf.stop.request", []byte(b.pubJSON)); err != nil {
		t.Fatal(err)
	}
	if o := got.wait(t, pub.InstanceID); o.Status != "stopped" || o.ProjectID != devenv.DemoProject || o.HTTPStatus != 204 {
		t.Errorf("nats pub line: outcome %+v, want stopped in %s with 204", o, devenv.DemoProject)
	}

	// The worker stop line, run as printed, stops its instance.
	var stdout, stderr bytes.Buffer
	code := stopcli.Run(context.Background(), b.stopArgs, func(k string) (string, bool) {
		if k == "NATS_URL" {
			return strings.TrimPrefix(b.stopEnv, "NATS_URL="), true
		}
		return "", false
	}, &stdout, &stderr)
	if code != stopcli.ExitStopped || !strings.Contains(stdout.String(), `"status":"stopped"`) {
		t.Errorf("worker stop %v: exit %d, stdout %q, stderr %q; want 0 and a stopped outcome", b.stopArgs, code, stdout.String(), stderr.String())
	}
	stopInstance := ""
	for i, a := range b.stopArgs {
		if a == "--instance" && i+1 < len(b.stopArgs) {
			stopInstance = b.stopArgs[i+1]
		}
	}
	if !slices.Contains(b.instances, stopInstance) || stopInstance == pub.InstanceID {
		t.Errorf("worker stop line names instance %q; want another listed instance than the nats pub line's", stopInstance)
	}

	// Every other listed instance is running too; an unknown one is not.
	unknown := "00000000-0000-0000-0000-000000000000"
	for i, inst := range append(append([]string(nil), b.instances...), unknown) {
		if inst == pub.InstanceID || inst == stopInstance {
			continue
		}
		body := fmt.Sprintf(`{"command_id":"devenv-test-%d","script_name":%q,"instance_id":%q}`, i, devenv.DemoScript, inst)
		if err := nc.Publish("dlf.stop.request", []byte(body)); err != nil {
			t.Fatal(err)
		}
		o := got.wait(t, inst)
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
	if _, err := client.Get("http://" + b.httpAddr + "/healthz"); err == nil {
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

package devenv_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.uber.org/goleak"
	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/devenv"
	"github.com/dlf-stop/worker/internal/stopcli"
)

// syncBuffer is a bytes.Buffer safe to write from RunWith's goroutine
// while the test reads it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
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

// outcome is the part of an outcome event the test looks at.
type outcome struct {
	CommandID  string `json:"command_id"`
	ProjectID  string `json:"project_id"`
	ScriptName string `json:"script_name"`
	InstanceID string `json:"instance_id"`
	Status     string `json:"status"`
	Cause      string `json:"cause"`
	HTTPStatus int    `json:"http_status"`
	ErrorCode  string `json:"error_code"`
}

// outcomes collects outcome events from the moment it subscribes.
type outcomes struct {
	ch   chan *nats.Msg
	seen []outcome
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
func (o *outcomes) wait(t *testing.T, instance string) outcome {
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
			var e outcome
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
	deadline := time.Now().Add(10 * time.Second)
	last := "no answer"
	for {
		resp, err := client.Get(url)
		if err == nil {
			_ = resp.Body.Close()
			if resp.StatusCode == want {
				return
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s: %s, want %d", url, last, want)
		}
		select {
		case <-time.After(50 * time.Millisecond):
		case <-t.Context().Done():
			t.FailNow()
		}
	}
}

func TestRunWith(t *testing.T) {
	// Registered first, so it runs after every other cleanup.
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) })

	ctx, cancel := context.WithCancel(context.Background())
	out := &syncBuffer{}
	done := make(chan error, 1)
	go func() {
		done <- devenv.RunWith(ctx, out, devenv.Options{NATSPort: -1, HTTPAddr: "127.0.0.1:0", Logger: zap.NewNop()})
	}()
	var (
		stopOnce sync.Once
		runErr   error
	)
	stop := func() error {
		stopOnce.Do(func() {
			cancel()
			select {
			case runErr = <-done:
			case <-time.After(15 * time.Second):
				runErr = fmt.Errorf("RunWith did not return within 15s of cancel")
			}
		})
		return runErr
	}
	t.Cleanup(func() { _ = stop() })

	// The banner is printed once the worker consumes.
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(out.String(), " stop --script ") {
		select {
		case err := <-done:
			t.Fatalf("RunWith returned before printing the banner: %v\n%s", err, out.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("no banner within 20s; stdout so far:\n%s", out.String())
		}
	}
	text := out.String()
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
	if err := stop(); err != nil {
		t.Errorf("RunWith after cancel: %v, want nil", err)
	}
	if _, err := client.Get("http://" + b.httpAddr + "/healthz"); err == nil {
		t.Error("HTTP server still answers after RunWith returned")
	}
}

func TestRunWithInstances(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	out := &syncBuffer{}
	done := make(chan error, 1)
	go func() {
		done <- devenv.RunWith(ctx, out, devenv.Options{NATSPort: -1, HTTPAddr: "127.0.0.1:0", Logger: zap.NewNop(), Instances: 1})
	}()
	deadline := time.After(20 * time.Second)
	for !strings.Contains(out.String(), " pub dlf.stop.request ") {
		select {
		case err := <-done:
			t.Fatalf("RunWith returned before printing the banner: %v", err)
		case <-deadline:
			cancel()
			t.Fatalf("no banner within 20s:\n%s", out.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("RunWith: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("RunWith did not return within 15s of cancel")
	}
	text := out.String()
	n := strings.Count(text[strings.Index(text, "ready to stop:"):strings.Index(text, "Watch outcomes")], "\n  ")
	if n != 1 {
		t.Errorf("listed %d instances, want 1:\n%s", n, text)
	}
}
